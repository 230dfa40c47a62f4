"""Apply Omni-Attribute: attribute tokens into a FLUX MODEL through the adapter's IP-Adapter.

The injection is installed on a MODEL clone with ModelPatcher mechanisms only:

* ``dit`` double/single block-replacement patches (chained to a patch already on the block, so two
  Apply nodes stack) that give the block call an attention override adding the IP term;
* an APPLY_MODEL wrapper (outside ``torch.compile``'s graph: ComfyUI's TorchCompileModel compiles
  the diffusion model inside that call) that picks the call's prepared plan and its step scale, and a
  DIFFUSION_MODEL wrapper that does the same for direct diffusion-model calls;
* an OUTER_SAMPLE wrapper that opens and closes the plan cache around each sampling run;
* the IP modules as an additional model, so ComfyUI loads and offloads them with the DiT.

What acts on which batch row is the library's :class:`~omni_attribute.injection.Injection`; this
module only reads ComfyUI's ``transformer_options`` for it. Per forward pass the host work is a few
dictionary look-ups: the plan (tokens, masks, scales, every block's K/V of the attribute tokens) is
built once per run and layout and kept on the device; the step's sigma enters as a device-side 0/1
factor, so no step reads a device tensor on the host (no synchronisation) and no Python branch
depends on a tensor value (no graph break under ``torch.compile``).
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
from omni_attribute.errors import AdapterMismatchError, InputError
from omni_attribute.injection import AttributeCondition, Injection, PreparedPlan, SigmaWindow
from omni_attribute.ip_adapter import IPAdapter, IPBlock, load_ip_adapter

from . import folders, inputs
from .search import schema
from .sockets import Embeds

# transformer_options keys shared between the patches of one forward pass
TXT_LEN = "omni_attribute_txt_len"
GRID = "omni_attribute_grid"                # (rows, cols) of the image-token grid
COND_CONDITIONS = "omni_attribute_cond"     # {cond uuid: [AttributeCondition]}: per-condition tokens set by a guider
CALLS = "omni_attribute_calls"              # {injection key: (PreparedPlan, step scale) or None} for this call

SUPPORTED = "FLUX.1 models (dev, schnell and fine-tunes of that architecture)"
APPLY_TO = {"all conditions": None, "positive only": frozenset({0})}
COMBINE = ["all rows together", "one row per batch item"]


# ---- the adapter and its inputs -----------------------------------------------------------------

ADAPTER_WHAT = "Omni-Attribute adapter .safetensors file (with IP-Adapter weights)"
WEIGHT = inputs.Number("weight", 1.0, -2.0, 5.0, 0.05)
START = inputs.Number("start_percent", 0.0, 0.0, 1.0, 0.01)
END = inputs.Number("end_percent", 1.0, 0.0, 1.0, 0.01)


def load_ip(adapter: str) -> IPAdapter:
    path = inputs.resolve_file("adapter", adapter, folders.ADAPTERS, ADAPTER_WHAT)
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
    """The MASK as weights in [0, 1]: a non-empty 2-D or 3-D tensor of finite values (else a clear error)."""
    return None if mask is None else inputs.MASK.require("mask", mask).float().clamp(0, 1)


# ---- installation on a MODEL clone --------------------------------------------------------------

def flux_diffusion_model(model: comfy.model_patcher.ModelPatcher):
    """The FLUX.1 DiT inside a MODEL, or an error that names what the MODEL is."""
    inner = model.get_model_object("diffusion_model")
    config_name = type(getattr(model.model, "model_config", None)).__name__
    if type(inner) is not comfy.ldm.flux.model.Flux or getattr(inner.params, "global_modulation", False):
        raise InputError(
            f"Apply Omni-Attribute supports {SUPPORTED}; this MODEL is {type(inner).__name__} "
            f"({config_name}). Load a FLUX.1 model with the standard loaders (UNETLoader / CheckpointLoader)."
        )
    return inner


def grid_of(x: torch.Tensor) -> tuple[int, int]:
    """The image-token grid (rows, cols) of a latent [B,C,H,W] (FLUX patches of 2×2)."""
    return (x.shape[-2] + 1) // 2, (x.shape[-1] + 1) // 2


def prepare_call(injection: Injection, options: dict, batch: int, device, dtype) -> None:
    """Put this call's prepared plan and step scale into ``transformer_options`` (host work: look-ups in
    the injection's cache; a plan is built only the first time a layout is seen in a run)."""
    kinds = list(options.get("cond_or_uncond") or [0])
    prepared = injection.prepared(kinds, list(options.get("uuids") or [None] * len(kinds)), batch,
                                  per_condition=options.get(COND_CONDITIONS), grid=options.get(GRID),
                                  device=device, dtype=dtype)
    calls = options[CALLS] = dict(options.get(CALLS) or {})  # never write into a dict shared with other calls
    calls[injection.key] = None if prepared is None else (prepared, prepared.scale_at(options.get("sigmas")))


