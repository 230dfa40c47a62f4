"""Hand the attribute encoder to ComfyUI's model management (load before use, offload after)."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_devices(device: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for 'default' (ComfyUI's text-encoder device), 'cpu' or 'gpu'."""
    if device == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    load = mm.get_torch_device() if device == "gpu" else mm.text_encoder_device()
    return load, mm.text_encoder_offload_device()


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if mm.should_use_bf16(device) else torch.float16


@dataclass
class EncoderHandle:
    """What the OMNI_ATTRIBUTE_ENCODER socket carries: the encoder and its ModelPatcher (a strong reference)."""
    encoder: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher

    @classmethod
    def wrap(cls, encoder: torch.nn.Module, load_device: torch.device, offload_device: torch.device) -> "EncoderHandle":
        encoder.to(offload_device)
        return cls(encoder, comfy.model_patcher.ModelPatcher(encoder, load_device=load_device, offload_device=offload_device))

    def load(self) -> None:
        # transformers layers are not comfy.ops layers, so partial (low-VRAM) loading cannot split them
        mm.load_models_gpu([self.patcher], force_full_load=True)
