"""Per-step cost of the IP-Adapter patch: the same ComfyUI FLUX forward, unpatched vs patched.

    python benchmarks/ip_adapter.py                        # CPU: a small FLUX layout, 512x512
    python benchmarks/ip_adapter.py --size dev --device cuda --dtype bf16 --resolution 1024
                                                           # GPU: full FLUX.1-dev layout, random weights

One step = one ``apply_model`` call (batch 1, 512 text tokens) with the transformer_options a sampler
passes, so the patch's APPLY_MODEL wrapper and a TorchCompileModel wrapper run as in sampling. The
variants: plain; IP on all double blocks (the default layout); double + single; double with a MASK;
with ``--compile BACKEND`` also plain and IP-double compiled by ComfyUI's TorchCompileModel (ratios to
the compiled plain model). All calls interleaved round by round, median of the repeats; the ratio is
what to read. Goal at full size: the patch adds at most 5% per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's library, whatever the venv points at

import argparse
import json
import statistics
import uuid

import torch

from benchmarks.timing import PeakMemory, clock_name, timed, use_cpu_time
from devtools.comfy_flux import build_comfy_flux, comfy_flux_forward
from devtools.comfy_host import import_in_process
from omni_attribute.flux_models import FluxLayout
from omni_attribute.injection import AttributeCondition, Injection
from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig

SIZES = {
    "small": FluxLayout(hidden_size=512, num_heads=8, depth_double=4, depth_single=8, context_dim=512, vec_in_dim=64,
                        axes_dim=[8, 28, 28]),
    "dev": FluxLayout.flux_dev(),
}


def build(size: str, device: str, dtype: torch.dtype):
    import comfy.model_patcher

    layout = SIZES[size]
    if device == "cpu":
        model = build_comfy_flux(layout, seed=0, dtype=dtype)
    else:  # full size: allocate on the device and fill with random weights there
        model = build_comfy_flux(layout, dtype=dtype, device="meta")
        model.diffusion_model.to_empty(device=device)
        with torch.no_grad():
            for param in model.diffusion_model.parameters():
                param.normal_(0, param.shape[-1] ** -0.5 if param.ndim > 1 else 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device(device))
    return layout, patcher


def flux_benchmark_args(description: str, text_tokens: int, extra=None) -> argparse.Namespace:
    """The options every FLUX benchmark shares (``extra(parser)`` adds a benchmark's own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(parser)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=text_tokens)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also time the models compiled by ComfyUI's TorchCompileModel with this backend "
                             "(inductor on a GPU; minutes of compiling on a CPU)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time CPU time of one thread (one torch thread) instead of wall clock: for shared machines")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cpu_time:
        use_cpu_time()
    return args


def measure(size: str = "small", device: str = "cpu", dtype: torch.dtype = torch.float32, resolution: int = 512,
            text_tokens: int = 512, repeats: int = 5, compile_backend: str | None = None) -> dict:
    """Median seconds per step and peak memory of each variant (see the module doc)."""
    nodes = import_in_process(cpu=device == "cpu").nodes
    apply_injection = nodes.apply.apply_injection

    layout, plain = build(size, device, dtype)
    side = resolution // 8
    mask = torch.zeros(1, resolution, resolution)
    mask[:, :, : resolution // 2] = 1.0  # the left half
    tokens = torch.randn(1, 16, layout.context_dim, generator=torch.Generator().manual_seed(0))
    variants = {"plain": plain}
    for name, single, where in (("ip-double", "none", None), ("ip-double+single", "all", None),
                                ("ip-double+mask", "none", mask)):
        torch.manual_seed(0)
        ip = IPAdapter(IPAdapterConfig.for_layout(layout, "all", single)).to(device, dtype)
        variants[name] = apply_injection(plain, Injection(ip=ip, condition=AttributeCondition(tokens), mask=where))
    if compile_backend:
        from comfy_extras.nodes_torch_compile import TorchCompileModel

        variants["compiled plain"] = TorchCompileModel.execute(plain, compile_backend).result[0]
        variants["compiled ip-double"] = TorchCompileModel.execute(variants["ip-double"], compile_backend).result[0]

    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, side, side, generator=g).to(device)
    context = torch.randn(1, text_tokens, layout.context_dim, generator=g).to(device, dtype)
    y = torch.randn(1, layout.vec_in_dim, generator=g).to(device, dtype)
    sigma, guidance = torch.tensor([0.7], device=device), torch.tensor([3.5], device=device)

    def step(model):
        options = dict(model.model_options.get("transformer_options", {}))
        options.update(wrappers=model.wrappers, cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
        with torch.no_grad():
            model.model.apply_model(latent, sigma, c_crossattn=context, transformer_options=options, y=y,
                                    guidance=guidance)

    times = {name: [] for name in variants}
    peaks = {name: 0 for name in variants}
    for round_ in range(repeats + 1):  # round 0 is warm-up (and compiles)
        for name, model in variants.items():
            with PeakMemory(device) as memory:
                seconds = timed(lambda: step(model), device)
            peaks[name] = max(peaks[name], memory.peak) if round_ else peaks[name]
            if round_:
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = []
    for name, seconds in median.items():
        base = median["compiled plain"] if name.startswith("compiled") else median["plain"]
        rows.append({"variant": name, "seconds": seconds, "ratio": seconds / base, "peak_bytes": peaks[name]})
    return {"size": size, "layout": f"{layout.hidden_size} wide, {layout.depth_double} double + "
            f"{layout.depth_single} single blocks", "resolution": resolution, "image_tokens": (side // 2) ** 2,
            "text_tokens": text_tokens, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "dtype": str(dtype).replace("torch.", ""), "repeats": repeats, "compile": compile_backend,
            "clock": clock_name(), "threads": torch.get_num_threads(), "rows": rows}


def report(result: dict) -> str:
    lines = [f"IP-Adapter per-step overhead: size={result['size']} ({result['layout']}) {result['resolution']}x"
             f"{result['resolution']} ({result['image_tokens']} image tokens, {result['text_tokens']} text tokens) "
             f"device={result['device']} dtype={result['dtype']}, median of {result['repeats']} ({result['clock']}, "
             f"{result['threads']} threads)"]
    for row in result["rows"]:
        against = "compiled plain" if row["variant"].startswith("compiled") else "plain"
        lines.append(f"  {row['variant']:<20} {row['seconds']:8.4f} s/step   {row['ratio']:5.3f}x {against}   "
                     f"peak {row['peak_bytes'] / 2**20:8.1f} MiB")
    return "\n".join(lines)


def main() -> None:
    args = flux_benchmark_args(__doc__, text_tokens=512)
    result = measure(args.size, args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
                     args.resolution, args.text_tokens, args.repeats, args.compile)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=2))


if __name__ == "__main__":
    main()
