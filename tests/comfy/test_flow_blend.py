"""The flow-blend guider on a tiny FLUX in-process: exactly the paper's rule, batched in one call."""

from __future__ import annotations

import pytest
import torch

from devtools.comfy_flux import build_comfy_flux
from omni_attribute import injection, ip_adapter
from omni_attribute.flux_models import FluxLayout
from omni_attribute.injection import AttributeCondition


@pytest.fixture(scope="module")
def lib(plugin_nodes):
    """The modules under test: the plugin's guider and patch, and the library."""
    class Lib:
        pass
    Lib.flow_blend, Lib.apply, Lib.injection, Lib.ip_adapter = plugin_nodes.flow_blend, plugin_nodes.apply, injection, ip_adapter
    return Lib


@pytest.fixture(scope="module")
def setup(lib, comfy_in_process):
    import comfy.model_patcher

    layout = FluxLayout.tiny()
    model = comfy.model_patcher.ModelPatcher(build_comfy_flux(layout, seed=0), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    torch.manual_seed(11)
    ip = lib.ip_adapter.IPAdapter(lib.ip_adapter.IPAdapterConfig.for_layout(layout, "all", "all"))
    with torch.no_grad():
        for name, param in ip.named_parameters():
            if "to_v" in name:
                param.normal_(0, 0.2)
    g = torch.Generator().manual_seed(2)

    def conditioning():
        return [[torch.randn(1, 5, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]

    return {"model": model, "ip": ip, "positive": conditioning(), "empty": conditioning(),
            "tokens": [torch.randn(1, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)],
            "noise": torch.randn(1, 16, 8, 8, generator=g)}


def one_evaluation(guider, setup, sigma=0.7):
    """The guider's denoised prediction at one sigma, through ComfyUI's own sampling path (one model call)."""
    import comfy.samplers

    captured = []

    def single_call(model, x, sigmas, extra_args=None, callback=None, disable=None):
        captured.append(model(x, sigmas[0] * x.new_ones([x.shape[0]]), **extra_args))
        return captured[-1]

    with torch.no_grad():
        guider.sample(setup["noise"], torch.zeros_like(setup["noise"]), comfy.samplers.KSAMPLER(single_call),
                      torch.tensor([sigma, 0.0]), seed=0)
    return captured[0]


def close(a, b):
    """Equal up to float32 rounding of batched vs unbatched passes: 1e-5, relative to the values' size."""
    return torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def plain(setup, model, positive, negative, cfg=1.0):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return one_evaluation(guider, setup)


def with_tokens(lib, setup, tokens, weight=1.0, apply_to=None):
    return lib.apply.apply_injection(setup["model"], lib.injection.Injection(
        ip=setup["ip"], condition=AttributeCondition(tokens, weight), apply_to=apply_to))


def blend(lib, setup, conditions, text_scale=1.0, mode="exact"):
    guider = lib.flow_blend.FlowBlendGuider(setup["model"], setup["ip"], conditions, text_scale, mode)
    guider.set_conds(setup["positive"], setup["empty"])
    return one_evaluation(guider, setup)


def conditions(lib, setup, weights, **kwargs):
    return [AttributeCondition(t, w, **kwargs) for t, w in zip(setup["tokens"], weights)]


@pytest.mark.parametrize("text_scale", [1.0, 2.5])
def test_guider_equals_separate_evaluations_combined_by_hand(lib, setup, text_scale):
    model, pos, empty = setup["model"], setup["positive"], setup["empty"]
    text = plain(setup, model, pos, empty)
    nothing = plain(setup, model, empty, empty)
    attributes = [plain(setup, with_tokens(lib, setup, t), empty, empty) for t in setup["tokens"]]
    weights = [0.7, 1.3]
    expected = nothing + text_scale * (text - nothing) + sum(w * (a - nothing) for w, a in zip(weights, attributes))
    got = blend(lib, setup, conditions(lib, setup, weights), text_scale)
    assert (attributes[0] - nothing).abs().max() > 1e-3  # the attribute terms are not trivially zero
    assert close(got, expected), (got - expected).abs().max()


def test_all_conditions_go_through_one_batched_call(lib, setup):
    calls = []
    hook = setup["model"].model.diffusion_model.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        blend(lib, setup, conditions(lib, setup, [0.5, 0.5]))
    finally:
        hook.remove()
    assert calls == [4]  # N + 2 = 4 rows, one forward pass


def test_no_attribute_is_the_text_conditional_prediction(lib, setup):
    text = plain(setup, setup["model"], setup["positive"], setup["empty"])
    assert torch.allclose(blend(lib, setup, []), text, atol=1e-6)


def test_linear_in_each_weight(lib, setup):
    outputs = [blend(lib, setup, conditions(lib, setup, [w, 0.4])) for w in (0.0, 1.0, 2.0)]
    assert close(outputs[2] - outputs[1], outputs[1] - outputs[0])
    assert (outputs[1] - outputs[0]).abs().max() > 1e-3


def test_inactive_attributes_drop_out(lib, setup):
    late = conditions(lib, setup, [0.8, 1.0])
    late[1] = AttributeCondition(setup["tokens"][1], 1.0, start_percent=0.95, end_percent=1.0)
    only_first = conditions(lib, setup, [0.8])
    assert torch.allclose(blend(lib, setup, late), blend(lib, setup, only_first), atol=1e-6)


@pytest.mark.parametrize("text_scale", [1.0, 3.0])
def test_joint_mode_with_one_attribute_is_apply_plus_cfg(lib, setup, text_scale):
    tokens = setup["tokens"][1]
    reference = plain(setup, with_tokens(lib, setup, tokens, weight=0.6, apply_to=frozenset({0})),
                      setup["positive"], setup["empty"], cfg=text_scale)
    got = blend(lib, setup, [AttributeCondition(tokens, 0.6)], text_scale, mode="joint (approximation)")
    assert close(got, reference), (got - reference).abs().max()