def _options_arg(args: tuple, kwargs: dict, position: int) -> dict | None:
    return args[position] if len(args) > position else kwargs.get("transformer_options")


def model_call_wrapper(injection: Injection):
    """APPLY_MODEL wrapper: runs outside a compiled diffusion model, so the cache look-up is plain Python
    there and the compiled graph only reads the prepared tensors."""
    def wrapper(executor, *args, **kwargs):
        x, context = args[0], args[3] if len(args) > 3 else kwargs.get("c_crossattn")
        options = _options_arg(args, kwargs, 5)
        if options is not None:
            options[GRID] = grid_of(x)
            if context is not None:
                options[TXT_LEN] = context.shape[1]
            base = executor.class_obj
            dtype = base.manual_cast_dtype if base.manual_cast_dtype is not None else base.get_dtype()
            prepare_call(injection, options, x.shape[0], x.device, dtype)
        return executor(*args, **kwargs)
    return wrapper


def diffusion_model_wrapper(injection: Injection):
    """DIFFUSION_MODEL wrapper: the text length and image-token grid of this call, and its plan when the
    diffusion model is called directly (not through ``apply_model``)."""
    def wrapper(executor, *args, **kwargs):
        x, context = args[0], args[2]
        options = _options_arg(args, kwargs, 7)
        if options is not None:
            options[GRID] = grid_of(x)
            options[TXT_LEN] = context.shape[1]
            if injection.key not in (options.get(CALLS) or {}):
                prepare_call(injection, options, x.shape[0], x.device, x.dtype)
        return executor(*args, **kwargs)
    return wrapper


def run_scope(injection: Injection):
    """OUTER_SAMPLE wrapper: the plan cache lives for one sampling run and is emptied when it ends
    (normally or not), so no plan, K/V or condition outlives the run that used it."""
    def wrapper(executor, *args, **kwargs):
        injection.begin_run()
        try:
            return executor(*args, **kwargs)
        finally:
            injection.end_run()
    return wrapper


def call_of(injection: Injection, options: dict, hidden: torch.Tensor, n_img: int
            ) -> tuple[PreparedPlan, torch.Tensor] | None:
    """This call's (prepared plan, step scale), prepared here only if no wrapper ran (a bare call of the
    blocks)."""
    calls = options.get(CALLS)
    if calls is None or injection.key not in calls:
        prepare_call(injection, options, hidden.shape[0], hidden.device, hidden.dtype)
        calls = options[CALLS]
    return calls[injection.key]


def attention_override(previous, block: IPBlock, name: str, call: tuple[PreparedPlan, torch.Tensor], img: slice,
                       n_img: int):
    """An ``optimized_attention_override`` for one block call: the block's own attention (or the
    override already installed, so patches stack), plus the IP term on the image positions, from the
    run's keys/values of the attribute tokens."""
    prepared, scale = call
    k, v = prepared.keys_values[name]
    scale = prepared.fit(scale, n_img)

    def override(func, *args, **kwargs):
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        q = args[0] if args else kwargs["q"]
        keys, values = (k, v) if k.dtype == q.dtype else (k.to(q.dtype), v.to(q.dtype))
        term = block.attend(q[:, :, img], keys, values, prepared.attn_mask, scale)
        out[:, img] += term.to(out.dtype)
        return out
    return override


def _with_override(args: dict, block: IPBlock, name: str, call, positions: slice, n_img: int) -> dict:
    options = args["transformer_options"]
    override = attention_override(options.get("optimized_attention_override"), block, name, call, positions, n_img)
    return {**args, "transformer_options": {**options, "optimized_attention_override": override}}


def _existing_patch(model, block_name: str, index: int):
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    return replace.get((block_name, index))


