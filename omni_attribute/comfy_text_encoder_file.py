"""The backbone from ComfyUI's own Qwen2.5-VL text-encoder file (``models/text_encoders/qwen_2.5_vl_7b*.safetensors``,
as shipped for Qwen-Image and HunyuanImage): the same weights as Qwen2.5-VL-7B-Instruct in ComfyUI's layout,
mapped onto transformers' ``Qwen2_5_VLForConditionalGeneration`` without a second download.

ComfyUI's layout (``comfy.text_encoders.llama.Qwen25_7BVLI``) is ``model.*`` for the language model
(transformers: ``model.language_model.*``), ``visual.*`` for the vision tower (``model.visual.*``) and,
in some files, ``lm_head.weight`` (not needed for hidden states: the loaded model ties it to the embedding).
Its fp8-scaled variant stores Linear weights as float8_e4m3fn with a per-tensor ``<layer>.scale_weight``
(and a ``scaled_fp8`` marker); newer files name the scale ``<layer>.weight_scale``. They are dequantised on
load (``weight.float() * scale``), or kept in float8 with ``weight_dtype="fp8_e4m3fn"``.

The config is read off the tensor shapes; what shapes cannot say (head size, rope, window attention)
comes from Qwen2.5-VL-7B-Instruct's config, which ComfyUI's class also hard-codes. Only safetensors
headers and tensors are read: nothing of ComfyUI is imported.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BackboneError
from .float8 import FLOAT8, Float8Linear, quantizable_linears, quantize_rows, replace_module

TEXT_HEAD_DIM = 128      # ComfyUI's Qwen25_7BVLI_Config.head_dim
VISION_HEAD_DIM = 80     # 1280 / 16 heads in Qwen2.5-VL's vision tower
WHICH_FILE = ("qwen_2.5_vl_7b.safetensors or qwen_2.5_vl_7b_fp8_scaled.safetensors (Comfy-Org/Qwen-Image_ComfyUI, "
              "split_files/text_encoders: the Qwen-Image text encoder, which includes the vision tower visual.*)")

# Qwen2.5-VL-7B-Instruct's config.json, for what the tensor shapes do not tell.
QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0, "hidden_act": "silu", "max_position_embeddings": 128000, "max_window_layers": 28,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"hidden_act": "silu", "in_chans": 3, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "temporal_patch_size": 2},
}

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED = re.compile(r"(^scaled_fp8$|^lm_head\.weight$|\.scale_input$|\.input_scale$|\.scale_weight$|\.weight_scale$)")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str          # safetensors' name: BF16, F16, F32, F8_E4M3, ...
    shape: tuple[int, ...]


def is_text_encoder_file(path: str | Path) -> bool:
    """A backbone given as one .safetensors file (ComfyUI's layout) rather than an HF folder."""
    return Path(path).suffix.lower() == ".safetensors"


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes, read from the header only."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"text-encoder file {str(path)!r} does not exist: put {WHICH_FILE} in models/text_encoders")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: TensorInfo(f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BackboneError(f"text-encoder file {path.name!r} is not a readable safetensors file ({exc}): "
                            "re-download it") from exc


