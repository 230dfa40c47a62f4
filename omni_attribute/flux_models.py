"""FLUX.1 transformers in ComfyUI's and diffusers' form: layouts, builders, weight mapping, forwards.

ComfyUI (``comfy.ldm.flux.model.Flux``) and diffusers (``FluxTransformer2DModel``) implement the same
network with different parameter names and some fused tensors:

* ComfyUI fuses q/k/v into one ``qkv`` linear (double blocks) and q/k/v + MLP-in into ``linear1``
  (single blocks); diffusers keeps them separate. We split / concatenate along the output dim.
* The final adaLN modulation is ``(shift, scale)`` in ComfyUI's ``LastLayer`` and ``(scale, shift)``
  in diffusers' ``AdaLayerNormContinuous``: the two halves of ``norm_out.linear`` are swapped.
* Both embed ``1000 * sigma`` for the timestep (and ``1000 * guidance``): ComfyUI passes sigma to the
  diffusion model and multiplies inside ``timestep_embedding``; diffusers multiplies inside
  ``forward``. So both take sigma / guidance as is.
* ComfyUI packs 2x2 latent patches into tokens in ``(c, ph, pw)`` order, image ids ``(0, row, col)``
  and text ids all zero; :func:`diffusers_flux_forward` reproduces that outside diffusers.

No ComfyUI here: building ComfyUI's own FLUX from a layout (tests, the laboratory) lives in
``devtools/comfy_flux.py``; the plugin's users load FLUX with ComfyUI's standard loaders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F

PATCH_SIZE = 2


@dataclass
class FluxLayout:
    """Sizes of a FLUX.1 transformer (``in_channels`` is the packed width: latent channels * 2 * 2)."""

    hidden_size: int
    num_heads: int
    depth_double: int
    depth_single: int
    context_dim: int = 4096
    vec_in_dim: int = 768
    in_channels: int = 64
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    guidance_embed: bool = True
    mlp_ratio: float = 4.0
    theta: int = 10000

    def __post_init__(self) -> None:
        self.axes_dim = [int(a) for a in self.axes_dim]
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must add up to the head dim {self.head_dim}")
        if self.in_channels % (PATCH_SIZE * PATCH_SIZE):
            raise ValueError(f"in_channels {self.in_channels} must be a multiple of {PATCH_SIZE * PATCH_SIZE}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent image before 2x2 packing (16 for FLUX.1)."""
        return self.in_channels // (PATCH_SIZE * PATCH_SIZE)

    @classmethod
    def flux_dev(cls) -> "FluxLayout":
        """FLUX.1-dev: 3072 wide, 24 heads, 19 double + 38 single blocks, guidance-distilled."""
        return cls(hidden_size=3072, num_heads=24, depth_double=19, depth_single=38, guidance_embed=True)

    @classmethod
    def flux_schnell(cls) -> "FluxLayout":
        """FLUX.1-schnell: FLUX.1-dev's sizes without the guidance embedder."""
        return cls(hidden_size=3072, num_heads=24, depth_double=19, depth_single=38, guidance_embed=False)

    @classmethod
    def tiny(cls) -> "FluxLayout":
        """A tiny FLUX for tests: width 64, 2 heads of 32, 2 double + 2 single blocks."""
        return cls(hidden_size=64, num_heads=2, depth_double=2, depth_single=2, context_dim=64, vec_in_dim=32,
                   in_channels=64, axes_dim=[4, 14, 14], guidance_embed=True)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["axes_dim"] = list(self.axes_dim)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FluxLayout":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FluxLayout keys: {unknown}")
        return cls(**dict(data))


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_flux_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter deterministically from ``seed`` (ComfyUI's layers leave them uninitialised).

    Weights ~ N(0, 1/fan_in) (so activations keep their scale even at tiny widths; ~0.018 for width
    3072), biases ~ N(0, 0.02) (non-zero so that bias mapping mistakes show), RMSNorm scales = 1 + small
    noise. Values are drawn in float32 on the CPU in parameter order, then cast.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in module.named_parameters():
        if param.device.type == "meta":
            continue
        shape = tuple(param.shape)
        if name.endswith(".scale") or (param.ndim == 1 and not name.endswith(".bias")):
            values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            values = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] if len(shape) > 1 else shape[0]
            values = torch.randn(shape, generator=gen) / fan_in ** 0.5
        param.copy_(values.to(dtype=param.dtype))


