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


def test_prepared_plans_are_cached_per_layout_device_dtype_and_weights(ip):
    """The sampler's path: one PreparedPlan per (conditions, layout, device, dtype, IP weights), with every
    IP block's keys/values; the same object again while nothing changes."""
    tokens = torch.randn(1, 3, 4)
    injection = Injection(ip, AttributeCondition(tokens, 0.5))
    first = injection.prepared([0, 1], ["a", "b"], batch=2)
    assert injection.prepared([0, 1], ["c", "d"], batch=2) is first  # new cond uuids, same rows: same plan
    assert set(first.keys_values) == {"double.0"}
    k, v = first.keys_values["double.0"]
    assert k.shape == v.shape == (2, 2, 3, 4) and injection.cache.builds == 1
    reference = injection.plan([0, 1], ["a", "b"], batch=2, n_img=1)
    ref_k, ref_v = ip.double_blocks["0"].keys_values(reference.tokens, reference.tokens)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v * 0.5)
    assert injection.prepared([0], ["a"], batch=2) is not first  # another layout
    double = injection.prepared([0, 1], ["a", "b"], batch=2, dtype=torch.float64)
    assert double is not first and double.keys_values["double.0"][0].dtype == torch.float64
    on_meta = injection.prepared([0, 1], ["a", "b"], batch=2, device="meta")
    assert on_meta.keys_values["double.0"][0].device.type == "meta"
    with torch.no_grad():
        tokens.add_(1.0)  # new values in the same tensor
    assert injection.prepared([0, 1], ["a", "b"], batch=2) is not first
    builds = injection.cache.builds
    with torch.no_grad():
        ip.double_blocks["0"].to_k.weight.mul_(1.0)  # weights touched in place
    injection.prepared([0, 1], ["a", "b"], batch=2)
    assert injection.cache.builds == builds + 1


def test_a_run_empties_the_cache_and_it_stays_small(ip):
    injection = Injection(ip, AttributeCondition(torch.randn(1, 2, 4)))
    injection.begin_run()
    injection.prepared([0], [None], batch=1)
    injection.begin_run()  # a nested run (a sampler inside a sampler) keeps the outer run's plans
    injection.end_run()
    assert len(injection.cache) == 1
    injection.end_run()
    assert len(injection.cache) == 0
    for batch in range(1, 20):
        injection.prepared([0], [None], batch=batch)
    assert len(injection.cache) == injection.cache.capacity


def test_the_window_is_a_device_factor_equal_to_the_host_decision(ip):
    """Rows of the injection's own condition follow its window through a 0/1 factor computed on the device;
    a guider's per-condition rows always act; an open window needs no factor at all."""
    condition = AttributeCondition(torch.randn(1, 2, 4), start_percent=0.2, end_percent=0.6)
    injection = Injection(ip, condition, window=condition.sigma_window(lambda percent: 1.0 - percent))
    own = AttributeCondition(torch.randn(1, 2, 4))
    prepared = injection.prepared([0, 1], ["x", "y"], batch=2, per_condition={"y": [own]})
    for sigma in (0.9, 0.8, 0.5, 0.4, 0.1):
        expected = [1.0 if injection.window.contains(sigma) else 0.0, 1.0]
        assert prepared.scale_at(torch.tensor([sigma, sigma]))[:, 0].tolist() == expected
    always = Injection(ip, AttributeCondition(torch.randn(1, 2, 4))).prepared([0], [None], batch=1)
    assert always.window is None and always.scale_at(torch.tensor([5.0])) is always.scale
    assert AttributeCondition(torch.zeros(1, 1, 4)).sigma_window(lambda p: 1.0 - p).always
