"""Writing world data: labelled single images and annotated pairs (the trainer's JSONL schema)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .factors import (
    FACTORS,
    TRAIN_PHRASINGS,
    Assignment,
    caption,
    caption_without,
    sample_assignment,
    vary,
)
from .render import render


def make_images(folder: str | Path, count: int, seed: int, size: int = 32) -> Path:
    """``count`` images with their factors and captions: images.jsonl rows {image, factors, caption}."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        a = sample_assignment(rng)
        name = f"images/{i:06d}.png"
        render(a, size).save(folder / name)
        rows.append({"image": name, "factors": a.as_dict(), "caption": caption(a)})
    index = folder / "images.jsonl"
    index.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return index


def make_pairs(folder: str | Path, count: int, seed: int, size: int = 32,
               phrasings: dict[str, tuple[str, ...]] = TRAIN_PHRASINGS, max_shared: int = 4) -> Path:
    """``count`` pairs sharing 1..max_shared factors and differing in the rest; positive attributes name
    the shared factors, negative ones the differing factors (a random phrasing each).

    Captions leave the shared factors out: a world caption otherwise names every factor, and the
    generative loss would then never need the reference's tokens (real captions do not spell out an
    identity or a material either)."""
    folder = Path(folder)
    (folder / "pairs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(FACTORS)
    lines = []
    for i in range(count):
        a = sample_assignment(rng)
        shared = rng.sample(names, rng.randint(1, max_shared))
        differ = [f for f in names if f not in shared]
        b = vary(a, differ, rng)
        paths = (f"pairs/{i:06d}_a.png", f"pairs/{i:06d}_b.png")
        render(a, size).save(folder / paths[0])
        render(b, size).save(folder / paths[1])
        lines.append({
            "image_a": paths[0], "image_b": paths[1],
            "positive_attributes": [rng.choice(phrasings[f]) for f in shared],
            "negative_attributes": [rng.choice(phrasings[f]) for f in differ],
            "caption_a": caption_without(a, set(shared)), "caption_b": caption_without(b, set(shared)),
            "source": "tiny-world", "id": f"{seed}-{i}",
            "factors_a": a.as_dict(), "factors_b": b.as_dict(), "shared": shared,
            "labels": [f"{f}={a[f]}" for f in shared],
        })
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def read_images(index: str | Path) -> list[tuple[Path, Assignment, str]]:
    index = Path(index)
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    return [(index.parent / r["image"], Assignment.of(r["factors"]), r["caption"]) for r in rows]
