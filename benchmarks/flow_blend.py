"""Cost of the flow-blend guider against plain CFG on the same model: per step, and per whole sampling run.

    python benchmarks/flow_blend.py                       # CPU: a small FLUX layout, 512x512 steps, 256x256 runs
    python benchmarks/flow_blend.py --size dev --device cuda --dtype bf16 --resolution 1024 --run-resolution 1024
                                                          # GPU: full FLUX.1-dev layout, random weights

Per step = one guider prediction through ComfyUI's sampling path (calc_cond_batch batching), the
variants interleaved round by round. Plain CFG evaluates 2 conditions; the exact guider N + 2; joint
mode 1 at s_T = 1. Goals: exact ≤ (N+2)/2 × CFG + 5%, joint ≤ CFG + 10%.

Per run = a whole Euler sampling run (``--steps``) through ComfyUI's real KSAMPLER, so the reuse modes
("reuse Δ every k steps", which evaluate the attributes on every k-th step only) count what they save;
their final latent is compared with exact mode's, relative to the attributes' whole effect
(|approx − exact| / |exact − no attributes|). Goal: N = 4 at most 2.0× a CFG run.
Peak memory: CUDA's allocator peak on a GPU; on the CPU, the peak of the process RSS above its level
before the variant.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import json
import statistics

import torch

from benchmarks.ip_adapter import build, flux_benchmark_args
from benchmarks.timing import PeakMemory, clock_name, timed
from devtools.comfy_host import import_in_process
from omni_attribute.injection import AttributeCondition
from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig


def _inputs(layout, text_tokens: int, resolution: int, device: str):
    g = torch.Generator().manual_seed(1)

    def conditioning():
        return [[torch.randn(1, text_tokens, layout.context_dim, generator=g),
                 {"pooled_output": torch.randn(1, layout.vec_in_dim, generator=g), "guidance": 3.5}]]

    positive, empty = conditioning(), conditioning()
    attributes = [AttributeCondition(torch.randn(1, 16, layout.context_dim, generator=g), 0.8) for _ in range(4)]
    side = resolution // 8
    return positive, empty, attributes, torch.randn(1, 16, side, side, generator=g)


def _setup(size: str, device: str, dtype: torch.dtype):
    nodes = import_in_process(cpu=device == "cpu").nodes
    layout, model = build(size, device, dtype)
    torch.manual_seed(0)
    ip = IPAdapter(IPAdapterConfig.for_layout(layout, "all", "none"))
    with torch.no_grad():  # a fresh adapter's values are zero (no effect); give it one, so deviations mean something
        for block in ip.double_blocks.values():
            block.to_v.weight.normal_(0, 1.5 * layout.context_dim ** -0.5)
    return nodes.flow_blend, layout, model, ip.to(device, dtype)


def _guiders(flow_blend, model, ip, positive, empty, attributes, variants: dict[str, tuple]) -> dict:
    """name → a guider: ("cfg",) or (mode, N)."""
    import comfy.samplers

    guiders = {}
    for name, spec in variants.items():
        if spec[0] == "cfg":
            guider = comfy.samplers.CFGGuider(model)
            guider.set_cfg(3.0)
        else:
            guider = flow_blend.FlowBlendGuider(model, ip, attributes[:spec[1]], 1.0, spec[0])
        guider.set_conds(positive, empty)
        guiders[name] = guider
    return guiders


def measure_steps(size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32,
                  resolution: int = 512, text_tokens: int = 256, repeats: int = 5) -> dict:
    """Seconds of one guider prediction (one step) per variant, peak memory, ratios to CFG."""
    flow_blend, layout, model, ip = _setup(size, device, dtype)
    import comfy.samplers

    positive, empty, attributes, noise = _inputs(layout, text_tokens, resolution, device)
    variants = {"plain CFG (2 evals)": ("cfg",)}
    for n in (1, 2, 4):
        variants[f"exact N={n} ({n + 2} evals)"] = (flow_blend.MODES[0], n)
    variants["joint N=4 (1 eval, s_T=1)"] = (flow_blend.MODES[1], 4)
    guiders = _guiders(flow_blend, model, ip, positive, empty, attributes, variants)

    def timed_step(guider) -> tuple[float, int]:
        times = []

        def sampler(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
            s = sigmas[0] * x.new_ones([x.shape[0]])
            times.append(timed(lambda: model_fn(x, s, **extra_args), device))
            return x

        with PeakMemory(device) as memory, torch.no_grad():
            guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(sampler), torch.tensor([0.7, 0.0]),
                          seed=0)
        return times[0], memory.peak

    samples: dict[str, list[float]] = {name: [] for name in guiders}
    peaks: dict[str, int] = {name: 0 for name in guiders}
    for round_ in range(repeats + 1):  # variants interleaved; round 0 is warm-up
        for name, guider in guiders.items():
            seconds, peak = timed_step(guider)
            peaks[name] = max(peaks[name], peak)
            if round_:
                samples[name].append(seconds)
    base = statistics.median(samples["plain CFG (2 evals)"])
    rows = []
    for name, values in samples.items():
        seconds = statistics.median(values)
        evals = int(name.split("(")[1].split()[0])
        goal = (evals / 2) * 1.05 if name.startswith("exact") else (1.10 if name.startswith("joint") else 1.0)
        rows.append({"variant": name, "seconds": seconds, "ratio_to_cfg": seconds / base, "goal": goal,
                     "peak_bytes": peaks[name]})
    return {"kind": "per step", "size": size, "layout": f"{layout.hidden_size} wide, {layout.depth_double}+"
            f"{layout.depth_single} blocks", "resolution": resolution, "text_tokens": text_tokens,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "clock": clock_name(),
            "threads": torch.get_num_threads(), "rows": rows}


def measure_runs(size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32,
                 resolution: int = 256, text_tokens: int = 256, steps: int = 8, repeats: int = 3,
                 counts: tuple[int, ...] = (1, 2, 4)) -> dict:
    """Seconds of a whole Euler run per variant (interleaved, median), its ratio to a CFG run, the final
    latent's deviation from exact mode and peak memory."""
    flow_blend, layout, model, ip = _setup(size, device, dtype)
    import comfy.samplers

    positive, empty, attributes, noise = _inputs(layout, text_tokens, resolution, device)
    reuse_2, reuse_3 = flow_blend.MODES[2], flow_blend.MODES[3]
    variants = {"CFG": ("cfg",), "text only (N=0)": (flow_blend.MODES[0], 0)}
    for n in counts:
        variants[f"exact N={n}"] = (flow_blend.MODES[0], n)
        variants[f"reuse-2 N={n}"] = (reuse_2, n)
    variants[f"reuse-3 N={max(counts)}"] = (reuse_3, max(counts))
    variants[f"joint N={max(counts)}"] = (flow_blend.MODES[1], max(counts))
    guiders = _guiders(flow_blend, model, ip, positive, empty, attributes, variants)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)

    def run(guider):
        with torch.no_grad():
            return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.ksampler("euler"), sigmas, seed=0,
                                 disable_pbar=True)

    samples: dict[str, list[float]] = {name: [] for name in guiders}
    peaks: dict[str, int] = {name: 0 for name in guiders}
    finals: dict[str, torch.Tensor] = {}
    run(guiders["CFG"])  # warm-up: one CFG run (a whole warm-up round would double the cost)
    for _ in range(repeats):  # variants interleaved round by round
        for name, guider in guiders.items():
            with PeakMemory(device) as memory:
                seconds = timed(lambda: finals.__setitem__(name, run(guider).float().cpu()), device)
            peaks[name] = max(peaks[name], memory.peak)
            samples[name].append(seconds)
    base = statistics.median(samples["CFG"])
    rows = []
    for name, values in samples.items():
        spec = variants[name]
        deviation = None
        if spec[0] not in ("cfg", flow_blend.MODES[0]):
            exact, none = finals[f"exact N={spec[1]}"], finals["text only (N=0)"]
            deviation = float((finals[name] - exact).norm() / (exact - none).norm())
        rows.append({"variant": name, "seconds": statistics.median(values), "ratio_to_cfg": statistics.median(values) / base,
                     "deviation_from_exact": deviation, "peak_bytes": peaks[name]})
    return {"kind": "per run", "size": size, "layout": f"{layout.hidden_size} wide, {layout.depth_double}+"
            f"{layout.depth_single} blocks", "resolution": resolution, "text_tokens": text_tokens, "steps": steps,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "clock": clock_name(),
            "threads": torch.get_num_threads(), "rows": rows}


