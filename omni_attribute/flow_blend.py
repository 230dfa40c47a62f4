"""Composing several (image, attribute, weight) conditions: the paper's flow-blend rule.

With D(tokens, text) the generator's prediction, ∅ = no attribute / empty text:

    Δ_i = D(E_i, ∅) − D(∅, ∅)
    v*  = D(∅, ∅) + s_T · (D(∅, c) − D(∅, ∅)) + Σ_i w_i · Δ_i

s_T = 1 gives the paper's v* = D(∅, c) + Σ w_i Δ_i; N attributes cost N + 2 evaluations. The
coefficients add up to 1, so the rule holds for velocities and for ComfyUI's denoised (x0)
predictions alike (x0 = x − σ·v is affine in v).

The "joint" mode is an approximation, not the paper's rule: one conditional evaluation with all
attribute tokens attended together (each token group's values scaled by its weight) plus the
prompt, then ordinary guidance against D(∅, ∅): v ≈ D(∅,∅) + s_T·(D(E_all, c) − D(∅,∅)).
"""

from __future__ import annotations

from typing import Sequence

import torch


def flow_blend(text: torch.Tensor, empty: torch.Tensor, attributes: Sequence[torch.Tensor],
               weights: Sequence[float], text_scale: float = 1.0) -> torch.Tensor:
    """v* = D(∅,∅) + s_T (D(∅,c) − D(∅,∅)) + Σ w_i (D(E_i,∅) − D(∅,∅))."""
    if len(attributes) != len(weights):
        raise ValueError(f"{len(attributes)} attribute predictions but {len(weights)} weights")
    result = empty + text_scale * (text - empty)
    for prediction, weight in zip(attributes, weights):
        result = result + weight * (prediction - empty)
    return result
