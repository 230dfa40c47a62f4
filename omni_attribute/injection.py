"""Which attribute tokens act on which rows of a batched DiT call, when, where and how strongly.

A host evaluates several conditions in one batch (chunk i = rows [i*B, (i+1)*B), each chunk naming
its condition by a kind — 0 positive, 1 negative — and an id). An :class:`Injection` turns that into
per-row tokens, key masks and scales (a :class:`Plan`), so that each condition gets its own tokens
or none: the thing a flow-blend guider needs. Pure torch: how ComfyUI hands these facts to a block
lives in ``nodes/apply.py``.

During a sampling run nothing of a plan changes from step to step but whether the step's sigma lies in
the condition's window. :meth:`Injection.prepared` therefore builds a :class:`PreparedPlan` once per
distinct (conditions, batch layout, device, dtype, IP weights) — tokens, masks, scales and every IP
block's keys and values of the attribute tokens, all on the device — and keeps it in a small
:class:`PlanCache` that the host clears when a run ends. What a step needs from its sigma is a
device-side factor (:meth:`PreparedPlan.scale_at`), so no step reads a device tensor on the host,
copies anything from the host, or branches on a tensor value (which would also break a
``torch.compile`` graph).

One type carries attribute tokens from the user's graph to the IP block: :class:`AttributeCondition`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .ip_adapter import IPAdapter, scale_values

SIGMA_TOLERANCE = 1e-6


@dataclass(frozen=True)
class AttributeCondition:
    """Embeds rows acting together (their tokens concatenated, never averaged), the weight that scales
    their values, and the part of the sampling run in which they act (0 = first step, 1 = last)."""
    tokens: torch.Tensor                # [R, M, D]
    weight: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    label: str = ""

    def __post_init__(self):
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"attribute '{self.label}': need 0 <= start_percent <= end_percent <= 1, got "
                             f"{self.start_percent} and {self.end_percent}")

    def with_weight(self, weight: float) -> "AttributeCondition":
        return replace(self, weight=weight)

    def sigma_window(self, percent_to_sigma: Callable[[float], float]) -> "SigmaWindow":
        """The sigmas this condition acts at, given the model's schedule (percent → sigma). Starting at 0
        means from the first step whatever its sigma (an open window: no per-step test at all)."""
        start = math.inf if self.start_percent <= 0.0 else float(percent_to_sigma(self.start_percent))
        return SigmaWindow(start, float(percent_to_sigma(self.end_percent)))


@dataclass(frozen=True)
class SigmaWindow:
    """Active while ``end <= sigma <= start`` (sigmas fall during sampling)."""
    start: float = math.inf
    end: float = 0.0

    def contains(self, sigma: float | None) -> bool:
        if sigma is None:
            return True
        return self.end - SIGMA_TOLERANCE <= sigma <= self.start + SIGMA_TOLERANCE

    @property
    def always(self) -> bool:
        """Every sigma (sigmas are never negative): no step needs testing."""
        return self.start == math.inf and self.end <= 0.0

    def inside(self, sigmas: torch.Tensor) -> torch.Tensor:
        """``contains(sigmas.max())`` as a 0-d 0/1 tensor on sigmas' device: device work, no host read."""
        sigma = sigmas.max()
        return ((sigma >= self.end - SIGMA_TOLERANCE) & (sigma <= self.start + SIGMA_TOLERANCE)).to(torch.float32)


def joint_rows(conditions: Sequence[AttributeCondition]) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditions attended together: tokens [ΣR·M, D] and each token's value weight [ΣR·M]."""
    tokens = [c.tokens.reshape(-1, c.tokens.shape[-1]) for c in conditions]
    weights = [torch.full((t.shape[0],), float(c.weight)) for c, t in zip(conditions, tokens)]
    return torch.cat(tokens), torch.cat(weights)


