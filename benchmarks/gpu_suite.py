"""Every full-size measurement in one command: one JSON, one table.

    python benchmarks/gpu_suite.py --json gpu_suite.json     # one H100/H200: FLUX.1-dev and Qwen2.5-VL-7B
                                                             # layouts, random bf16 weights, 1024x1024
    python benchmarks/gpu_suite.py --cpu --json cpu.json     # anyone: the small CPU layouts, fp32

On a lent GPU machine (no network; see ../shared/gpu/README.md): prepare ``.gpu/`` here, then
``bash .gpu/run.sh python3 benchmarks/gpu_suite.py --json $OUT/gpu_suite.json``.

Sections (each reuses its own benchmark's ``measure`` function, so the numbers mean what those
benchmarks' tables mean):

1. IP-Adapter per-step overhead (``benchmarks/ip_adapter.py``): plain, IP on the double blocks, double
   + single, double with a MASK, and plain / IP-double compiled by ComfyUI's TorchCompileModel
   (inductor; on the CPU only with ``--compile inductor``: compiling takes minutes on 2 cores).
2. Encoder (``benchmarks/encoder.py``): one image under K = 1, 4, 16 attributes — plain passes, the
   shared prefix, and the default choice.
3. Flow-blend guider whole runs (``benchmarks/flow_blend.py``): CFG, exact and "reuse Δ every 2 steps"
   with N = 1, 2, 4, "every 3 steps" and joint at N = 4, each run's cost against a CFG run and its final
   latent's deviation from exact mode.

Peak memory per variant: CUDA's allocator peak on the GPU, the RSS rise on the CPU. Sizes, steps and
repeats are chosen for about 4–5 minutes on an H100 (an estimate: ~0.3 s per FLUX.1-dev pass at
1024², two inductor compiles of about a minute each, ~220 guider rows; not yet run there, no GPU has
been lent to the sessions that wrote it); ``--cpu --cpu-time`` took 8 minutes on a 2-core VM.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import gc
import json
import platform
import time

import torch

from benchmarks import encoder as encoder_benchmark
from benchmarks import flow_blend as guider_benchmark
from benchmarks import ip_adapter as ip_benchmark
from benchmarks.timing import clock_name, use_cpu_time

GPU = {"flux": "dev", "encoder": "7b", "dtype": torch.bfloat16, "resolution": 1024, "run_resolution": 1024,
       "steps": 8, "ip_repeats": 8, "encoder_repeats": 5, "run_repeats": 1, "compile": "inductor"}
CPU = {"flux": "small", "encoder": "small", "dtype": torch.float32, "resolution": 512, "run_resolution": 256,
       "steps": 8, "ip_repeats": 7, "encoder_repeats": 7, "run_repeats": 2, "compile": None}


def free(device: str) -> None:
    """Between sections: drop what ComfyUI still holds and empty the CUDA cache."""
    if "comfy.model_management" in sys.modules:
        import comfy.model_management

        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def table(results: dict) -> str:
    lines = []
    ip = results.get("ip_adapter")
    if ip:
        lines += ["", f"## IP-Adapter per step — {ip['layout']}, {ip['resolution']}², {ip['text_tokens']} text tokens, "
                      f"{ip['dtype']}, median of {ip['repeats']}",
                  "| variant | s / step | ratio | peak memory |", "| --- | ---: | ---: | ---: |"]
        for row in ip["rows"]:
            against = "compiled plain" if row["variant"].startswith("compiled") else "plain"
            lines.append(f"| {row['variant']} | {row['seconds']:.4f} | {row['ratio']:.3f} × {against} | "
                         f"{row['peak_bytes'] / 2**30:.2f} GiB |")
    enc = results.get("encoder")
    if enc:
        lines += ["", f"## Encoder — {enc['size']}, {enc['image_tokens']} image tokens, {enc['dtype']}, median of "
                      f"{enc['repeats']}",
                  "| K | plain s | shared s | default s | shared / plain | default / plain | default / single |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in enc["rows"]:
            lines.append(f"| {row['K']} | {row['plain_s']:.4f} | {row['shared_s']:.4f} | {row['default_s']:.4f} | "
                         f"{row['shared_over_plain']:.2f} | {row['default_over_plain']:.2f} | "
                         f"{row['default_over_single']:.2f} |")
    runs = results.get("guider_runs")
    if runs:
        lines += ["", f"## Flow-blend guider, whole runs — {runs['layout']}, {runs['resolution']}², {runs['steps']} "
                      f"Euler steps, {runs['dtype']}, median of {runs['repeats']}",
                  "| variant | s / run | ratio to CFG | deviation from exact | peak memory |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in runs["rows"]:
            deviation = "—" if row["deviation_from_exact"] is None else f"{row['deviation_from_exact']:.3f}"
            lines.append(f"| {row['variant']} | {row['seconds']:.3f} | {row['ratio_to_cfg']:.2f} | {deviation} | "
                         f"{row['peak_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the small layouts on the CPU, fp32")
    parser.add_argument("--compile", default="default", help="backend for the compiled IP variants, 'none' to skip "
                                                             "(default: inductor on the GPU, none on the CPU)")
    parser.add_argument("--only", action="append", choices=["ip", "encoder", "guider"],
                        help="run only these sections (repeatable)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --cpu: time CPU time of one thread (one torch thread), for shared machines")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cpu_time:
        if not args.cpu:
            parser.error("--cpu-time is for --cpu runs")
        use_cpu_time()
    settings = CPU if args.cpu else GPU
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the small layouts")
    backend = settings["compile"] if args.compile == "default" else (None if args.compile == "none" else args.compile)
    sections = set(args.only or ["ip", "encoder", "guider"])
    started = time.time()
    results: dict = {"machine": {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
                                 or platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
                                 "cpu_threads": torch.get_num_threads(), "clock": clock_name()},
                     "settings": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in settings.items()}
                     | {"compile": backend}, "seconds": {}}
    if "ip" in sections:
        t = time.time()
        results["ip_adapter"] = ip_benchmark.measure(settings["flux"], device, settings["dtype"], settings["resolution"],
                                                     512, settings["ip_repeats"], backend)
        results["seconds"]["ip_adapter"] = round(time.time() - t, 1)
        print(ip_benchmark.report(results["ip_adapter"]), flush=True)
        free(device)
    if "encoder" in sections:
        t = time.time()
        results["encoder"] = encoder_benchmark.measure(settings["encoder"], device, settings["dtype"],
                                                       settings["encoder_repeats"])
        results["seconds"]["encoder"] = round(time.time() - t, 1)
        print(encoder_benchmark.report(results["encoder"]), flush=True)
        free(device)
    if "guider" in sections:
        t = time.time()
        results["guider_runs"] = guider_benchmark.measure_runs(settings["flux"], device, settings["dtype"],
                                                               settings["run_resolution"], 256, settings["steps"],
                                                               settings["run_repeats"])
        results["seconds"]["guider_runs"] = round(time.time() - t, 1)
        print(guider_benchmark.report(results["guider_runs"]), flush=True)
        free(device)
    results["seconds"]["total"] = round(time.time() - started, 1)
    print(table(results))
    print(f"\ntotal {results['seconds']['total']:.0f} s ({results['seconds']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
