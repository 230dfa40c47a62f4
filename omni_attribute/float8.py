"""8-bit weights for the backbone: Linear weights held in float8_e4m3fn with one scale per output row,
dequantised layer by layer into the compute dtype when the layer runs (weight memory about halves
against bf16; the activations, the embedding table, norms and biases keep the compute dtype)."""

from __future__ import annotations

import torch
from torch import nn

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = float(torch.finfo(FLOAT8).max)  # 448
WEIGHT_DTYPES = ("default", "fp8_e4m3fn")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] → (float8 weight [out, in], float32 scale [out, 1]) with weight ≈ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FLOAT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


class Float8Linear(nn.Linear):
    """An nn.Linear (so peft's LoRA wraps it as usual) whose weight is stored as float8 + per-row scale.

    ``weight`` reads back the dequantised weight in ``compute_dtype``; ``forward`` dequantises into the
    input's dtype, one layer at a time."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-precision weight
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.register_buffer("weight_scale", scale.reshape(-1, 1).float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> "Float8Linear":
        q, scale = quantize_rows(linear.weight)
        return cls(q, scale, linear.bias, compute_dtype)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype) -> "Float8Linear":
        """A meta-device shell, filled by ``load_state_dict(..., assign=True)`` (keys qweight, weight_scale, bias)."""
        meta = torch.device("meta")
        return cls(torch.empty(out_features, in_features, dtype=FLOAT8, device=meta),
                   torch.empty(out_features, 1, device=meta),
                   torch.empty(out_features, device=meta) if bias else None, compute_dtype)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.qweight.to(self.compute_dtype) * self.weight_scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, float8"


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[tuple[str, nn.Linear]]:
    """The plain nn.Linear layers of a model (not LoRA's, not ``skip``, not already float8)."""
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and ".lora_" not in name and name.split(".")[-1] not in skip and name not in skip]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Swap every plain Linear layer for a Float8Linear in place, one layer at a time; the count swapped."""
    layers = quantizable_linears(model)
    for name, linear in layers:
        replace_module(model, name, Float8Linear.from_linear(linear, compute_dtype))
    return len(layers)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