# --------------------------------------------------------------------------------------------------
# Weight mapping
# --------------------------------------------------------------------------------------------------

_Rule = tuple[str, tuple[str, ...], "tuple[int, ...] | None", bool]  # comfy key, diffusers keys, split, swap


def _pair(comfy: str, diffusers: str, out: list[_Rule], bias: bool = True) -> None:
    for end in ("weight", "bias") if bias else ("weight",):
        out.append((f"{comfy}.{end}", (f"{diffusers}.{end}",), None, False))


def _split(comfy: str, diffusers: tuple[str, ...], sizes: tuple[int, ...], out: list[_Rule]) -> None:
    for end in ("weight", "bias"):
        out.append((f"{comfy}.{end}", tuple(f"{d}.{end}" for d in diffusers), sizes, False))


def _flux_rules(layout: FluxLayout) -> list[_Rule]:
    """One rule per ComfyUI tensor: which diffusers tensor(s) it becomes and how."""
    hidden, mlp = layout.hidden_size, layout.mlp_hidden_dim
    rules: list[_Rule] = []
    _pair("img_in", "x_embedder", rules)
    _pair("txt_in", "context_embedder", rules)
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if layout.guidance_embed:
        embedders.append(("guidance_in", "guidance_embedder"))
    for comfy, diffusers in embedders:
        _pair(f"{comfy}.in_layer", f"time_text_embed.{diffusers}.linear_1", rules)
        _pair(f"{comfy}.out_layer", f"time_text_embed.{diffusers}.linear_2", rules)

    qkv = (hidden, hidden, hidden)
    for i in range(layout.depth_double):
        c, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        _pair(f"{c}.img_mod.lin", f"{d}.norm1.linear", rules)
        _pair(f"{c}.txt_mod.lin", f"{d}.norm1_context.linear", rules)
        _split(f"{c}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), qkv, rules)
        _split(f"{c}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"),
               qkv, rules)
        for comfy_norm, diffusers_norm in (("img_attn.norm.query_norm", "attn.norm_q"),
                                           ("img_attn.norm.key_norm", "attn.norm_k"),
                                           ("txt_attn.norm.query_norm", "attn.norm_added_q"),
                                           ("txt_attn.norm.key_norm", "attn.norm_added_k")):
            rules.append((f"{c}.{comfy_norm}.scale", (f"{d}.{diffusers_norm}.weight",), None, False))
        _pair(f"{c}.img_attn.proj", f"{d}.attn.to_out.0", rules)
        _pair(f"{c}.txt_attn.proj", f"{d}.attn.to_add_out", rules)
        _pair(f"{c}.img_mlp.0", f"{d}.ff.net.0.proj", rules)
        _pair(f"{c}.img_mlp.2", f"{d}.ff.net.2", rules)
        _pair(f"{c}.txt_mlp.0", f"{d}.ff_context.net.0.proj", rules)
        _pair(f"{c}.txt_mlp.2", f"{d}.ff_context.net.2", rules)

    for i in range(layout.depth_single):
        c, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        _split(f"{c}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
               (hidden, hidden, hidden, mlp), rules)
        _pair(f"{c}.linear2", f"{d}.proj_out", rules)
        rules.append((f"{c}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), None, False))
        rules.append((f"{c}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), None, False))
        _pair(f"{c}.modulation.lin", f"{d}.norm.linear", rules)

    _pair("final_layer.linear", "proj_out", rules)
    for end in ("weight", "bias"):
        rules.append((f"final_layer.adaLN_modulation.1.{end}", (f"norm_out.linear.{end}",), None, True))
    return rules


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_keys(state_dict: Mapping[str, torch.Tensor], expected: set[str], side: str) -> None:
    unmapped = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    if unmapped or missing:
        raise ValueError(f"{side} FLUX state dict does not fit the layout: unmapped keys {unmapped}, "
                         f"missing keys {missing}")


def comfy_to_diffusers_flux(state_dict: Mapping[str, torch.Tensor], layout: FluxLayout) -> dict[str, torch.Tensor]:
    """ComfyUI ``diffusion_model`` keys -> ``FluxTransformer2DModel`` keys (splits fused q/k/v(/mlp),
    swaps the final shift/scale). Split tensors are views of the input. Raises ValueError on any key
    that does not map, or a fused tensor whose size does not fit the layout."""
    rules = _flux_rules(layout)
    _check_keys(state_dict, {r[0] for r in rules}, "ComfyUI")
    out: dict[str, torch.Tensor] = {}
    for comfy_key, diffusers_keys, sizes, swap in rules:
        tensor = state_dict[comfy_key]
        if sizes is not None:
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{comfy_key} has {tensor.shape[0]} outputs, layout expects {sum(sizes)} {sizes}")
            out.update(zip(diffusers_keys, torch.split(tensor, list(sizes), dim=0)))
        else:
            out[diffusers_keys[0]] = _swap_halves(tensor) if swap else tensor
    return out


def diffusers_to_comfy_flux(state_dict: Mapping[str, torch.Tensor], layout: FluxLayout) -> dict[str, torch.Tensor]:
    """``FluxTransformer2DModel`` keys -> ComfyUI ``diffusion_model`` keys; the exact inverse of
    :func:`comfy_to_diffusers_flux`. Raises ValueError on any key that does not map."""
    rules = _flux_rules(layout)
    _check_keys(state_dict, {k for r in rules for k in r[1]}, "diffusers")
    out: dict[str, torch.Tensor] = {}
    for comfy_key, diffusers_keys, sizes, swap in rules:
        if sizes is not None:
            parts = [state_dict[k] for k in diffusers_keys]
            for key, part, size in zip(diffusers_keys, parts, sizes):
                if part.shape[0] != size:
                    raise ValueError(f"{key} has {part.shape[0]} outputs, layout expects {size}")
            out[comfy_key] = torch.cat(parts, dim=0)
        else:
            tensor = state_dict[diffusers_keys[0]]
            out[comfy_key] = _swap_halves(tensor) if swap else tensor
    return out


# --------------------------------------------------------------------------------------------------
# diffusers side
# --------------------------------------------------------------------------------------------------


def diffusers_flux_config(layout: FluxLayout) -> dict[str, Any]:
    """``FluxTransformer2DModel`` constructor arguments for this layout (patch_size 1: tokens come packed)."""
    if layout.mlp_ratio != 4.0 or layout.theta != 10000:
        raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio=4 and theta=10000; "
                         f"layout has mlp_ratio={layout.mlp_ratio}, theta={layout.theta}")
    return {
        "patch_size": 1,
        "in_channels": layout.in_channels,
        "out_channels": None,
        "num_layers": layout.depth_double,
        "num_single_layers": layout.depth_single,
        "attention_head_dim": layout.head_dim,
        "num_attention_heads": layout.num_heads,
        "joint_attention_dim": layout.context_dim,
        "pooled_projection_dim": layout.vec_in_dim,
        "guidance_embeds": layout.guidance_embed,
        "axes_dims_rope": tuple(layout.axes_dim),
    }


def build_diffusers_flux(layout: FluxLayout, state_dict_diffusers: Mapping[str, torch.Tensor] | None = None,
                         dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> Any:
    """A ``diffusers.FluxTransformer2DModel`` of this layout, in eval mode, loading ``state_dict_diffusers``
    strictly when given (else diffusers' own init). ``device="meta"`` builds it without memory."""
    from diffusers import FluxTransformer2DModel

    device = torch.device(device) if device is not None else None
    config = diffusers_flux_config(layout)
    if device is not None and device.type == "meta":
        with torch.device("meta"):
            model = FluxTransformer2DModel(**config)
        model = model.to(dtype=dtype)
        if state_dict_diffusers is not None:
            model.load_state_dict(dict(state_dict_diffusers), strict=True, assign=True)
        return model.eval()
    model = FluxTransformer2DModel(**config).to(dtype=dtype)
    if state_dict_diffusers is not None:
        model.load_state_dict(dict(state_dict_diffusers), strict=True)
    if device is not None:
        model = model.to(device)
    return model.eval()


def pack_latent(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``process_img``: pad to even size (circular), 2x2 patches -> tokens [B, h*w, C*4] in
    ``(c, ph, pw)`` order, and image ids [h*w, 3] = ``(0, row, col)``."""
    b, c, height, width = latent.shape
    pad_h, pad_w = (-height) % PATCH_SIZE, (-width) % PATCH_SIZE
    if pad_h or pad_w:
        latent = F.pad(latent, (0, pad_w, 0, pad_h), mode="circular")
    h, w = latent.shape[2] // PATCH_SIZE, latent.shape[3] // PATCH_SIZE
    tokens = latent.reshape(b, c, h, PATCH_SIZE, w, PATCH_SIZE).permute(0, 2, 4, 1, 3, 5)
    tokens = tokens.reshape(b, h * w, c * PATCH_SIZE * PATCH_SIZE)
    ids = torch.zeros(h, w, 3, device=latent.device, dtype=torch.float32)
    ids[..., 1] = torch.arange(h, device=latent.device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w, device=latent.device, dtype=torch.float32)[None, :]
    return tokens, ids.reshape(h * w, 3)


def unpack_latent(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latent`: tokens [B, h*w, C*4] -> latent [B, C, height, width] (crops padding)."""
    b, _, packed = tokens.shape
    c = packed // (PATCH_SIZE * PATCH_SIZE)
    h, w = -(-height // PATCH_SIZE), -(-width // PATCH_SIZE)
    latent = tokens.reshape(b, h, w, c, PATCH_SIZE, PATCH_SIZE).permute(0, 3, 1, 4, 2, 5)
    return latent.reshape(b, c, h * PATCH_SIZE, w * PATCH_SIZE)[:, :, :height, :width]


def diffusers_flux_forward(model: Any, latent: torch.Tensor, timestep_sigma: torch.Tensor, context: torch.Tensor,
                           y: torch.Tensor | None, guidance: torch.Tensor | None = None,
                           joint_attention_kwargs: dict | None = None) -> torch.Tensor:
    """Run a ``FluxTransformer2DModel`` the way ComfyUI runs its FLUX: latent [B,16,H,W] -> [B,16,H,W].

    sigma and guidance are passed unscaled (diffusers multiplies both by 1000 itself, as ComfyUI's
    ``timestep_embedding`` does). ``y=None`` means zeros (as in ComfyUI). guidance is ignored by a
    model without a guidance embedder, and required by one with it.
    """
    dtype = model.dtype
    b, _, height, width = latent.shape
    tokens, img_ids = pack_latent(latent.to(dtype))
    txt_ids = torch.zeros(context.shape[1], 3, device=latent.device, dtype=torch.float32)
    if y is None:
        y = torch.zeros(b, model.config.pooled_projection_dim, device=latent.device, dtype=dtype)
    if model.config.guidance_embeds:
        if guidance is None:
            raise ValueError("this FLUX has a guidance embedder: pass guidance (ComfyUI's default is 3.5)")
        guidance = guidance.to(device=latent.device, dtype=dtype)
    else:
        guidance = None
    out = model(hidden_states=tokens, encoder_hidden_states=context.to(dtype), pooled_projections=y.to(dtype),
                timestep=timestep_sigma.to(device=latent.device, dtype=dtype), img_ids=img_ids, txt_ids=txt_ids,
                guidance=guidance, joint_attention_kwargs=joint_attention_kwargs, return_dict=False)[0]
    return unpack_latent(out, height, width)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (works on meta models)."""
    return sum(p.numel() for p in model.parameters())


__all__: list[str] = [
    "FluxLayout", "init_flux_parameters", "comfy_to_diffusers_flux", "diffusers_to_comfy_flux", "diffusers_flux_config",
    "build_diffusers_flux", "diffusers_flux_forward", "pack_latent", "unpack_latent", "count_parameters",
]
