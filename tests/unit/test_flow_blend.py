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
