"""LoRA on the MLLM through peft. The backbone stays frozen; only lora_A / lora_B train.

Adapter files store LoRA tensors by their module path in the HF model, without peft's adapter
name (``...q_proj.lora_A.weight``), so the file does not depend on peft internals.
"""

from __future__ import annotations

import re

import torch

from .errors import AdapterFileError, AdapterMismatchError

ADAPTER_NAME = "default"
# Attention and MLP projections of the language model only; the vision tower has modules with
# the same names (mlp.gate_proj ...), which the anchored pattern leaves alone.
DEFAULT_TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
DEFAULT_LORA = {"r": 32, "alpha": 32, "dropout": 0.0, "target_modules": DEFAULT_TARGETS}


def apply_lora(model: torch.nn.Module, lora: dict) -> torch.nn.Module:
    """Inject LoRA layers in place (lora_B starts at zero, so the model's function is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=lora["target_modules"], bias="none",
    )
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise AdapterMismatchError(
            f"LoRA target pattern {lora['target_modules']!r} matches no module of this backbone ({exc})"
        ) from exc
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return model


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name.replace(f".{ADAPTER_NAME}.", "."): param.detach()
        for name, param in model.named_parameters() if ".lora_" in name
    }


def load_lora_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Copy stored LoRA tensors into the injected layers; every key and shape must match."""
    params = dict(model.named_parameters())
    expected = {name.replace(f".{ADAPTER_NAME}.", "."): name for name in params if ".lora_" in name}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if not tensors:
        raise AdapterFileError(
            f"{adapter_name}: holds no LoRA weights: the file is incomplete (was its LoRA section stripped?); "
            "re-export it with omni-attribute-train"
        )
    if unexpected:
        raise AdapterMismatchError(
            f"{adapter_name}: {len(unexpected)} LoRA tensors are for modules this backbone does not have (e.g. "
            f"{', '.join(unexpected[:2])}): the adapter was trained on a backbone with another layer count or "
            "with other LoRA targets. Load the backbone it was trained with"
        )
    if missing:
        raise AdapterFileError(
            f"{adapter_name}: lacks {len(missing)} of the {len(expected)} LoRA tensors its own LoRA targets select on "
            f"this backbone (e.g. {', '.join(missing[:2])}): the file is incomplete or was edited; re-export it "
            "with omni-attribute-train"
        )
    with torch.no_grad():
        for key, name in expected.items():
            target, value = params[name], tensors[key]
            if target.shape != value.shape:
                raise AdapterMismatchError(
                    f"{adapter_name}: LoRA tensor {key} has shape {list(value.shape)}, backbone expects "
                    f"{list(target.shape)}: the adapter was trained on a backbone of another size"
                )
            target.copy_(value.to(target.dtype))


def count_lora_targets(model: torch.nn.Module, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for name, _ in model.named_modules() if regex.fullmatch(name))


def check_lora_section(tensors: dict[str, torch.Tensor], adapter_name: str) -> None:
    bad = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    if bad:
        raise AdapterFileError(f"{adapter_name}: unexpected tensors in the LoRA section, e.g. {bad[:2]}")
