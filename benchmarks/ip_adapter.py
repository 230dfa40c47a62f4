"""Per-step cost of the IP-Adapter patch: the same ComfyUI FLUX forward, unpatched vs patched.

    python benchmarks/ip_adapter.py                        # CPU: a small FLUX layout, 512x512
    python benchmarks/ip_adapter.py --size dev --device cuda --dtype bf16 --resolution 1024
                                                           # GPU: full FLUX.1-dev layout, random weights

One step = one call of the diffusion model (batch 1, 512 text tokens at full size) through the
same transformer_options a sampler would pass. Plain and patched calls are interleaved in one run;
the ratio is what to read. Goal at full size: the patch adds at most 5% per step.
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

from benchmarks.timing import timed
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


def flux_benchmark_args(description: str, text_tokens: int) -> argparse.Namespace:
    """The options every FLUX benchmark shares."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=text_tokens)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def main() -> None:
    args = flux_benchmark_args(__doc__, text_tokens=512)
    apply_injection = import_in_process(cpu=args.device == "cpu").nodes.apply.apply_injection

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    layout, plain = build(args.size, args.device, dtype)
    variants = {"plain": plain}
    for name, single in (("ip-double", "none"), ("ip-double+single", "all")):
        torch.manual_seed(0)
        ip = IPAdapter(IPAdapterConfig.for_layout(layout, "all", single)).to(args.device, dtype)
        tokens = torch.randn(1, 16, layout.context_dim)
        variants[name] = apply_injection(plain, Injection(ip=ip, condition=AttributeCondition(tokens)))

    side = args.resolution // 8
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, side, side, generator=g).to(args.device)
    context = torch.randn(1, args.text_tokens, layout.context_dim, generator=g).to(args.device)
    y = torch.randn(1, layout.vec_in_dim, generator=g).to(args.device)
    sigma, guidance = torch.tensor([0.7], device=args.device), torch.tensor([3.5], device=args.device)

    def step(model):
        options = dict(model.model_options.get("transformer_options", {}))
        options.update(wrappers=model.wrappers, cond_or_uncond=[0], uuids=[uuid.uuid4()], sigmas=sigma)
        with torch.no_grad():
            comfy_flux_forward(model.model, latent, sigma, context, y, guidance, transformer_options=options)

    times = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):
        for name, model in variants.items():
            seconds = timed(lambda: step(model), args.device)
            if round_:  # round 0 is warm-up
                times[name].append(seconds)
    median = {name: statistics.median(values) for name, values in times.items()}
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"IP-Adapter per-step overhead: size={args.size} ({layout.hidden_size} wide, {layout.depth_double} double + "
          f"{layout.depth_single} single blocks) {args.resolution}x{args.resolution} ({side // 2 * side // 2} image "
          f"tokens, {args.text_tokens} text tokens) device={device_name} dtype={args.dtype}, median of {args.repeats}")
    rows = []
    for name, seconds in median.items():
        ratio = seconds / median["plain"]
        rows.append({"variant": name, "seconds": seconds, "ratio": ratio})
        print(f"  {name:<18} {seconds:8.4f} s/step   {ratio:5.3f}x plain")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": device_name,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
