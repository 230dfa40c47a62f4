"""Which attribute tokens act on which rows of a batched DiT call, when, where and how strongly.

A host evaluates several conditions in one batch (chunk i = rows [i*B, (i+1)*B), each chunk naming
its condition by a kind — 0 positive, 1 negative — and an id). An :class:`Injection` turns that into
per-row tokens, key masks and scales (a :class:`Plan`), so that each condition gets its own tokens
or none: the thing a flow-blend guider needs. Pure torch: how ComfyUI hands these facts to a block
lives in ``nodes/apply.py``.

One type carries attribute tokens from the user's graph to the IP block: :class:`AttributeCondition`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .ip_adapter import IPAdapter

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
        """The sigmas this condition acts at, given the model's schedule (percent → sigma)."""
        return SigmaWindow(float(percent_to_sigma(self.start_percent)), float(percent_to_sigma(self.end_percent)))


@dataclass(frozen=True)
class SigmaWindow:
    """Active while ``end <= sigma <= start`` (sigmas fall during sampling)."""
    start: float = math.inf
    end: float = 0.0

    def contains(self, sigma: float | None) -> bool:
        if sigma is None:
            return True
        return self.end - SIGMA_TOLERANCE <= sigma <= self.start + SIGMA_TOLERANCE


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
        """Per-row tokens for a batched call, or None when nothing acts on any row.

        ``kinds[i]``/``ids[i]`` name chunk i's condition; ``per_condition`` maps an id to the conditions
        that chunk attends to together (a guider's choice), which win over ``condition``."""
        per_condition = per_condition or {}
        default_on = (self.condition is not None and self.condition.weight != 0 and self.window.contains(sigma))
        chunk = batch // len(kinds)
        parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for kind, cond_id in zip(kinds, ids):
            if cond_id is not None and cond_id in per_condition:
                flat, weights = joint_rows(per_condition[cond_id])
                parts.append((flat.expand(chunk, -1, -1), weights.expand(chunk, -1)))
            elif default_on and (self.apply_to is None or kind in self.apply_to):
                parts.append(self._default_rows(chunk))
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
