"""Install an Injection on a ComfyUI FLUX MODEL clone with ModelPatcher mechanisms only:

* ``dit`` double/single block-replacement patches (chained to a patch already on the block, so two
  Apply nodes stack) that give the block call an attention override adding the IP term;
* a DIFFUSION_MODEL wrapper that records the text length and image-token grid of the call;
* the IP modules as an additional model, so ComfyUI loads and offloads them with the DiT.
"""

from __future__ import annotations

import uuid

import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..omni_attribute.injection import GRID, TXT_LEN, Injection, attention_override

SUPPORTED = "FLUX.1 models (dev, schnell and fine-tunes of that architecture)"


def flux_diffusion_model(model: comfy.model_patcher.ModelPatcher):
    """The FLUX.1 DiT inside a MODEL, or an error that names what the MODEL is."""
    import comfy.ldm.flux.model

    inner = model.get_model_object("diffusion_model")
    config_name = type(getattr(model.model, "model_config", None)).__name__
    if type(inner) is not comfy.ldm.flux.model.Flux or getattr(inner.params, "global_modulation", False):
        raise ValueError(
            f"Apply Omni-Attribute supports {SUPPORTED}; this MODEL is {type(inner).__name__} "
            f"({config_name}). Load a FLUX.1 model with the standard loaders (UNETLoader / CheckpointLoader)."
        )
    return inner


def record_call_shape(executor, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the text length and the image-token grid of this call."""
    x, context = args[0], args[2]
    options = args[7] if len(args) > 7 else kwargs.get("transformer_options")
    if options is not None:
        options[GRID] = ((x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2)
        options[TXT_LEN] = context.shape[1]
    return executor(*args, **kwargs)


def _existing_patch(model, block_name: str, index: int):
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    return replace.get((block_name, index))


def _double_patch(injection: Injection, index: int, flipped: bool, previous):
    block = injection.ip.block("double", index)

    def patch(args, extra):
        options = args["transformer_options"]
        img, txt = args["img"], args["txt"]
        options[TXT_LEN] = txt.shape[1]
        plan = injection.cached_plan(options, img.shape[0], img.shape[1], img.device, img.dtype)
        if plan is not None:
            n_txt, n_img = txt.shape[1], img.shape[1]
            positions = slice(0, n_img) if flipped else slice(n_txt, n_txt + n_img)
            override = attention_override(options.get("optimized_attention_override"), block, plan, positions)
            args = {**args, "transformer_options": {**options, "optimized_attention_override": override}}
        return previous(args, extra) if previous else extra["original_block"](args)
    return patch


def _single_patch(injection: Injection, index: int, previous):
    block = injection.ip.block("single", index)

    def patch(args, extra):
        options = args["transformer_options"]
        joint = args["img"]  # text and image tokens, concatenated
        n_txt = options[TXT_LEN]
        n_img = joint.shape[1] - n_txt
        plan = injection.cached_plan(options, joint.shape[0], n_img, joint.device, joint.dtype)
        if plan is not None:
            override = attention_override(options.get("optimized_attention_override"), block, plan,
                                          slice(n_txt, n_txt + n_img))
            args = {**args, "transformer_options": {**options, "optimized_attention_override": override}}
        return previous(args, extra) if previous else extra["original_block"](args)
    return patch


def apply_injection(model: comfy.model_patcher.ModelPatcher, injection: Injection) -> comfy.model_patcher.ModelPatcher:
    """A patched clone of ``model``; ``model`` itself is left untouched."""
    inner = flux_diffusion_model(model)
    injection.ip.check_layout(inner.hidden_size, inner.num_heads, len(inner.double_blocks), len(inner.single_blocks),
                              where="this FLUX model")
    patched = model.clone()
    injection.ip.to(dtype=model.model_dtype())
    tag = f"omni_attribute_{uuid.uuid4().hex[:8]}"
    injection.key = tag
    patched.set_additional_models(tag, [ip_patcher(injection.ip, model)])
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, tag, record_call_shape)
    for index in injection.ip.config.double_blocks:
        flipped = bool(getattr(inner.double_blocks[index], "flipped_img_txt", False))
        patch = _double_patch(injection, index, flipped, _existing_patch(patched, "double_block", index))
        patched.set_model_patch_replace(patch, "dit", "double_block", index)
    for index in injection.ip.config.single_blocks:
        patch = _single_patch(injection, index, _existing_patch(patched, "single_block", index))
        patched.set_model_patch_replace(patch, "dit", "single_block", index)
    return patched


def ip_patcher(ip, model) -> comfy.model_patcher.ModelPatcher:
    """One ModelPatcher per IP module, living as long as the module (ComfyUI warns about a leak when a
    loaded model outlives its patcher)."""
    patcher = getattr(ip, "_omni_attribute_patcher", None)
    if patcher is None or patcher.load_device != model.load_device:
        patcher = comfy.model_patcher.ModelPatcher(ip, load_device=model.load_device, offload_device=model.offload_device)
        ip._omni_attribute_patcher = patcher
    return patcher


def sigma_range(model: comfy.model_patcher.ModelPatcher, start_percent: float, end_percent: float) -> tuple[float, float]:
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


def ensure_tensor(mask) -> torch.Tensor | None:
    return None if mask is None else mask.float().clamp(0, 1)
