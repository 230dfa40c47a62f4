"""Images for the annotator: files resized into a pixel budget the way Qwen2.5-VL's processor does
(aspect kept, sides multiples of 28), encoded as base64 data URLs; and what they cost in tokens.

Sending images already at the size the server's processor would pick means the server does not resize
again, and the image-token count is known here: Qwen2.5-VL turns each 28 x 28 block into one token, so an
H x W image costs (H/28)·(W/28) tokens, plus the two <|vision_start|>/<|vision_end|> markers."""

from __future__ import annotations

import base64
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import AnnotateError

PATCH = 28                 # Qwen2.5-VL: 14-pixel patches, 2 x 2 merged into one token
VISION_MARKERS = 2         # <|vision_start|> and <|vision_end|> around each image's tokens
MAX_ASPECT = 200


def fit_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) Qwen2.5-VL's processor would resize an image to (transformers' ``smart_resize``)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if max(width, height) / max(1, min(width, height)) > MAX_ASPECT:
        raise AnnotateError(f"an image of {width}x{height} pixels has an aspect ratio over {MAX_ASPECT}:1, which "
                            "Qwen2.5-VL refuses: crop it or leave it out of the pairs")
    h, w = smart_resize(height, width, factor=PATCH, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


def image_tokens(width: int, height: int) -> int:
    """Tokens of one image already at a processor size (sides multiples of 28), markers included."""
    return (width // PATCH) * (height // PATCH) + VISION_MARKERS


@dataclass(frozen=True)
class EncodedImage:
    url: str                 # data:image/...;base64,...
    width: int
    height: int
    payload: bytes           # the encoded file bytes the URL carries

    @property
    def tokens(self) -> int:
        return image_tokens(self.width, self.height)


def load_image(path: str | Path) -> Image.Image:
    """An RGB image with its EXIF orientation applied; unreadable files raise AnnotateError naming the file."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except FileNotFoundError as exc:
        raise AnnotateError(f"image {str(path)!r} does not exist: fix the pair list or the folder") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise AnnotateError(f"image {str(path)!r} cannot be read ({exc}): remove it or replace the file") from exc


def encode_image(path: str | Path, min_pixels: int, max_pixels: int, fmt: str = "png", quality: int = 90) -> EncodedImage:
    image = load_image(path)
    width, height = fit_size(image.width, image.height, min_pixels, max_pixels)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
        mime = "image/jpeg"
    else:
        image.save(buffer, format="PNG")
        mime = "image/png"
    payload = buffer.getvalue()
    return EncodedImage(f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}", width, height, payload)


def decode_data_url(url: str) -> bytes:
    """The file bytes of a base64 data URL (what a server receives)."""
    head, sep, data = url.partition(",")
    if not sep or not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError("not a base64 data URL")
    return base64.b64decode(data)


class ImageCache:
    """Encoded images by (path, modification time, size): pairs from groups or neighbours reuse images."""

    def __init__(self, min_pixels: int, max_pixels: int, fmt: str = "png", quality: int = 90, capacity: int = 512):
        self.min_pixels, self.max_pixels, self.fmt, self.quality = min_pixels, max_pixels, fmt, quality
        self.capacity = capacity
        self._items: OrderedDict[tuple, EncodedImage] = OrderedDict()
        self._lock = threading.Lock()     # get() runs in worker threads

    def get(self, path: str | Path) -> EncodedImage:
        try:
            stat = os.stat(path)
        except FileNotFoundError as exc:
            raise AnnotateError(f"image {str(path)!r} does not exist: fix the pair list or the folder") from exc
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        encoded = encode_image(path, self.min_pixels, self.max_pixels, self.fmt, self.quality)
        with self._lock:
            self._items[key] = encoded
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return encoded
