"""The two objectives: the generator's flow-matching loss (Lgen) and the four-term InfoNCE (Lcon)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_timesteps(n: int, mode: str = "logit_normal", generator: torch.Generator | None = None,
                     mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Flow times t ∈ (0,1) (t = 1 is pure noise). 'logit_normal': t = sigmoid(N(mean, std)) as in SD3/FLUX
    training; 'uniform'. ``shift`` > 1 moves mass to high noise: t' = shift·t / (1 + (shift − 1)·t)."""
    if mode == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator) * std + mean)
    elif mode == "uniform":
        t = torch.rand(n, generator=generator)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}: use 'logit_normal' or 'uniform'")
    if shift != 1.0:
        t = shift * t / (1 + (shift - 1) * t)
    return t.clamp(1e-4, 1 - 1e-4)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 − t)·x0 + t·noise."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(predicted_velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE to the rectified-flow velocity target v = noise − x0 (what FLUX predicts)."""
    return F.mse_loss(predicted_velocity.float(), (noise - x0).float())


def contrastive_loss(x_pos: torch.Tensor, y_pos: torch.Tensor, x_neg: torch.Tensor, y_neg: torch.Tensor,
                     tau: float = 0.1) -> torch.Tensor:
    """The paper's Lcon, averaged over pairs. Inputs are pooled embeddings [P, D]:
    x_pos = pool(E(I_x, a+)), y_pos = pool(E(I_y, a+)), x_neg = pool(E(I_x, a−)), y_neg = pool(E(I_y, a−)).

        Lcon = −log ψ(a+,a+) / [ψ(a+,a+) + ψ(a+,a−) + ψ(a−,a+) + ψ(a−,a−)]
    """
    cos = lambda a, b: F.cosine_similarity(a.float(), b.float(), dim=-1) / tau  # noqa: E731
    logits = torch.stack([cos(x_pos, y_pos), cos(x_pos, y_neg), cos(x_neg, y_pos), cos(x_neg, y_neg)], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - logits[:, 0]).mean()


def in_batch_contrastive_loss(x_pos: torch.Tensor, y_pos: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Extension, not in the paper: symmetric InfoNCE where the other pairs' E(·, a+) in the batch are
    extra negatives for each pair's positive (use with care: other pairs may share the attribute value)."""
    a, b = F.normalize(x_pos.float(), dim=-1), F.normalize(y_pos.float(), dim=-1)
    logits = a @ b.T / tau
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def delta_pos_neg(x_pos: torch.Tensor, y_pos: torch.Tensor, x_neg: torch.Tensor, y_neg: torch.Tensor) -> float:
    """Δ(pos, neg): mean cosine of positive pairs minus mean cosine of negative pairs (the paper's
    disentanglement number; ≈ 0 when the encoder ignores the attribute text)."""
    positive = F.cosine_similarity(x_pos.float(), y_pos.float(), dim=-1).mean()
    negative = F.cosine_similarity(x_neg.float(), y_neg.float(), dim=-1).mean()
    return float(positive - negative)
