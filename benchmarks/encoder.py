"""Shared image prefix vs naive encoding: one image under K = 1, 4, 16 attribute instructions.

    python benchmarks/encoder.py                       # CPU, a small Qwen2.5-VL (random weights)
    python benchmarks/encoder.py --size 7b --device cuda --dtype bf16   # full Qwen2.5-VL-7B layout, random weights

Plain = K full passes (vision tower + whole sequence each time). Shared = the image prefix once, its
KV cache repeated for the K instruction suffixes run as one batch (forced, also for K = 1). Default =
what ``encode_image`` does: shared for K > 1, the plain pass for K = 1. All timings are taken in one
run, interleaved, median of the repeats. Goals: default K = 1 at most 1.05× the plain pass; default
K = 16 at most 1.2× a single attribute (the default K = 1).
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

from benchmarks.timing import clock_name, timed, use_cpu_time
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


MODES = ("plain", "shared", "default")


def measure(size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 5,
            counts: tuple[int, ...] = (1, 4, 16)) -> dict:
    """Median seconds per encode of one 448×448 image under K attributes, for each mode; interleaved
    rounds, the first a warm-up. Also the model's sizes (for the report)."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        encoder = build(size, device, dtype, Path(tmp))
    image = torch.rand(1, 3, 448, 448, device=device)
    calls = {"plain": lambda ins: encoder.encode_image(image, ins, shared_prefix=False),
             "shared": lambda ins: encoder.encode_image_via(image, ins, "shared"),
             "default": lambda ins: encoder.encode_image(image, ins)}
    times: dict[tuple[str, int], list[float]] = {(mode, k): [] for k in counts for mode in MODES}
    with torch.no_grad():
        for round_ in range(repeats + 1):  # first round is warm-up
            for k in counts:
                instructions = encoder.instructions_for([[a] for a in ATTRIBUTES[:k]])
                for mode in MODES:
                    seconds = timed(lambda: calls[mode](instructions), device)
                    if round_:
                        times[(mode, k)].append(seconds)
    median = {key: statistics.median(values) for key, values in times.items()}
    single = median[("default", 1)]
    rows = [{"K": k, **{f"{mode}_s": median[(mode, k)] for mode in MODES},
             "shared_over_plain": median[("shared", k)] / median[("plain", k)],
             "default_over_plain": median[("default", k)] / median[("plain", k)],
             "default_over_single": median[("default", k)] / single} for k in counts]
    llm = sum(p.numel() for p in encoder.mllm.model.language_model.parameters())
    connector = sum(p.numel() for p in encoder.connector.parameters())
    return {"size": size, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "clock": clock_name(), "threads": torch.get_num_threads(),
            "image_tokens": encoder.prepare_image(image)[2], "llm_params": llm, "connector_params": connector,
            "rows": rows}


def report(result: dict) -> str:
    rows = {row["K"]: row for row in result["rows"]}
    lines = [f"encoder: size={result['size']} device={result['device']} dtype={result['dtype']} image 448x448 "
             f"({result['image_tokens']} image tokens), median of {result['repeats']} ({result['clock']}, "
             f"{result['threads']} threads); LLM "
             f"{result['llm_params'] / 1e6:.1f}M params, connector {result['connector_params'] / 1e6:.2f}M",
             f"{'K':>3} {'plain s':>9} {'shared s':>9} {'default s':>10} {'shared/plain':>13} "
             f"{'default/plain':>14} {'default/single':>15}"]
    for k, row in rows.items():
        lines.append(f"{k:>3} {row['plain_s']:>9.4f} {row['shared_s']:>9.4f} {row['default_s']:>10.4f} "
                     f"{row['shared_over_plain']:>13.2f} {row['default_over_plain']:>14.2f} "
                     f"{row['default_over_single']:>15.2f}")
    one = rows[min(rows)]["default_over_plain"]
    lines.append(f"goal K=1 <= 1.05x the plain pass: {one:.2f}x ({'met' if one <= 1.05 else 'NOT met'})")
    if 16 in rows:
        many = rows[16]["default_over_single"]
        lines.append(f"goal K=16 <= 1.2x one attribute: {many:.2f}x ({'met' if many <= 1.2 else 'NOT met'})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["small", "7b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU time of one thread (one torch thread) instead of wall clock: for shared machines")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.cpu_time:
        use_cpu_time()
    result = measure(args.size, args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], args.repeats)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
