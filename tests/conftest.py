"""Shared fixtures (no ComfyUI imported): a tiny real Qwen2.5-VL folder (the real Qwen2.5 tokenizer, taken
from the provisioned ComfyUI's data files), adapters for it, a tiny generator folder and tiny pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from devtools.fixtures import (
    make_tiny_backbone_folder,
    make_untrained_adapter,
    qwen25_tokenizer_dir,
)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return qwen25_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, tokenizer_dir) -> Path:
    return make_tiny_backbone_folder(tmp_path_factory.mktemp("backbones") / "tiny-qwen25vl", seed=0,
                                     tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_backbone, tmp_path_factory) -> Path:
    return make_untrained_adapter(tiny_backbone, tmp_path_factory.mktemp("adapters") / "tiny.safetensors", seed=1)


@pytest.fixture(scope="session")
def world_generator(tmp_path_factory, tiny_backbone) -> Path:
    """A tiny-world generator folder, trained for 4 steps on 16 world images (real files, real format)."""
    from transformers import AutoTokenizer

    from lab.world.generator import train_world_generator
    from lab.world.pairs import make_images, read_images
    from omni_attribute.images import load_rgb_batch

    base = tmp_path_factory.mktemp("world")
    rows = read_images(make_images(base / "images", 16, seed=4))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone), fix_mistral_regex=False)
    return train_world_generator(load_rgb_batch([p for p, _, _ in rows]), [a for _, a, _ in rows], tokenizer,
                                 base / "tiny-world", steps=4, batch_size=4, seed=0)


@pytest.fixture(scope="session")
def narrow_backbone(tmp_path_factory, tokenizer_dir) -> Path:
    """A second tiny backbone of another hidden size (32), for mismatch tests."""
    return make_tiny_backbone_folder(tmp_path_factory.mktemp("backbones") / "tiny-qwen25vl-32", seed=2,
                                     hidden_size=32, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def narrow_adapter(narrow_backbone, tmp_path_factory) -> Path:
    return make_untrained_adapter(narrow_backbone, tmp_path_factory.mktemp("adapters") / "narrow.safetensors", seed=3)


@pytest.fixture(scope="session")
def comfy_in_process() -> None:
    """The in-process ComfyUI layer (tests/comfy, tests/lab): ComfyUI 0.3.75 importable here, CPU mode."""
    from devtools.comfy_host import add_comfyui_to_path

    add_comfyui_to_path(cpu=True)


@pytest.fixture(scope="session")
def plugin_nodes(comfy_in_process):
    """The plugin's ``nodes`` package, loaded the way ComfyUI loads a custom node folder
    (``plugin_nodes.apply``, ``plugin_nodes.flow_blend``, …)."""
    from devtools.comfy_host import import_in_process

    return import_in_process("omni_attribute_plugin_under_test").nodes


COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40)}
BACKGROUNDS = {"black": (10, 10, 10), "white": (240, 240, 240), "gray": (128, 128, 128)}


def draw(path: Path, color: str, background: str) -> str:
    image = Image.new("RGB", (32, 32), BACKGROUNDS[background])
    ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=COLORS[color])
    image.save(path)
    return path.name


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """Pairs that share the object colour and differ in background: positive 'object color', negative 'background color'."""
    folder = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, (color, (bg_a, bg_b)) in enumerate([(c, b) for c in COLORS for b in (("black", "white"), ("white", "gray"))]):
        a, b = draw(folder / f"{i}a.png", color, bg_a), draw(folder / f"{i}b.png", color, bg_b)
        lines.append({"image_a": a, "image_b": b, "positive_attributes": ["object color", "object shape"],
                      "negative_attributes": ["background color"], "caption_a": f"a {color} disc on {bg_a}",
                      "caption_b": f"a {color} disc on {bg_b}", "id": str(i)})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder / "pairs.jsonl"
