"""The world's text-to-image generator: the trainer's *tiny* generator family (a small FLUX, a hashed-token
text encoder, the exact pixel codec) trained from scratch with the rectified-flow loss on world images and
captions, then frozen and saved as a tiny generator folder (``omni_attribute.train.generator``). The
same folder loads in ComfyUI through the laboratory's node pack (``lab/comfy_nodes``)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from omni_attribute.flow_blend import DeltaReuse, blend_with_deltas, flow_blend
from omni_attribute.flux_models import (
    FluxLayout,
    build_diffusers_flux,
    diffusers_flux_forward,
)
from omni_attribute.ip_adapter import ip_kwargs
from omni_attribute.train.generator import (
    PixelCodec,
    TinyTextEncoder,
    save_tiny_generator,
)
from omni_attribute.train.losses import (
    flow_matching_loss,
    noisy_latents,
    sample_timesteps,
)

from .factors import FACTORS, Assignment, caption_without

WORLD_LAYOUT = FluxLayout(hidden_size=128, num_heads=4, depth_double=3, depth_single=3, context_dim=64,
                          vec_in_dim=32, axes_dim=[8, 12, 12])
def clipped_step(loss: torch.Tensor, params, optimizer, schedule) -> None:
    """One optimiser step of the world's from-scratch training loops (gradient norm clipped at 1)."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()


def train_world_generator(images: torch.Tensor, assignments: list[Assignment], tokenizer, folder: str | Path,
                          steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                          drop_caption: float = 0.1, drop_factor: float = 0.25, layout: FluxLayout = WORLD_LAYOUT,
                          progress=None, device: str | torch.device = "cpu", bf16: bool = False) -> Path:
    """Train DiT and text encoder from scratch; ``images`` [N,3,32,32] in [0,1] with their ground truth.

    Each caption leaves every factor out with probability ``drop_factor`` (and the whole caption with
    ``drop_caption``): prompts that leave a factor to a reference image must be in the generator's
    distribution, or it draws noise for them. Trained on ``device`` (``bf16``: under bf16 autocast); batches,
    noise and timesteps are drawn on the host, so a device changes the arithmetic only."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    transformer = build_diffusers_flux(layout).to(device)
    text = TinyTextEncoder(tokenizer, layout.context_dim, layout.vec_in_dim).to(device)
    codec = PixelCodec()
    params = list(transformer.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    latents = codec.encode(images)
    transformer.train()
    text.train()
    for step in range(steps):
        index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        batch_captions = [training_caption(assignments[i], rng, drop_caption, drop_factor) for i in index.tolist()]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = sample_timesteps(batch_size, "logit_normal", generator).to(device)
        x0 = x0.to(device)
        guidance = torch.full((batch_size,), 1.0, device=device) if layout.guidance_embed else None
        with autocast(device, bf16):
            context, pooled = text(batch_captions)
            velocity = diffusers_flux_forward(transformer, noisy_latents(x0, noise, t), t, context, pooled, guidance)
        loss = flow_matching_loss(velocity.float(), x0, noise)
        clipped_step(loss, params, optimizer, schedule)
        if progress:
            progress(step + 1, steps, float(loss.detach()))
    return save_tiny_generator(folder, transformer.cpu(), text.cpu(), tokenizer, layout,
                               {"steps": steps, "seed": seed, "drop_factor": drop_factor})


def autocast(device: str | torch.device, bf16: bool):
    """bf16 autocast on ``device`` where asked (a no-op context otherwise)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def training_caption(a: Assignment, rng: random.Random, drop_caption: float, drop_factor: float) -> str:
    """A caption of ``a`` for generator training: empty, or naming a random subset of the factors."""
    if rng.random() < drop_caption:
        return ""
    return caption_without(a, {f for f in FACTORS if rng.random() < drop_factor})


def sample_images(transformer, text, layout: FluxLayout, captions: list[str], seed: int = 0, steps: int = 20,
                  text_scale: float = 3.0, size: int = 32, bf16: bool = False) -> torch.Tensor:
    """Text-to-image with classifier-free guidance on the caption: [B,3,size,size] in [0,1]."""
    return sample_composed(transformer, text, layout, captions, [], [], seed, steps, text_scale, size, bf16=bf16)


@torch.no_grad()
def sample_composed(transformer, text, layout: FluxLayout, captions: list[str], tokens: list[torch.Tensor],
                    weights: list[float], seed: int = 0, steps: int = 20, text_scale: float = 1.0,
                    size: int = 32, reuse_every: int | None = None, bf16: bool = False) -> torch.Tensor:
    """The flow-blend rule in the diffusers twin: per step v* = v(∅,∅) + s_T (v(∅,c) − v(∅,∅)) +
    Σ w_i (v(E_i,∅) − v(∅,∅)); ``tokens[i]`` is [B,M,D] (one reference per sample and attribute).

    ``reuse_every``: the approximation of the ComfyUI guider's "reuse Δ every k steps" modes (the same
    :class:`~omni_attribute.flow_blend.DeltaReuse` rule): each v(E_i,∅) − v(∅,∅) evaluated every k-th
    step and held in between.

    Runs on the transformer's device (``bf16``: under bf16 autocast); the starting noise is drawn on the host,
    so every device starts from the same; the images come back on the host."""
    codec = PixelCodec()
    b = len(captions)
    device = next(transformer.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, codec.latent_channels, size // 2, size // 2, generator=g).to(device)
    tokens = [tok.to(device) for tok in tokens]
    with autocast(device, bf16):
        cond_ctx, cond_pool = text(captions)
        null_ctx, null_pool = text([""] * b)
    guidance = torch.full((b,), 1.0, device=device) if layout.guidance_embed else None
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    reuse = DeltaReuse(reuse_every) if reuse_every else None
    for i in range(steps):
        t = torch.full((b,), float(sigmas[i]), device=device)

        def run(ctx: torch.Tensor, pool: torch.Tensor, tok: torch.Tensor | None, x=x, t=t) -> torch.Tensor:
            kwargs = ip_kwargs(tok, 1.0, txt_len=ctx.shape[1]) if tok is not None else None
            with autocast(device, bf16):
                return diffusers_flux_forward(transformer, x, t, ctx, pool, guidance, joint_attention_kwargs=kwargs).float()
        if reuse is None:
            text_v, empty_v = run(cond_ctx, cond_pool, None), run(null_ctx, null_pool, None)
            attribute_v = [run(null_ctx, null_pool, tok) for tok in tokens]
            v = flow_blend(text_v, empty_v, attribute_v, weights, text_scale)
        else:
            fresh = [j for j in range(len(tokens)) if reuse.needs(i, j)]
            text_v = run(cond_ctx, cond_pool, None)
            empty_v = run(null_ctx, null_pool, None) if fresh or text_scale != 1.0 else None
            for j in fresh:
                reuse.update(j, run(null_ctx, null_pool, tokens[j]) - empty_v, float(sigmas[i]))
            v = blend_with_deltas(text_v, empty_v, [reuse.delta(j, float(sigmas[i])) for j in range(len(tokens))],
                                  weights, text_scale)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return codec.decode(x).cpu()
