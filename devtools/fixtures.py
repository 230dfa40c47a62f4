"""Tiny configurations of the real architectures, for tests, benchmarks and the laboratory.

They are real transformers models, only small: a Qwen2.5-VL with 2 layers of width 64 and the real
Qwen2.5 tokenizer (a downloaded asset: ComfyUI ships it in comfy/text_encoders/qwen25_tokenizer, and
the provisioned ComfyUI copy is where we take it from; nothing of ComfyUI is imported).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from omni_attribute.adapter_file import AdapterMetadata
from omni_attribute.backbone import TOKENIZER_FILES
from omni_attribute.train.config import AdapterConfig

from .comfy_host import comfyui_root


def qwen25_tokenizer_dir() -> Path:
    """The real Qwen2.5 tokenizer files (vocab, merges, config), from the provisioned ComfyUI's data."""
    return comfyui_root() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def copy_tokenizer(source: str | Path, folder: str | Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(Path(source) / name, Path(folder) / name)


def make_qwen25vl_7b_config_folder(folder: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """A Qwen2.5-VL-7B-Instruct folder without weights (config.json + tokenizer): full-size shapes on meta."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).parent / "qwen2_5_vl_7b_instruct.json", folder / "config.json")
    copy_tokenizer(tokenizer_dir or qwen25_tokenizer_dir(), folder)
    return folder


def tiny_qwen25vl_config(hidden_size: int = 64, layers: int = 2, vision_hidden: int = 32, vision_depth: int = 2,
                         rope_theta: float = 1_000_000.0, mlp_ratio: int = 2):
    from transformers import Qwen2_5_VLConfig

    heads = 4
    head_dim = hidden_size // heads
    section = head_dim // 2  # mrope sections (temporal, height, width) must add up to head_dim / 2
    mrope = [section - 2 * (section // 3), section // 3, section // 3]
    return Qwen2_5_VLConfig(
        vocab_size=151936, hidden_size=hidden_size, intermediate_size=mlp_ratio * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
        rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=rope_theta, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
        image_token_id=151655, video_token_id=151656,
        vision_config={
            "depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
            "num_heads": 2, "out_hidden_size": hidden_size,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [vision_depth - 1],
        },
    )


def make_tiny_backbone_folder(folder: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2,
                              tokenizer_dir: str | Path | None = None, vision_hidden: int = 32,
                              vision_depth: int = 2, rope_theta: float = 1_000_000.0, mlp_ratio: int = 2) -> Path:
    """Write an HF-format tiny Qwen2.5-VL folder (config.json, model.safetensors, tokenizer files)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(
        tiny_qwen25vl_config(hidden_size, layers, vision_hidden, vision_depth, rope_theta, mlp_ratio))
    model.save_pretrained(str(folder), safe_serialization=True)
    copy_tokenizer(tokenizer_dir or qwen25_tokenizer_dir(), folder)
    return folder


TINY_ADAPTER = AdapterConfig(num_tokens=4, connector_width=32, connector_layers=2, connector_heads=2, lora_r=4,
                             lora_alpha=4, min_pixels=28 * 28, max_pixels=112 * 112)


def tiny_adapter_metadata(backbone_info: dict, out_dim: int = 64, num_tokens: int = 4,
                          generator: dict | None = None) -> AdapterMetadata:
    settings = replace(TINY_ADAPTER, num_tokens=num_tokens)
    return settings.metadata(backbone_info, out_dim, {"note": "untrained tiny fixture: random connector and LoRA"},
                             generator)


def make_untrained_adapter(backbone_folder: str | Path, adapter_path: str | Path, seed: int = 0,
                           out_dim: int = 64, num_tokens: int = 4, generator_layout=None,
                           ip_blocks: tuple[str, str] = ("all", "all")) -> Path:
    """A randomly initialised adapter for a tiny backbone (LoRA B and IP values randomised too, so they act).

    With ``generator_layout`` (a FluxLayout) it carries IP-Adapter weights for that DiT.
    """
    from omni_attribute.backbone import load_backbone
    from omni_attribute.encoder import build_encoder
    from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig, generator_metadata

    backbone = load_backbone(backbone_folder)
    torch.manual_seed(seed)
    metadata = tiny_adapter_metadata(backbone.info(), out_dim, num_tokens)
    ip = None
    if generator_layout is not None:
        config = IPAdapterConfig.for_layout(generator_layout, *ip_blocks, context_dim=out_dim)
        metadata.generator = generator_metadata(generator_layout, config)
        ip = IPAdapter(config)
    encoder = build_encoder(backbone, metadata)
    with torch.no_grad():
        for name, param in encoder.mllm.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.02)
        if ip is not None:
            for name, param in ip.named_parameters():
                if "to_v" in name:
                    param.normal_(0.0, out_dim ** -0.5)
    encoder.save_adapter(adapter_path, ip_adapter=dict(ip.state_dict()) if ip is not None else None)
    return Path(adapter_path)


def comfy_shaped_qwen25vl_config(hidden_size: int = 256, layers: int = 2, vision_hidden: int = 160,
                                 vision_depth: int = 2):
    """A tiny Qwen2.5-VL with the head sizes, rope and window attention ComfyUI's Qwen25_7BVLI hard-codes
    (text heads of 128, mrope [16, 24, 24], vision heads of 80, window 112, full attention at 7/15/23/31),
    so that its weights in ComfyUI's layout load into ComfyUI's own classes."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vocab_size=151936, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=hidden_size // 128, num_key_value_heads=1, max_position_embeddings=128000,
        rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1_000_000.0,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
        vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
        image_token_id=151655, video_token_id=151656,
        vision_config={
            "depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
            "num_heads": vision_hidden // 80, "out_hidden_size": hidden_size, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
    )


def comfy_layout_state_dict(hf_state: dict[str, torch.Tensor], fp8_scaled: bool = False,
                            dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """transformers' Qwen2.5-VL tensors under ComfyUI's names (as in qwen_2.5_vl_7b.safetensors, lm_head
    included). ``fp8_scaled``: as qwen_2.5_vl_7b_fp8_scaled.safetensors stores them: every Linear weight in
    float8_e4m3fn with a float32 per-tensor ``<layer>.scale_weight``, and the ``scaled_fp8`` marker."""
    from omni_attribute.comfy_text_encoder_file import comfy_key

    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        key = comfy_key(name)
        tensor = tensor.detach().to(dtype).contiguous()
        linear = (tensor.ndim == 2 and key.endswith(".weight") and "embed_tokens" not in key and key != "lm_head.weight")
        if fp8_scaled and linear:
            scale = tensor.float().abs().amax() / torch.finfo(torch.float8_e4m3fn).max
            out[key] = (tensor.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor.clone()
    if fp8_scaled:
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def make_tiny_comfy_text_encoder(folder: str | Path, seed: int = 0,
                                 tokenizer_dir: str | Path | None = None) -> dict[str, Path]:
    """One tiny Qwen2.5-VL (ComfyUI-shaped) three ways: an HF folder ('hf'), ComfyUI's bf16 text-encoder file
    ('plain') and its fp8-scaled variant ('fp8'). The weights are rounded to bf16 first, so the HF folder (fp32)
    and the bf16 file hold the same numbers."""
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(comfy_shaped_qwen25vl_config())
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    hf = folder / "tiny-qwen25vl-comfy-shaped"
    model.save_pretrained(str(hf), safe_serialization=True)
    copy_tokenizer(tokenizer_dir or qwen25_tokenizer_dir(), hf)
    state = model.state_dict()
    paths = {"hf": hf, "plain": folder / "qwen_2.5_vl_tiny.safetensors", "fp8": folder / "qwen_2.5_vl_tiny_fp8_scaled.safetensors"}
    save_file(comfy_layout_state_dict(state), str(paths["plain"]))
    save_file(comfy_layout_state_dict(state, fp8_scaled=True), str(paths["fp8"]))
    return paths