def _double_patch(injection: Injection, index: int, flipped: bool, previous):
    block, name = injection.ip.block("double", index), f"double.{index}"

    def patch(args, extra):
        options = args["transformer_options"]
        img, txt = args["img"], args["txt"]
        options[TXT_LEN] = txt.shape[1]
        n_txt, n_img = txt.shape[1], img.shape[1]
        call = call_of(injection, options, img, n_img)
        if call is not None:
            positions = slice(0, n_img) if flipped else slice(n_txt, n_txt + n_img)
            args = _with_override(args, block, name, call, positions, n_img)
        return previous(args, extra) if previous else extra["original_block"](args)
    return patch


def _single_patch(injection: Injection, index: int, previous):
    block, name = injection.ip.block("single", index), f"single.{index}"

    def patch(args, extra):
        options = args["transformer_options"]
        joint = args["img"]  # text and image tokens, concatenated
        n_txt = options[TXT_LEN]
        n_img = joint.shape[1] - n_txt
        call = call_of(injection, options, joint, n_img)
        if call is not None:
            args = _with_override(args, block, name, call, slice(n_txt, n_txt + n_img), n_img)
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
    wrappers = comfy.patcher_extension.WrappersMP
    patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, tag, run_scope(injection))
    patched.add_wrapper_with_key(wrappers.APPLY_MODEL, tag, model_call_wrapper(injection))
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, tag, diffusion_model_wrapper(injection))
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
        return schema(
            node_id="OmniAttributeApply",
            display_name="Apply Omni-Attribute",
            category="Omni-Attribute",
            description=("Attribute transfer from a reference image (personalization): injects attribute "
                         "embeddings into a FLUX.1 model through the adapter's IP-Adapter (returns a patched copy; "
                         "the input MODEL is left unchanged). Chain several to stack."),
            inputs=[
                io.Model.Input("model"),
                Embeds.Input("embeds"),
                io.Combo.Input("adapter", options=folder_paths.get_filename_list(folders.ADAPTERS),
                               tooltip="the adapter the embeds were encoded with (its IP-Adapter weights are used)"),
                WEIGHT.input(),
                START.input(),
                END.input(),
                io.Combo.Input("apply_to", options=list(APPLY_TO), default="all conditions",
                               tooltip="positive only: the negative/unconditional pass gets no attribute tokens"),
                io.Combo.Input("combine", options=COMBINE, default=COMBINE[0],
                               tooltip="several embeds rows: act together (tokens concatenated) or one per batch item"),
                io.Mask.Input("mask", optional=True, tooltip="where the attribute acts (white = full weight)"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def validate_inputs(cls, embeds=None, adapter=None, weight=None, start_percent=None, end_percent=None,
                        apply_to=None, combine=None) -> bool | str:
        return inputs.verdict(*cls.problems(weight, start_percent, end_percent, apply_to, combine),
                              inputs.EMBEDS.literal_problem("embeds", embeds),
                              inputs.file_problem("adapter", adapter, folders.ADAPTERS, ADAPTER_WHAT))

    @staticmethod
    def problems(weight, start_percent, end_percent, apply_to, combine) -> list[str | None]:
        return [WEIGHT.problem(weight), START.problem(start_percent), END.problem(end_percent),
                inputs.schedule_problem(start_percent, end_percent),
                inputs.choice_problem("apply_to", apply_to, APPLY_TO),
                inputs.choice_problem("combine", combine, COMBINE)]

    @classmethod
    def execute(cls, model, embeds, adapter: str, weight: float, start_percent: float, end_percent: float,
                apply_to: str, combine: str, mask=None) -> io.NodeOutput:
        inputs.ensure(*cls.problems(weight, start_percent, end_percent, apply_to, combine))
        inputs.model_socket().require("model", model)
        inputs.EMBEDS.require("embeds", embeds)
        ip = load_ip(adapter)
        check_embeds_width(embeds.tokens, embeds.info.get("adapter"), ip, adapter)
        condition = embeds.condition(weight, start_percent, end_percent)
        injection = Injection(ip=ip, condition=condition, window=sigma_window(model, condition),
                              per_batch_item=combine == COMBINE[1], apply_to=APPLY_TO[apply_to],
                              mask=mask_weights(mask))
        return io.NodeOutput(apply_injection(model, injection))
