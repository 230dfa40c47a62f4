"""Which rows of a batched call get which attribute tokens (the library's plan; no model, no ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from omni_attribute.injection import AttributeCondition, Injection, SigmaWindow
from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig


@pytest.fixture(scope="module")
def ip() -> IPAdapter:
    return IPAdapter(IPAdapterConfig(hidden_size=8, num_heads=2, context_dim=4, double_blocks=(0,), single_blocks=()))


def test_apply_to_positive_only_leaves_the_negative_rows_without_tokens(ip):
    tokens = torch.randn(1, 3, 4)
    injection = Injection(ip, AttributeCondition(tokens, 0.5), apply_to=frozenset({0}))
    plan = injection.plan(kinds=[0, 1], ids=["a", "b"], batch=4, n_img=6)
    assert plan.scale[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert torch.equal(plan.tokens[0], tokens[0]) and plan.value_scale[0].tolist() == [0.5] * 3


def test_a_guiders_per_condition_tokens_win_over_the_default(ip):
    default, own = AttributeCondition(torch.zeros(1, 2, 4)), AttributeCondition(torch.ones(2, 2, 4), 2.0)
    plan = Injection(ip, default).plan(kinds=[0, 0], ids=["x", "y"], batch=2, n_img=1, per_condition={"y": [own]})
    assert plan.tokens.shape == (2, 4, 4)  # row 1 attends to both rows of its condition (4 tokens)
    assert plan.key_mask[0].tolist() == [True, True, False, False] and plan.key_mask[1].all()
    assert torch.equal(plan.tokens[1], torch.ones(4, 4)) and plan.value_scale[1].tolist() == [2.0] * 4


def test_rows_per_batch_item_and_all_rows_together(ip):
    tokens = torch.arange(2 * 1 * 4, dtype=torch.float32).reshape(2, 1, 4)
    together = Injection(ip, AttributeCondition(tokens)).plan(kinds=[0], ids=[None], batch=2, n_img=1)
    assert together.tokens.shape == (2, 2, 4) and torch.equal(together.tokens[1], tokens.reshape(2, 4))
    one_each = Injection(ip, AttributeCondition(tokens), per_batch_item=True).plan(kinds=[0], ids=[None], batch=2,
                                                                                    n_img=1)
    assert one_each.tokens.shape == (2, 1, 4) and torch.equal(one_each.tokens[:, 0], tokens[:, 0])


def test_outside_its_sigma_window_or_at_weight_zero_nothing_acts(ip):
    condition = AttributeCondition(torch.randn(1, 2, 4), start_percent=0.2, end_percent=0.6)
    window = condition.sigma_window(lambda percent: 1.0 - percent)  # a linear schedule
    assert window == SigmaWindow(0.8, 0.4)
    injection = Injection(ip, condition, window=window)
    assert injection.plan([0], [None], 1, 1, sigma=0.9) is None
    assert injection.plan([0], [None], 1, 1, sigma=0.5) is not None
    assert Injection(ip, condition.with_weight(0.0)).plan([0], [None], 1, 1) is None
    assert SigmaWindow().contains(math.inf) and SigmaWindow().contains(None)


def test_a_mask_weights_the_image_tokens_on_their_grid(ip):
    mask = torch.zeros(1, 4, 4)
    mask[:, :, :2] = 1.0  # left half
    injection = Injection(ip, AttributeCondition(torch.randn(1, 2, 4)), mask=mask)
    plan = injection.plan([0], [None], batch=1, n_img=4, grid=(2, 2))
    assert plan.scale.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    with pytest.raises(RuntimeError, match="grid is unknown"):
        injection.plan([0], [None], batch=1, n_img=4)
