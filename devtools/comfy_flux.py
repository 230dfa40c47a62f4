"""ComfyUI's own FLUX built from a :class:`~omni_attribute.flux_models.FluxLayout` (tiny, or full size on
the meta device), and run directly: for tests, benchmarks and the laboratory. The plugin never builds
FLUX itself (users load it with ComfyUI's standard loaders, which detect only full-size models), so
this is dev tooling, not shipped code.
"""

from __future__ import annotations

from typing import Any

import torch

from omni_attribute.flux_models import PATCH_SIZE, FluxLayout, init_flux_parameters


def comfy_unet_config(layout: FluxLayout) -> dict[str, Any]:
    """The ``unet_config`` that ``comfy.supported_models.Flux`` takes (as model_detection would build it)."""
    return {
        "image_model": "flux",
        "in_channels": layout.latent_channels,
        "out_channels": layout.latent_channels,
        "patch_size": PATCH_SIZE,
        "vec_in_dim": layout.vec_in_dim,
        "context_in_dim": layout.context_dim,
        "hidden_size": layout.hidden_size,
        "mlp_ratio": layout.mlp_ratio,
        "num_heads": layout.num_heads,
        "depth": layout.depth_double,
        "depth_single_blocks": layout.depth_single,
        "axes_dim": list(layout.axes_dim),
        "theta": layout.theta,
        "qkv_bias": True,
        "guidance_embed": layout.guidance_embed,
    }


def build_comfy_flux(layout: FluxLayout, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None, sampling_shift: float | None = None) -> Any:
    """A ComfyUI ``model_base.Flux`` (a ``BaseModel``) of this layout, its weights initialised from ``seed``.

    ``device="meta"`` builds it without memory (no initialisation). FLUX.1-schnell-like layouts
    (no guidance embedder) use ``supported_models.FluxSchnell`` (flow model type), others ``Flux``.
    """
    import comfy.supported_models as supported_models  # ComfyUI configured by the caller (see comfy_host)

    config_class = supported_models.Flux if layout.guidance_embed else supported_models.FluxSchnell
    model_config = config_class(comfy_unet_config(layout))
    if sampling_shift is not None:  # ComfyUI's default shift (1.15 dev, 1.0 schnell) unless the model says otherwise
        model_config.sampling_settings = {**model_config.sampling_settings, "shift": sampling_shift}
    model_config.set_inference_dtype(dtype, None)
    device = torch.device(device) if device is not None else None
    model = model_config.get_model({}, "", device=device)
    if device is None or device.type != "meta":
        init_flux_parameters(model.diffusion_model, seed)
    return model


def _diffusion_model(model: Any) -> torch.nn.Module:
    return model.diffusion_model if hasattr(model, "diffusion_model") else model


def comfy_flux_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The diffusion model's state dict (keys without ``diffusion_model.``), detached."""
    return {k: v.detach() for k, v in _diffusion_model(model).state_dict().items()}


def comfy_flux_forward(model: Any, latent: torch.Tensor, timestep_sigma: torch.Tensor, context: torch.Tensor,
                       y: torch.Tensor | None, guidance: torch.Tensor | None = None,
                       transformer_options: dict | None = None) -> torch.Tensor:
    """Run ComfyUI's FLUX diffusion model directly: latent [B,16,H,W] -> velocity [B,16,H,W].

    Inputs are cast as ``BaseModel._apply_model`` would (model dtype; sigma as float32, since
    ``ModelSamplingFlux.timestep(sigma) == sigma``).
    """
    net = _diffusion_model(model)
    dtype = net.dtype if isinstance(getattr(net, "dtype", None), torch.dtype) else latent.dtype
    return net(
        latent.to(dtype),
        timestep_sigma.float(),
        context.to(dtype),
        y=None if y is None else y.to(dtype),
        guidance=None if guidance is None else guidance.to(dtype),
        transformer_options={} if transformer_options is None else transformer_options,
    )
