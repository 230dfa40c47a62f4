"""Which attribute tokens act on which rows of a batched DiT call, when, where and how strongly.

ComfyUI evaluates several conditions in one batch (chunk i = rows [i*B, (i+1)*B), with
``cond_or_uncond[i]`` and ``uuids[i]`` naming the condition). An :class:`Injection` turns that
into per-row tokens, key masks and scales, so that each condition gets its own tokens or none:
the thing a flow-blend guider needs. Pure torch; the ComfyUI patches live in ``nodes/ip_patch.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .ip_adapter import IPAdapter, IPBlock

# transformer_options keys shared between the patches of one forward pass
TXT_LEN = "omni_attribute_txt_len"
GRID = "omni_attribute_grid"            # (rows, cols) of the image-token grid
COND_TOKENS = "omni_attribute_cond_tokens"  # {cond uuid: CondTokens}: per-condition tokens set by a guider


@dataclass
class CondTokens:
    """Tokens one condition attends to: [R,M,D] rows acting together, optionally a weight per token."""
    tokens: torch.Tensor
    value_scale: torch.Tensor | None = None   # [R*M]

    def joint(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.tokens.reshape(-1, self.tokens.shape[-1])
        scale = self.value_scale if self.value_scale is not None else torch.ones(flat.shape[0])
        return flat, scale.float()


@dataclass
class Plan:
    tokens: torch.Tensor        # [B, M, D]
    key_mask: torch.Tensor      # [B, M] bool
    scale: torch.Tensor         # [B, 1] or [B, N]
    value_scale: torch.Tensor   # [B, M]


@dataclass
class Injection:
    ip: IPAdapter
    tokens: torch.Tensor | None             # [R, M, D] rows of the embeds (None: only per-condition tokens)
    weight: float = 1.0
    per_batch_item: bool = False            # row i → latent item i (else: all rows' tokens act together)
    sigma_start: float = float("inf")       # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    apply_to: frozenset[int] | None = None  # cond_or_uncond values that get the default tokens; None = all
    mask: torch.Tensor | None = None        # [Bm, H, W] in [0,1], where the attribute acts
    key: str = field(default="omni_attribute")

    def active(self, sigmas: torch.Tensor | None) -> bool:
        if sigmas is None:
            return True
        sigma = float(sigmas.max())
        return self.sigma_end - 1e-6 <= sigma <= self.sigma_start + 1e-6

    def rows_for_chunk(self, chunk_size: int) -> torch.Tensor:
        """Default tokens for one chunk: [chunk, M', D]."""
        if self.per_batch_item:
            index = torch.arange(chunk_size) % self.tokens.shape[0]
            return self.tokens[index]
        joint = self.tokens.reshape(1, -1, self.tokens.shape[-1])
        return joint.expand(chunk_size, -1, -1)

    def plan(self, options: dict, batch: int, n_img: int, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> Plan | None:
        """Per-row tokens for a batched call (on ``device``), or None when nothing acts on any row."""
        if self.weight == 0 or not self.active(options.get("sigmas")):
            return None
        kinds = list(options.get("cond_or_uncond") or [0])
        uuids = list(options.get("uuids") or [None] * len(kinds))
        per_cond = options.get(COND_TOKENS) or {}
        chunk = batch // len(kinds)
        parts: list[tuple[torch.Tensor, torch.Tensor | None] | None] = []
        for kind, uid in zip(kinds, uuids):
            if uid is not None and uid in per_cond:
                flat, value_scale = per_cond[uid].joint()
                parts.append((flat.expand(chunk, -1, -1), value_scale))
            elif self.tokens is not None and (self.apply_to is None or kind in self.apply_to):
                parts.append((self.rows_for_chunk(chunk), None))
            else:
                parts.append(None)
        present = [p[0] for p in parts if p is not None]
        if not present:
            return None
        width = present[0].shape[-1]
        longest = max(p.shape[1] for p in present)
        tokens = torch.zeros(batch, longest, width, dtype=present[0].dtype)
        key_mask = torch.ones(batch, longest, dtype=torch.bool)  # rows without tokens attend to zeros, scaled by 0
        value_scale = torch.ones(batch, longest)
        scale = torch.zeros(batch, 1)
        for i, part in enumerate(parts):
            if part is None:
                continue
            rows = slice(i * chunk, (i + 1) * chunk)
            part_tokens, part_scale = part
            tokens[rows, :part_tokens.shape[1]] = part_tokens.to(tokens.dtype)
            key_mask[rows, part_tokens.shape[1]:] = False
            if part_scale is not None:
                value_scale[rows, :part_scale.shape[0]] = part_scale
            scale[rows] = self.weight
        if self.mask is not None:
            scale = scale * spatial_weights(self.mask, options.get(GRID), n_img, batch)
        return Plan(tokens.to(device, dtype), key_mask.to(device), scale.to(device), value_scale.to(device))

    def cached_plan(self, options: dict, batch: int, n_img: int, device, dtype) -> Plan | None:
        """plan(), computed once per forward pass: ComfyUI hands every block the same options dict."""
        slot = f"{self.key}_plan_{id(self)}_{n_img}"
        if slot not in options:
            options[slot] = self.plan(options, batch, n_img, device, dtype)
        return options[slot]


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


def attention_override(previous, block: IPBlock, plan: Plan, img: slice):
    """An ``optimized_attention_override`` for one block call: the block's own attention (or the
    override already installed, so patches stack), plus the IP term on the image positions."""
    def override(func, *args, **kwargs):
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        q = args[0] if args else kwargs["q"]
        term = block.contribution(q[:, :, img], plan.tokens, plan.key_mask, plan.scale, plan.value_scale)
        out[:, img] += term.to(out.dtype)
        return out
    return override
