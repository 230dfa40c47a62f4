"""Apply Omni-Attribute: attribute tokens into a FLUX MODEL through the adapter's IP-Adapter.

The injection is installed on a MODEL clone with ModelPatcher mechanisms only:

* ``dit`` double/single block-replacement patches (chained to a patch already on the block, so two
  Apply nodes stack) that give the block call an attention override adding the IP term;
* a DIFFUSION_MODEL wrapper that records the text length and image-token grid of the call;
* the IP modules as an additional model, so ComfyUI loads and offloads them with the DiT.

What acts on which batch row is the library's :class:`~omni_attribute.injection.Injection`; this
module only reads ComfyUI's ``transformer_options`` for it.
"""

from __future__ import annotations

import logging
import uuid

import comfy.ldm.flux.model
import comfy.model_patcher
import comfy.patcher_extension
import folder_paths
import torch
from comfy_api.latest import io

from omni_attribute.adapter_file import load_adapter
from omni_attribute.errors import AdapterMismatchError
from omni_attribute.injection import AttributeCondition, Injection, Plan, SigmaWindow
from omni_attribute.ip_adapter import IPAdapter, IPBlock, load_ip_adapter

from . import folders
from .sockets import Embeds

# transformer_options keys shared between the patches of one forward pass
TXT_LEN = "omni_attribute_txt_len"
GRID = "omni_attribute_grid"                # (rows, cols) of the image-token grid
COND_CONDITIONS = "omni_attribute_cond"     # {cond uuid: [AttributeCondition]}: per-condition tokens set by a guider

SUPPORTED = "FLUX.1 models (dev, schnell and fine-tunes of that architecture)"
APPLY_TO = {"all conditions": None, "positive only": frozenset({0})}
COMBINE = ["all rows together", "one row per batch item"]


# ---- the adapter and its inputs -----------------------------------------------------------------

def load_ip(adapter: str) -> IPAdapter:
    path = folder_paths.get_full_path_or_raise(folders.ADAPTERS, adapter)
    file = load_adapter(path)
    return load_ip_adapter(file.metadata.generator, file.section("ip_adapter"), adapter)


def check_embeds_width(tokens: torch.Tensor, made_by: str | None, ip: IPAdapter, adapter: str) -> None:
    """Attribute tokens must have the width the IP-Adapter takes."""
    width = tokens.shape[-1]
    if width != ip.config.context_dim:
        raise AdapterMismatchError(
            f"the embeds are {width} wide but {adapter}'s IP-Adapter takes {ip.config.context_dim}-wide tokens: "
            "encode with the encoder of the same adapter"
        )
    if made_by and made_by != adapter:
        logging.warning("Omni-Attribute: embeds were encoded with %s but are applied with %s", made_by, adapter)


def sigma_window(model: comfy.model_patcher.ModelPatcher, condition: AttributeCondition) -> SigmaWindow:
    return condition.sigma_window(model.get_model_object("model_sampling").percent_to_sigma)


def mask_weights(mask) -> torch.Tensor | None:
    return None if mask is None else mask.float().clamp(0, 1)


# ---- installation on a MODEL clone --------------------------------------------------------------

def flux_diffusion_model(model: comfy.model_patcher.ModelPatcher):
    """The FLUX.1 DiT inside a MODEL, or an error that names what the MODEL is."""
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


def call_plan(injection: Injection, options: dict, batch: int, n_img: int, device, dtype) -> Plan | None:
    """The injection's plan for this forward pass, from ComfyUI's ``transformer_options``; built once per
    pass (ComfyUI hands every block the same options dict)."""
    slot = f"{injection.key}_plan_{id(injection)}_{n_img}"
    if slot not in options:
        kinds = list(options.get("cond_or_uncond") or [0])
        sigmas = options.get("sigmas")
        options[slot] = injection.plan(
            kinds, list(options.get("uuids") or [None] * len(kinds)), batch, n_img,
            sigma=float(sigmas.max()) if sigmas is not None else None,
            per_condition=options.get(COND_CONDITIONS), grid=options.get(GRID), device=device, dtype=dtype)
    return options[slot]


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