def check_qwen25_vl(name: str, header: dict[str, TensorInfo]) -> None:
    """A clear error unless the file is a Qwen2.5-VL in ComfyUI's layout, vision tower included."""
    keys = header.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    need = f"Omni-Attribute needs the Qwen2.5-VL file: {WHICH_FILE}"
    if has("text_model.encoder."):
        raise BackboneError(f"{name} is a CLIP text encoder, not a Qwen2.5-VL model. {need}")
    if has("encoder.block.") or has("shared.weight"):
        raise BackboneError(f"{name} is a T5 text encoder, not a Qwen2.5-VL model. {need}")
    if has("model.language_model.") or has("model.visual."):
        raise BackboneError(f"{name} is in Hugging Face's layout: put the whole model folder (config.json, weights, "
                            "tokenizer) in models/omni_attribute_backbones and pick it as a folder, or use {WHICH_FILE}"
                            .replace("{WHICH_FILE}", WHICH_FILE))
    qwen2 = "model.layers.0.self_attn.k_proj.bias" in keys and "model.embed_tokens.weight" in keys
    if not qwen2 or "model.layers.0.self_attn.q_norm.weight" in keys or has("model.layers.0.post_feedforward_layernorm"):
        raise BackboneError(f"{name} holds no Qwen2.5 language model in ComfyUI's layout (model.layers.*.self_attn "
                            f"with biases), e.g. it is a Llama, Mistral, Gemma or Qwen3 text encoder. {need}")
    if "visual.patch_embed.proj.weight" not in keys or "visual.merger.mlp.0.weight" not in keys:
        raise BackboneError(f"{name} is a Qwen2.5 language model without the vision tower (no visual.* tensors): the "
                            f"encoder reads images, so it needs the file that includes visual.*: {WHICH_FILE}")
    q = header["model.layers.0.self_attn.q_proj.weight"].shape[0]
    if q % TEXT_HEAD_DIM or header["visual.patch_embed.proj.weight"].shape[0] % VISION_HEAD_DIM:
        raise BackboneError(f"{name}: its attention widths are not multiples of Qwen2.5-VL's head sizes "
                            f"({TEXT_HEAD_DIM} text, {VISION_HEAD_DIM} vision): not a Qwen2.5-VL file. {need}")


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def infer_config(header: dict[str, TensorInfo]) -> dict:
    """An HF config dict (as config.json would hold) from the tensor shapes plus the 7B defaults."""
    shape = lambda key: header[key].shape  # noqa: E731
    vocab, hidden = shape("model.embed_tokens.weight")
    vision_hidden = shape("visual.patch_embed.proj.weight")[0]
    merger_in = shape("visual.merger.mlp.0.weight")[1]
    config = json.loads(json.dumps(QWEN25_VL_7B))
    config.update({
        "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": shape("model.layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": _count(header, r"model\.layers\.(\d+)\."),
        "num_attention_heads": shape("model.layers.0.self_attn.q_proj.weight")[0] // TEXT_HEAD_DIM,
        "num_key_value_heads": shape("model.layers.0.self_attn.k_proj.weight")[0] // TEXT_HEAD_DIM,
        # lm_head is not needed for hidden states: tied to the embedding, it costs no memory
        "tie_word_embeddings": True,
    })
    config["max_window_layers"] = config["num_hidden_layers"]
    config["vision_config"].update({
        "depth": _count(header, r"visual\.blocks\.(\d+)\."), "hidden_size": vision_hidden,
        "intermediate_size": shape("visual.blocks.0.mlp.gate_proj.weight")[0],
        "num_heads": vision_hidden // VISION_HEAD_DIM, "out_hidden_size": shape("visual.merger.mlp.2.weight")[0],
        "patch_size": shape("visual.patch_embed.proj.weight")[-1],
        "spatial_patch_size": shape("visual.patch_embed.proj.weight")[-1],
        "temporal_patch_size": shape("visual.patch_embed.proj.weight")[2],
        "spatial_merge_size": math.isqrt(merger_in // vision_hidden),
    })
    return config


def hf_key(comfy_key: str) -> str:
    """ComfyUI's name of a tensor → transformers' name."""
    if comfy_key.startswith("model."):
        return "model.language_model." + comfy_key[len("model."):]
    if comfy_key.startswith("visual."):
        return "model." + comfy_key
    return comfy_key


def comfy_key(hf_name: str) -> str:
    """transformers' name → ComfyUI's (the inverse of hf_key)."""
    if hf_name.startswith("model.language_model."):
        return "model." + hf_name[len("model.language_model."):]
    if hf_name.startswith("model.visual."):
        return hf_name[len("model."):]
    return hf_name


def _scale_of(f, key: str, keys: set[str]) -> torch.Tensor:
    prefix = key[: -len(".weight")]
    for suffix in SCALE_SUFFIXES:
        if prefix + suffix in keys:
            return f.get_tensor(prefix + suffix).float()
    return torch.ones(())


def read_state_dict(path: str | Path, dtype: torch.dtype, keep_fp8: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The file's tensors under transformers' names, in ``dtype``; float8 weights dequantised with their scale.

    For the Linear layers named in ``keep_fp8`` (transformers' module names) the entries are
    ``<layer>.qweight`` (float8_e4m3fn) and ``<layer>.weight_scale`` (per row) instead of ``<layer>.weight``:
    a float8 weight in the file is kept as it is, any other is quantised row by row."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if IGNORED.search(key):
                continue
            name = hf_key(key)
            tensor = f.get_tensor(key)
            fp8 = tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            layer = name[: -len(".weight")] if name.endswith(".weight") else None
            if layer in keep_fp8:
                if fp8 and tensor.dtype == FLOAT8:
                    scale = _scale_of(f, key, keys).reshape(-1, 1).expand(tensor.shape[0], 1).contiguous()
                    q = tensor
                else:
                    q, scale = quantize_rows(tensor.float() * _scale_of(f, key, keys) if fp8 else tensor)
                out[layer + ".qweight"], out[layer + ".weight_scale"] = q, scale
                continue
            if fp8:
                tensor = tensor.float() * _scale_of(f, key, keys)
            out[name] = tensor.to(dtype)
    return out


def build_model(path: str | Path, dtype: torch.dtype, weight_dtype: str = "default"):
    """transformers' Qwen2_5_VLForConditionalGeneration with the file's weights (on the CPU).

    The model is built on the meta device (buffers on the CPU) and the tensors are assigned as read, so the
    weights exist once; with ``weight_dtype="fp8_e4m3fn"`` its Linear layers are Float8Linear from the start."""
    from accelerate import init_empty_weights
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    header = read_header(path)
    check_qwen25_vl(path.name, header)
    config = Qwen2_5_VLConfig(**infer_config(header))
    config._attn_implementation = "sdpa"
    with init_empty_weights(include_buffers=False):
        model = Qwen2_5_VLForConditionalGeneration(config)
    keep: set[str] = set()
    if weight_dtype == "fp8_e4m3fn":
        for name, linear in quantizable_linears(model):
            replace_module(model, name, Float8Linear.empty(linear.in_features, linear.out_features,
                                                           linear.bias is not None, dtype))
            keep.add(name)
    tensors = read_state_dict(path, dtype, keep)
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise BackboneError(
            f"{path.name}: its tensors do not match a Qwen2.5-VL of the sizes its shapes give "
            f"(missing {', '.join(comfy_key(k) for k in missing[:3]) or 'none'}; unexpected "
            f"{', '.join(comfy_key(k) for k in unexpected[:3]) or 'none'}): the file is incomplete or of another model; "
            f"use {WHICH_FILE}")
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise BackboneError(f"{path.name}: tensors of unexpected sizes ({str(exc).splitlines()[-1].strip()[:200]}): "
                            f"the file mixes models or is damaged; use {WHICH_FILE}") from exc
    model.tie_weights()
    return model