@dataclass
class Plan:
    """Per-row inputs of one IP block call: tokens [B,L,D], key_mask [B,L] (padding off), scale [B,1]
    or [B,N] (0 for rows without tokens, the MASK on the token grid), value_scale [B,L] (weights)."""
    tokens: torch.Tensor
    key_mask: torch.Tensor
    scale: torch.Tensor
    value_scale: torch.Tensor


@dataclass
class Injection:
    ip: IPAdapter
    condition: AttributeCondition | None = None  # tokens for every chunk (Apply); None: only per-condition tokens
    window: SigmaWindow = field(default_factory=SigmaWindow)  # when ``condition`` acts
    per_batch_item: bool = False            # row i of the condition → latent item i (else: all rows together)
    apply_to: frozenset[int] | None = None  # condition kinds that get ``condition``; None = all
    mask: torch.Tensor | None = None        # [Bm, H, W] in [0,1], where the attribute acts
    key: str = "omni_attribute"
    cache: "PlanCache" = field(default_factory=lambda: PlanCache(), repr=False, compare=False)

    def _default_rows(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        condition = self.condition
        if self.per_batch_item:
            index = torch.arange(chunk) % condition.tokens.shape[0]
            tokens = condition.tokens[index]
            return tokens, torch.full(tokens.shape[:2], float(condition.weight))
        flat, weights = joint_rows([condition])
        return flat.expand(chunk, -1, -1), weights.expand(chunk, -1)

    def plan(self, kinds: Sequence[int], ids: Sequence[Any], batch: int, n_img: int, sigma: float | None = None,
             per_condition: Mapping[Any, Sequence[AttributeCondition]] | None = None,
             grid: tuple[int, int] | None = None, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Plan | None:
        """Per-row tokens for a batched call at one sigma, or None when nothing acts on any row (the
        reference; a sampler uses :meth:`prepared`).

        ``kinds[i]``/``ids[i]`` name chunk i's condition; ``per_condition`` maps an id to the conditions
        that chunk attends to together (a guider's choice), which win over ``condition``."""
        default_on = self._default_possible() and self.window.contains(sigma)
        sources = self._sources(kinds, ids, per_condition or {}, default_on)
        return self._build_rows(sources, batch, n_img, grid, device, dtype)

    def _default_possible(self) -> bool:
        return self.condition is not None and self.condition.weight != 0

    def _sources(self, kinds: Sequence[int], ids: Sequence[Any], per_condition: Mapping[Any, Sequence[AttributeCondition]],
                 default_on: bool) -> list:
        """Per chunk: the conditions it attends to (a tuple), DEFAULT (``condition``) or None."""
        sources = []
        for kind, cond_id in zip(kinds, ids):
            if cond_id is not None and cond_id in per_condition:
                sources.append(tuple(per_condition[cond_id]))
            elif default_on and (self.apply_to is None or kind in self.apply_to):
                sources.append(DEFAULT)
            else:
                sources.append(None)
        return sources

    def _build_rows(self, sources: list, batch: int, n_img: int, grid: tuple[int, int] | None,
                    device: torch.device | str, dtype: torch.dtype) -> Plan | None:
        chunk = batch // len(sources)
        parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for source in sources:
            if source is DEFAULT:
                parts.append(self._default_rows(chunk))
            elif source is not None:
                flat, weights = joint_rows(source)
                parts.append((flat.expand(chunk, -1, -1), weights.expand(chunk, -1)))
            else:
                parts.append(None)
        present = [p[0] for p in parts if p is not None]
        if not present:
            return None
        longest = max(p.shape[1] for p in present)
        tokens = torch.zeros(batch, longest, present[0].shape[-1], dtype=present[0].dtype)
        key_mask = torch.ones(batch, longest, dtype=torch.bool)  # rows without tokens attend to zeros, scaled by 0
        value_scale = torch.ones(batch, longest)
        scale = torch.zeros(batch, 1)
        for i, part in enumerate(parts):
            if part is None:
                continue
            rows = slice(i * chunk, (i + 1) * chunk)
            part_tokens, part_weights = part
            tokens[rows, :part_tokens.shape[1]] = part_tokens.to(tokens.dtype)
            key_mask[rows, part_tokens.shape[1]:] = False
            value_scale[rows, :part_weights.shape[1]] = part_weights
            scale[rows] = 1.0
        if self.mask is not None:
            scale = scale * spatial_weights(self.mask, grid, n_img, batch)
        return Plan(tokens.to(device, dtype), key_mask.to(device), scale.to(device), value_scale.to(device))

    # ---- the sampler's path: built once, kept on the device ----------------------------------------
    def prepared(self, kinds: Sequence[int], ids: Sequence[Any], batch: int,
                 per_condition: Mapping[Any, Sequence[AttributeCondition]] | None = None,
                 grid: tuple[int, int] | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> "PreparedPlan | None":
        """The plan of a batched call with each IP block's keys/values, from the cache or built once.

        Host work only (dictionary look-ups on ids, versions and shapes): nothing here reads a device
        tensor or copies to the device unless the plan is new. ``condition``'s sigma window is not
        decided here but per call on the device (:meth:`PreparedPlan.scale_at`). ``grid`` is the
        image-token grid (rows, cols); the plan's mask weights cover it (the block fits them to its token
        count)."""
        sources = self._sources(kinds, ids, per_condition or {}, self._default_possible())
        if all(source is None for source in sources):
            return None
        key = (tuple(_source_key(self.condition if source is DEFAULT else source) for source in sources), batch,
               grid if self.mask is not None else None, _mask_key(self.mask),
               torch.device(device), dtype, _weights_key(self.ip))
        return self.cache.get(key, lambda: self._prepare(sources, batch, grid, device, dtype))

    def _prepare(self, sources: list, batch: int, grid: tuple[int, int] | None, device, dtype) -> "PreparedPlan":
        n_img = grid[0] * grid[1] if grid is not None else 1
        plan = self._build_rows(sources, batch, n_img, grid, device, dtype)
        like = torch.empty(0, device=device, dtype=dtype)
        keys_values = {}
        for kind, table in (("double", self.ip.double_blocks), ("single", self.ip.single_blocks)):
            for index, block in table.items():
                k, v = block.keys_values(plan.tokens, like)
                keys_values[f"{kind}.{index}"] = (k, scale_values(v, plan.value_scale))
        gated = None
        if not self.window.always and any(source is DEFAULT for source in sources):
            chunk = batch // len(sources)
            gated = torch.tensor([float(source is DEFAULT) for source in sources]).repeat_interleave(chunk)[:, None]
            gated = gated.to(device)
        return PreparedPlan(plan=plan, attn_mask=plan.key_mask[:, None, None, :],
                            scale=plan.scale.to(dtype), spatial=self.mask is not None, keys_values=keys_values,
                            window=self.window if gated is not None else None, gated=gated,
                            sources=(tuple(sources), self.condition, self.mask))

    def begin_run(self) -> None:
        """A sampling run starts: plans of an earlier run (other weights, other embeds) are dropped."""
        self.cache.open_run()

    def end_run(self) -> None:
        """A sampling run ends: its plans (device memory) are released."""
        self.cache.close_run()


DEFAULT = "default"  # a chunk that gets the injection's own ``condition``


def _source_key(source) -> Any:
    """What a chunk's rows are made of, as a hashable key: the identity and version of each condition's
    tokens and its weight (the cache entry holds the conditions, so an id cannot be reused meanwhile)."""
    if source is None:
        return None
    if isinstance(source, AttributeCondition):  # the injection's own condition (with per_batch_item, window)
        return ("default", id(source.tokens), _version(source.tokens), float(source.weight))
    return tuple((id(c.tokens), _version(c.tokens), float(c.weight)) for c in source)


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter; inference tensors (ComfyUI runs nodes under
    ``torch.inference_mode``) keep none, and their data pointer stands in for it."""
    return tensor.data_ptr() if tensor.is_inference() else tensor._version


def _mask_key(mask: torch.Tensor | None) -> Any:
    return None if mask is None else (id(mask), _version(mask))


def _weights_key(module: torch.nn.Module) -> tuple:
    """Where the IP weights live and whether they were changed in place (a reload, an offload to another
    device or dtype, an in-place update all change it)."""
    return tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in module.parameters())


@dataclass(eq=False)
class PreparedPlan:
    """A :class:`Plan` kept on the device for a run, with each IP block's keys and values (values already
    times their weights) of the attribute tokens: ``keys_values["double.3"] = (k, v)``, [B,H,L,Dh].
    ``window``/``gated``: rows [B,1] that follow ``window`` (the injection's own condition), or None
    when every row acts at every step."""
    plan: Plan
    attn_mask: torch.Tensor                  # [B,1,1,L] bool
    scale: torch.Tensor                      # plan.scale in the compute dtype, [B,1] or [B,G] (a MASK on the grid)
    spatial: bool
    keys_values: dict[str, tuple[torch.Tensor, torch.Tensor]]
    window: SigmaWindow | None = None
    gated: torch.Tensor | None = None
    sources: Any = None                      # keeps the conditions (and mask) whose ids are in the cache key

    def scale_at(self, sigmas: torch.Tensor | None) -> torch.Tensor:
        """The rows' scale for a call at ``sigmas`` (the step's sigma per row, on the device): rows that
        follow the window are multiplied by 0 or 1 computed on the device — no host read, no branch."""
        if self.window is None or sigmas is None:
            return self.scale
        factor = 1.0 - self.gated + self.gated * self.window.inside(sigmas)  # exactly 1 or 0 per row
        return self.scale * factor.to(self.scale.dtype)

    def fit(self, scale: torch.Tensor, n_img: int) -> torch.Tensor:
        """A spatial scale [B,G] on the grid → [B,n_img] for a block's image tokens (tokens after the grid,
        e.g. reference latents, get weight 1, as :func:`spatial_weights` gives them). Shapes only."""
        grid_tokens = scale.shape[1]
        if not self.spatial or grid_tokens == n_img:
            return scale
        if n_img < grid_tokens:
            return scale[:, :n_img]
        return torch.cat([scale, scale.new_ones(scale.shape[0], n_img - grid_tokens)], dim=1)


class PlanCache:
    """Prepared plans of one injection, least recently used first out (``capacity``), emptied when a
    sampling run ends; ``builds`` counts the plans built (tests read it)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.builds = 0
        self._entries: OrderedDict = OrderedDict()
        self._runs = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key, build: Callable[[], PreparedPlan]) -> PreparedPlan:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = build()
            self.builds += 1
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def open_run(self) -> None:
        if self._runs == 0:
            self.clear()
        self._runs += 1

    def close_run(self) -> None:
        self._runs = max(0, self._runs - 1)
        if self._runs == 0:
            self.clear()


def spatial_weights(mask: torch.Tensor, grid: tuple[int, int] | None, n_img: int, batch: int) -> torch.Tensor:
    """MASK [Bm,H,W] → per-token weights [batch, n_img] on the image-token grid (extra tokens, e.g.
    reference latents appended after the grid, get weight 1)."""
    if grid is None:
        raise RuntimeError("the image-token grid is unknown: the Omni-Attribute model wrapper did not run")
    rows, cols = grid
    if mask.ndim == 2:
        mask = mask[None]
    small = F.interpolate(mask[:, None].float(), size=(rows, cols), mode="area")[:, 0].flatten(1)
    small = small[torch.arange(batch) % small.shape[0]]
    if n_img > rows * cols:
        small = torch.cat([small, torch.ones(batch, n_img - rows * cols)], dim=1)
    return small[:, :n_img]