def report(result: dict) -> str:
    head = (f"flow-blend guider {result['kind']}: size={result['size']} ({result['layout']}) {result['resolution']}x"
            f"{result['resolution']}, {result['text_tokens']} text tokens"
            + (f", {result['steps']} Euler steps" if "steps" in result else "")
            + f", device={result['device']} dtype={result['dtype']}, median of {result['repeats']} "
              f"({result['clock']}, {result['threads']} threads)")
    lines = [head]
    for row in result["rows"]:
        extra = f"(goal <= {row['goal']:.2f}x)" if "goal" in row else (
            f"deviation from exact {row['deviation_from_exact']:.3f}" if row.get("deviation_from_exact") is not None else "")
        lines.append(f"  {row['variant']:<26} {row['seconds']:8.3f} s  {row['ratio_to_cfg']:5.2f}x CFG  "
                     f"peak +{row['peak_bytes'] / 2**20:8.1f} MiB  {extra}")
    return "\n".join(lines)


def main() -> None:
    args = flux_benchmark_args(__doc__, text_tokens=256, extra=_extra_args)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    results = []
    if args.what in ("steps", "both"):
        results.append(measure_steps(args.size, args.device, dtype, args.resolution, args.text_tokens, args.repeats))
        print(report(results[-1]), flush=True)
    if args.what in ("runs", "both"):
        results.append(measure_runs(args.size, args.device, dtype, args.run_resolution, args.text_tokens, args.steps,
                                    args.run_repeats))
        print(report(results[-1]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _extra_args(parser) -> None:
    parser.add_argument("--what", choices=["steps", "runs", "both"], default="both")
    parser.add_argument("--steps", type=int, default=8, help="Euler steps of a whole run")
    parser.add_argument("--run-resolution", type=int, default=256, help="image size of the whole runs")
    parser.add_argument("--run-repeats", type=int, default=3)


if __name__ == "__main__":
    main()
