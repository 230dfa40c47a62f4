"""The main job on the embedded default: a real ComfyUI server, the shipped encode workflow, run headlessly.

    python -m omni_attribute.demo [--out DIR]

It builds the tiny default model files (a tiny Qwen2.5-VL with the real tokenizer and an
*untrained* adapter: the numbers prove the pipeline, not the meaning of the embeddings), draws a
reference image, starts ComfyUI with the plugin, runs workflows/encode_attributes.api.json
with the headless client (omni_attribute.api) and prints what came back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .api import ComfyClient, load_workflow, progress_printer, run_workflow, set_inputs
from .comfy_host import PLUGIN_DIR, ComfyServer
from .embeds import load_embeds
from .tiny import make_tiny_backbone_folder, make_untrained_adapter

WORKFLOW = PLUGIN_DIR / "workflows" / "encode_attributes.api.json"
BACKBONE = "tiny-qwen25vl"
ADAPTER = "tiny-untrained.safetensors"
ATTRIBUTES = "object color\nobject shape\nbackground color, lighting"


def draw_reference(path: Path) -> Path:
    image = Image.new("RGB", (160, 120), (40, 70, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((50, 30, 110, 90), fill=(220, 40, 40))
    draw.rectangle((0, 100, 160, 120), fill=(90, 60, 30))
    image.save(path)
    return path


def prepare_models(base: Path) -> None:
    backbone = base / "models" / "omni_attribute_backbones" / BACKBONE
    if not (backbone / "model.safetensors").is_file():
        print(f"[demo] writing the tiny Qwen2.5-VL backbone to {backbone}", flush=True)
        make_tiny_backbone_folder(backbone, seed=0)
    adapter = base / "models" / "omni_attribute" / ADAPTER
    if not adapter.is_file():
        print(f"[demo] writing an untrained adapter to {adapter}", flush=True)
        adapter.parent.mkdir(parents=True, exist_ok=True)
        make_untrained_adapter(backbone, adapter, seed=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_attribute.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PLUGIN_DIR / "demo-output", help="work and output folder")
    args = parser.parse_args(argv)
    base = args.out.resolve() / "comfy-base"
    base.mkdir(parents=True, exist_ok=True)
    prepare_models(base)
    reference = draw_reference(args.out.resolve() / "reference.png")
    prompt = set_inputs(load_workflow(WORKFLOW), {
        "1.image": str(reference), "2.backbone": BACKBONE, "2.adapter": ADAPTER, "3.attributes": ATTRIBUTES,
        "4.filename_prefix": "demo"})

    print("[demo] starting ComfyUI ...", flush=True)
    with ComfyServer(base) as server:
        print(f"[demo] ComfyUI at {server.url} (log: {server.log_path})", flush=True)
        (local,) = run_workflow(ComfyClient(server.url), prompt, args.out.resolve(), on_event=progress_printer(prompt))

    embeds = load_embeds(local)
    print(f"\n[demo] embeds fetched over HTTP and saved to {local}")
    print(embeds.summary())
    pooled = torch.nn.functional.normalize(embeds.pooled, dim=-1)
    similarity = pooled @ pooled.T
    print("\ncosine similarity of the pooled embeddings (rows/cols in the order above):")
    for row in similarity.tolist():
        print("  " + "  ".join(f"{value:+.3f}" for value in row))
    print("\nNote: the adapter is untrained (random connector and LoRA); train one with the trainer "
          "to get meaningful attribute embeddings.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
