"""Images as tensors: ComfyUI IMAGE tensors → RGB images the MLLM can take (with clear errors for odd
input), and PIL images / files → [3,H,W] tensors in [0,1]."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageInputError

MAX_ASPECT_RATIO = 200  # Qwen2.5-VL's image processor refuses more extreme shapes


def to_rgb_batch(image: torch.Tensor) -> torch.Tensor:
    """Accept [B,H,W,C] or [H,W,C] with C in 1..4 (gray, gray+alpha, RGB, RGBA); return [B,3,H,W] in [0,1].

    Alpha is dropped, as ComfyUI's own image encoders do (LoadImage gives the alpha as a MASK).
    """
    if not isinstance(image, torch.Tensor):
        raise ImageInputError(f"expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ImageInputError(
            f"IMAGE must have shape [batch, height, width, channels], got {list(image.shape)}"
        )
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise ImageInputError(f"IMAGE is empty (shape {list(image.shape)}): connect a loaded image")
    if c not in (1, 2, 3, 4):
        raise ImageInputError(
            f"IMAGE has {c} channels; expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)"
        )
    image = image.float()
    if not torch.isfinite(image).all():
        raise ImageInputError("IMAGE contains NaN or infinite values: check the node that produced it")
    if c in (1, 2):
        image = image[..., :1].expand(b, h, w, 3)
    else:
        image = image[..., :3]
    return image.clamp(0.0, 1.0).permute(0, 3, 1, 2).contiguous()


def fit_pixels(image: torch.Tensor, min_pixels: int, max_pixels: int, min_side: int) -> torch.Tensor:
    """Resize [B,3,H,W] (keeping aspect ratio) so that H*W lies in [min_pixels, max_pixels] and both sides >= min_side."""
    _, _, h, w = image.shape
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        raise ImageInputError(
            f"image is {w}x{h} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1: crop it to a "
            "less extreme shape"
        )
    scale = 1.0
    if h * w > max_pixels:
        scale = math.sqrt(max_pixels / (h * w))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (h * w))
    scale = max(scale, min_side / min(h, w))
    if scale == 1.0:
        return image
    new_h, new_w = max(min_side, round(h * scale)), max(min_side, round(w * scale))
    return F.interpolate(image, size=(new_h, new_w), mode="bicubic", antialias=scale < 1.0,
                         align_corners=False).clamp(0.0, 1.0)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image → [3,H,W] float32 RGB in [0,1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_rgb_batch(paths: list[Path]) -> torch.Tensor:
    """Image files of one size → [B,3,H,W] in [0,1]."""
    batch = []
    for path in paths:
        with Image.open(path) as image:
            batch.append(pil_to_tensor(image))
    return torch.stack(batch)