def _with_override(args: dict, block: IPBlock, plan: Plan, positions: slice) -> dict:
    options = args["transformer_options"]
    override = attention_override(options.get("optimized_attention_override"), block, plan, positions)
    return {**args, "transformer_options": {**options, "optimized_attention_override": override}}


def _existing_patch(model, block_name: str, index: int):
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    return replace.get((block_name, index))


def _double_patch(injection: Injection, index: int, flipped: bool, previous):
    block = injection.ip.block("double", index)

    def patch(args, extra):
        options = args["transformer_options"]
        img, txt = args["img"], args["txt"]
        options[TXT_LEN] = txt.shape[1]
        plan = call_plan(injection, options, img.shape[0], img.shape[1], img.device, img.dtype)
        if plan is not None:
            n_txt, n_img = txt.shape[1], img.shape[1]
            args = _with_override(args, block, plan, slice(0, n_img) if flipped else slice(n_txt, n_txt + n_img))
        return previous(args, extra) if previous else extra["original_block"](args)
    return patch


def _single_patch(injection: Injection, index: int, previous):
    block = injection.ip.block("single", index)

    def patch(args, extra):
        options = args["transformer_options"]
        joint = args["img"]  # text and image tokens, concatenated
        n_txt = options[TXT_LEN]
        n_img = joint.shape[1] - n_txt
        plan = call_plan(injection, options, joint.shape[0], n_img, joint.device, joint.dtype)
        if plan is not None:
            args = _with_override(args, block, plan, slice(n_txt, n_txt + n_img))
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


def ip_patcher(ip: IPAdapter, model) -> comfy.model_patcher.ModelPatcher:
    """One ModelPatcher per IP module, living as long as the module (ComfyUI warns about a leak when a
    loaded model outlives its patcher)."""
    patcher = getattr(ip, "_omni_attribute_patcher", None)
    if patcher is None or patcher.load_device != model.load_device:
        patcher = comfy.model_patcher.ModelPatcher(ip, load_device=model.load_device, offload_device=model.offload_device)
        ip._omni_attribute_patcher = patcher
    return patcher


# ---- the node -------------------------------------------------------------------------------------

class ApplyOmniAttribute(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniAttributeApply",
            display_name="Apply Omni-Attribute",
            category="Omni-Attribute",
            description=("Injects attribute embeddings into a FLUX.1 model through the adapter's IP-Adapter "
                         "(returns a patched copy; the input MODEL is left unchanged). Chain several to stack."),
            inputs=[
                io.Model.Input("model"),
                Embeds.Input("embeds"),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="the adapter the embeds were encoded with (its IP-Adapter weights are used)"),
                io.Float.Input("weight", default=1.0, min=-2.0, max=5.0, step=0.05),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="all conditions",
                               tooltip="positive only: the negative/unconditional pass gets no attribute tokens"),
                io.Combo.Input("combine", options=COMBINE, default=COMBINE[0],
                               tooltip="several embeds rows: act together (tokens concatenated) or one per batch item"),
                io.Mask.Input("mask", optional=True, tooltip="where the attribute acts (white = full weight)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, embeds, adapter: str, weight: float, start_percent: float, end_percent: float,
                apply_to: str, combine: str, mask=None) -> io.NodeOutput:
        if start_percent > end_percent:
            raise ValueError(f"start_percent {start_percent} is after end_percent {end_percent}: swap them")
        ip = load_ip(adapter)
        check_embeds_width(embeds.tokens, embeds.info.get("adapter"), ip, adapter)
        condition = embeds.condition(weight, start_percent, end_percent)
        injection = Injection(ip=ip, condition=condition, window=sigma_window(model, condition),
                              per_batch_item=combine == COMBINE[1], apply_to=APPLY_TO[apply_to],
                              mask=mask_weights(mask))
        return io.NodeOutput(apply_injection(model, injection))
