"""Drawing a world image from its factors (PIL, deterministic)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .factors import Assignment

COLORS = {"red": (220, 50, 40), "green": (40, 180, 70), "blue": (50, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"black": (15, 15, 20), "white": (235, 235, 235), "gray": (125, 125, 125), "teal": (20, 120, 120)}
SIZES = {"small": 0.38, "medium": 0.58, "large": 0.80}  # object width as a fraction of the image


def render(a: Assignment, size: int = 32, supersample: int = 4) -> Image.Image:
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[a["background"]])
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    half = SIZES[a["size"]] * big / 2
    c = big / 2
    box = (c - half, c - half, c + half, c + half)
    if a["shape"] == "circle":
        draw.ellipse(box, fill=255)
    elif a["shape"] == "square":
        draw.rectangle(box, fill=255)
    elif a["shape"] == "triangle":
        draw.polygon([(c, c - half), (c + half, c + half), (c - half, c + half)], fill=255)
    else:  # diamond
        draw.polygon([(c, c - half), (c + half, c), (c, c + half), (c - half, c)], fill=255)
    color = np.array(COLORS[a["color"]], dtype=np.float32)
    fill = np.broadcast_to(color, (big, big, 3)).copy()
    ys, xs = np.mgrid[0:big, 0:big]
    period = big // 4
    if a["pattern"] == "stripes":
        fill[((xs + ys) // (period // 2)) % 2 == 1] *= 0.35
    elif a["pattern"] == "dots":
        cell = period // 2
        dots = ((xs % cell - cell / 2) ** 2 + (ys % cell - cell / 2) ** 2) < (cell / 3.2) ** 2
        fill[dots] = 255 - (255 - fill[dots]) * 0.2
    pixels = np.asarray(image, dtype=np.float32).copy()
    inside = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    pixels = pixels * (1 - inside) + fill * inside
    ramp = {"left": 1 - xs / big, "right": xs / big, "top": 1 - ys / big, "bottom": ys / big}[a["lighting"]]
    pixels = pixels * (0.45 + 0.9 * ramp[..., None])
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.resize((size, size), Image.LANCZOS)
