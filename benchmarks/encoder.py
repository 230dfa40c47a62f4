"""Shared image prefix vs naive encoding: one image under K = 1, 4, 16 attribute instructions.

    python benchmarks/encoder.py                       # CPU, a small Qwen2.5-VL (random weights)
    python benchmarks/encoder.py --size 7b --device cuda --dtype bf16   # full Qwen2.5-VL-7B layout, random weights

Naive = K full passes (vision tower + whole sequence each time). Shared = the image prefix
once, its KV cache repeated for the K instruction suffixes run as one batch. All timings are
taken in one run, interleaved, and reported as ratios to the single-attribute shared pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import json
import statistics
import tempfile

import torch

from benchmarks.timing import timed
from devtools.fixtures import (
    make_qwen25vl_7b_config_folder,
    make_tiny_backbone_folder,
    tiny_adapter_metadata,
)
from omni_attribute.backbone import load_backbone
from omni_attribute.encoder import build_encoder

ATTRIBUTES = ["object color", "object shape", "surface pattern", "background color", "lighting direction",
              "object size", "object position", "image style", "camera angle", "material", "texture",
              "man hairstyle", "dog identity", "facial expression", "clothing", "artistic style"]


def make_folder(size: str, root: Path) -> Path:
    folder = root / f"qwen25vl-{size}"
    if size == "small":
        return make_tiny_backbone_folder(folder, hidden_size=512, layers=4, vision_hidden=256, vision_depth=4)
    return make_qwen25vl_7b_config_folder(folder)


def build(size: str, device: str, dtype: torch.dtype, root: Path):
    folder = make_folder(size, root)
    if size == "small":
        backbone = load_backbone(folder, dtype=dtype, device=device)
    else:  # random weights at full size: build on the meta device, then materialise on the target device
        backbone = load_backbone(folder, meta=True)
        backbone.model.to_empty(device=device).to(dtype)
        with torch.no_grad():
            for param in backbone.model.parameters():
                param.normal_(0, 0.02)
    metadata = tiny_adapter_metadata(backbone.info(), out_dim=4096, num_tokens=16)
    hidden = backbone.info()["hidden_size"]
    # 7b: the default connector (8 layers, width 1024) is ~1.3% of the LLM's parameters. The small
    # backbone gets a connector of about the same share, or the connector would dominate the timing.
    width = 1024 if size == "7b" else 128
    metadata.connector = type(metadata.connector)(in_dim=hidden, width=width, num_heads=16 if size == "7b" else 4)
    metadata.image = {"min_pixels": 28 * 28, "max_pixels": 448 * 448}
    encoder = build_encoder(backbone, metadata).to(device=device, dtype=dtype).eval()
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = build(args.size, args.device, dtype, Path(tmp))
    image = torch.rand(1, 3, 448, 448, device=args.device)
    counts = (1, 4, 16)
    times: dict[str, list[float]] = {f"{mode}{k}": [] for k in counts for mode in ("shared", "naive")}
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # first round is warm-up
            for k in counts:
                instructions = encoder.instructions_for([[a] for a in ATTRIBUTES[:k]])
                for mode, shared in (("shared", True), ("naive", False)):
                    seconds = timed(lambda: encoder.encode_image(image, instructions, shared_prefix=shared), args.device)
                    times[f"{mode}{k}"].append(seconds)
    median = {key: statistics.median(values[1:]) for key, values in times.items()}
    base = median["shared1"]
    n_image_tokens = encoder.prepare_image(image)[2]
    llm = sum(p.numel() for p in encoder.mllm.model.language_model.parameters())
    connector = sum(p.numel() for p in encoder.connector.parameters())
    print(f"encoder benchmark: size={args.size} device={args.device} dtype={args.dtype} image 448x448 "
          f"({n_image_tokens} image tokens), median of {args.repeats}; LLM {llm / 1e6:.1f}M params, "
          f"connector {connector / 1e6:.2f}M ({100 * connector / llm:.1f}%)")
    print(f"{'K':>3} {'naive s':>9} {'shared s':>9} {'naive/1':>8} {'shared/1':>9} {'speed-up':>9}")
    rows = []
    for k in counts:
        naive, shared = median[f"naive{k}"], median[f"shared{k}"]
        rows.append({"K": k, "naive_s": naive, "shared_s": shared, "naive_ratio": naive / base,
                     "shared_ratio": shared / base, "speedup": naive / shared})
        print(f"{k:>3} {naive:>9.4f} {shared:>9.4f} {naive / base:>8.2f} {shared / base:>9.2f} {naive / shared:>9.2f}")
    verdict = "met" if median["shared16"] / base < 3 else "NOT met"
    print(f"goal K=16 shared < 3x single attribute: {median['shared16'] / base:.2f}x ({verdict})")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
