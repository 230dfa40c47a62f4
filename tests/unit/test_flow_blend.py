"""The flow-blend rule and joint rows on numbers (no model, no ComfyUI)."""

from __future__ import annotations

import pytest
import torch

from omni_attribute.flow_blend import flow_blend
from omni_attribute.injection import AttributeCondition, joint_rows


def test_flow_blend_formula_on_numbers():
    text, empty, a, b = (torch.tensor([v]) for v in (1.0, 0.5, 2.0, -1.0))
    assert flow_blend(text, empty, [a, b], [0.5, 2.0]).item() == pytest.approx(1.0 + 0.5 * 1.5 + 2.0 * -1.5)
    assert flow_blend(text, empty, [], [], text_scale=3.0).item() == pytest.approx(0.5 + 3.0 * 0.5)
    with pytest.raises(ValueError):
        flow_blend(text, empty, [a], [])


def test_joint_rows_concatenate_tokens_with_their_weights():
    first, second = torch.randn(2, 3, 4), torch.randn(1, 3, 4)
    tokens, weights = joint_rows([AttributeCondition(first, 0.5), AttributeCondition(second, 2.0)])
    assert torch.equal(tokens, torch.cat([first.reshape(6, 4), second.reshape(3, 4)]))
    assert weights.tolist() == [0.5] * 6 + [2.0] * 3
    with pytest.raises(ValueError, match="start_percent"):
        AttributeCondition(torch.zeros(1, 1, 1), start_percent=0.8, end_percent=0.2)


def test_blend_with_deltas_is_the_rule_from_differences():
    from omni_attribute.flow_blend import blend_with_deltas

    text, empty, a, b = (torch.tensor([v]) for v in (1.0, 0.5, 2.0, -1.0))
    exact = flow_blend(text, empty, [a, b], [0.5, 2.0], text_scale=3.0)
    assert torch.equal(blend_with_deltas(text, empty, [a - empty, b - empty], [0.5, 2.0], text_scale=3.0), exact)
    assert blend_with_deltas(text, None, [a - empty], [0.5]).item() == pytest.approx(1.0 + 0.5 * 1.5)
    with pytest.raises(ValueError):
        blend_with_deltas(text, empty, [a], [])


def test_step_clock_follows_the_sampler_callback():
    from omni_attribute.flow_blend import StepClock

    clock = StepClock.of(torch.tensor([1.0, 0.75, 0.5, 0.0]))
    seen = [(clock.step, clock.sigma)]
    for i in range(3):
        clock.step_done(i)
        seen.append((clock.step, clock.sigma))
    assert seen == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.5)]  # past the last step: the last evaluated sigma


def test_delta_reuse_refreshes_every_k_steps_and_holds_the_velocity_difference():
    from omni_attribute.flow_blend import DeltaReuse

    reuse = DeltaReuse(every=2)
    assert reuse.needs(1, 0)  # nothing held yet: evaluate whatever the step
    reuse.update(0, torch.tensor([2.0]), sigma=0.8)
    assert not reuse.needs(1, 0) and reuse.needs(2, 0) and reuse.needs(1, 1)
    assert reuse.delta(0, 0.4).item() == 2.0  # a velocity difference is held as it is
    assert reuse.delta(0, 0.4, "denoised").item() == pytest.approx(1.0)  # Δx0 = −σΔv: scaled by σ_now/σ_then
    reuse.reset()
    assert not reuse.held
    with pytest.raises(ValueError, match="at least 1"):
        DeltaReuse(0)
