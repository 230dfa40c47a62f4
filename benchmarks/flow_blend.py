"""Cost of the flow-blend guider per sampling step against plain CFG on the same model.

    python benchmarks/flow_blend.py                       # CPU: a small FLUX layout, 512x512
    python benchmarks/flow_blend.py --size dev --device cuda --dtype bf16 --resolution 1024
                                                          # GPU: full FLUX.1-dev layout, random weights

Per step = one guider prediction through ComfyUI's sampling path (calc_cond_batch batching), the
variants interleaved round by round. Plain
CFG evaluates 2 conditions; the exact guider N + 2; joint mode 2. Goals: exact ≤ (N+2)/2 × CFG + 5%,
joint ≤ CFG + 10%. Peak memory: CUDA's allocator peak on a GPU; on the CPU, the peak of the process
RSS (sampled every 2 ms) above its level before the variant.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import json
import statistics
import threading
import time

import psutil
import torch

from benchmarks.ip_adapter import build, flux_benchmark_args
from benchmarks.timing import timed
from devtools.comfy_host import import_in_process
from omni_attribute.injection import AttributeCondition
from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig


class PeakRSS:
    def __init__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    @property
    def above_base(self) -> int:
        return max(0, self.peak - self.base)


def main() -> None:
    args = flux_benchmark_args(__doc__, text_tokens=256)
    flow_blend = import_in_process(cpu=args.device == "cpu").nodes.flow_blend
    import comfy.model_management
    import comfy.samplers

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    layout, model = build(args.size, args.device, dtype)
    torch.manual_seed(0)
    ip = IPAdapter(IPAdapterConfig.for_layout(layout, "all", "none")).to(args.device, dtype)
    g = torch.Generator().manual_seed(1)

    def conditioning():
        return [[torch.randn(1, args.text_tokens, layout.context_dim, generator=g),
                 {"pooled_output": torch.randn(1, layout.vec_in_dim, generator=g), "guidance": 3.5}]]

    positive, empty = conditioning(), conditioning()
    attributes = [AttributeCondition(torch.randn(1, 16, layout.context_dim, generator=g), 0.8)
                  for _ in range(4)]
    side = args.resolution // 8
    noise = torch.randn(1, 16, side, side, generator=g)

    def cfg_guider():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, empty)
        guider.set_cfg(3.0)
        return guider

    def blend_guider(n, mode):
        guider = flow_blend.FlowBlendGuider(model, ip, attributes[:n], 1.0, mode)
        guider.set_conds(positive, empty)
        return guider

    variants = {"plain CFG (2 evals)": cfg_guider}
    for n in (1, 2, 4):
        variants[f"exact N={n} ({n + 2} evals)"] = lambda n=n: blend_guider(n, flow_blend.MODES[0])
    variants["joint N=4 (1 eval, s_T=1)"] = lambda: blend_guider(4, flow_blend.MODES[1])

    def timed_step(guider) -> tuple[float, int]:
        times = []

        def sampler(model_fn, x, sigmas, extra_args=None, callback=None, disable=None):
            s = sigmas[0] * x.new_ones([x.shape[0]])
            times.append(timed(lambda: model_fn(x, s, **extra_args), args.device))
            return x

        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss, torch.no_grad():
            guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(sampler), torch.tensor([0.7, 0.0]),
                          seed=0)
        peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else rss.above_base
        return times[0], peak

    guiders = {name: make() for name, make in variants.items()}
    samples: dict[str, list[float]] = {name: [] for name in guiders}
    peaks: dict[str, int] = {name: 0 for name in guiders}
    for round_ in range(args.repeats + 1):  # variants interleaved; round 0 is warm-up
        for name, guider in guiders.items():
            seconds, peak = timed_step(guider)
            peaks[name] = max(peaks[name], peak)
            if round_:
                samples[name].append(seconds)
    results = {name: (statistics.median(values), peaks[name]) for name, values in samples.items()}
    base = results["plain CFG (2 evals)"][0]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"flow-blend guider per step: size={args.size} ({layout.hidden_size} wide, {layout.depth_double}+"
          f"{layout.depth_single} blocks) {args.resolution}x{args.resolution}, {args.text_tokens} text tokens, "
          f"device={device_name} dtype={args.dtype}, median of {args.repeats}")
    rows = []
    for name, (seconds, peak) in results.items():
        evals = int(name.split("(")[1].split()[0])
        goal = (evals / 2) * 1.05 if name.startswith("exact") else (1.10 if name.startswith("joint") else 1.0)
        ratio = seconds / base
        rows.append({"variant": name, "seconds": seconds, "ratio_to_cfg": ratio, "goal": goal, "peak_bytes": peak})
        print(f"  {name:<26} {seconds:8.4f} s  {ratio:5.2f}x CFG (goal <= {goal:.2f}x)  peak +{peak / 2**20:8.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
