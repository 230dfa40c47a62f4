"""Losses on hand-made tensors with known answers."""

import math

import pytest
import torch

from omni_attribute.train.losses import (contrastive_loss, delta_pos_neg, flow_matching_loss, in_batch_contrastive_loss,
                                         noisy_latents, sample_timesteps)

E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def test_contrastive_known_values():
    tau = 0.1
    # cos(x+,y+) = 1, cos(x+,y−) = 0, cos(x−,y+) = 0, cos(x−,y−) = −1
    loss = contrastive_loss(E1, E1, E2, -E2, tau)
    logits = torch.tensor([1.0, 0.0, 0.0, -1.0]) / tau
    assert loss.item() == pytest.approx((torch.logsumexp(logits, 0) - logits[0]).item(), rel=1e-6)
    # the pair differs in a−: identical negative embeddings (cos(x−,y−) = 1) must cost more
    assert contrastive_loss(E1, E1, -E1, -E1, tau).item() == pytest.approx(math.log(2), rel=1e-4)
    assert contrastive_loss(E1, E1, -E1, -E1, tau) > loss


def test_identical_positives_beat_swapped_labels():
    torch.manual_seed(0)
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    good = contrastive_loss(a, a + 0.01 * torch.randn(8, 16), b, -b)
    swapped = contrastive_loss(a, b, a + 0.01 * torch.randn(8, 16), -b)
    assert good < swapped
    assert good.item() < 0.1 and swapped.item() > 1.0


def test_scale_invariance_and_temperature():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(contrastive_loss(a, b, b, a), contrastive_loss(3 * a, 2 * b, b, a))
    # at high temperature every term weighs the same: → log 4
    assert contrastive_loss(a, b, b, a, tau=1e6).item() == pytest.approx(math.log(4), rel=1e-4)


def test_in_batch_extension():
    a = torch.eye(4)
    assert in_batch_contrastive_loss(a, a, tau=0.05).item() < 1e-6
    assert in_batch_contrastive_loss(a, a.roll(1, 0), tau=0.05).item() > 10


def test_delta_pos_neg():
    assert delta_pos_neg(E1, E1, E1, E2) == pytest.approx(1.0)
    assert delta_pos_neg(E1, E2, E1, E1) == pytest.approx(-1.0)


def test_flow_matching_target_and_timesteps():
    x0, noise = torch.zeros(2, 3), torch.ones(2, 3)
    assert flow_matching_loss(noise - x0, x0, noise).item() == 0
    assert flow_matching_loss(torch.zeros(2, 3), x0, noise).item() == pytest.approx(1.0)
    assert torch.equal(noisy_latents(x0, noise, torch.tensor([0.0, 1.0])), torch.tensor([[0.0] * 3, [1.0] * 3]))
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(10_000, "logit_normal", g)
    assert 0 < t.min() and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.02
    shifted = sample_timesteps(10_000, "logit_normal", torch.Generator().manual_seed(0), shift=3.0)
    assert shifted.mean() > t.mean() + 0.1
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        sample_timesteps(1, "cosine")
