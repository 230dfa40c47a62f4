"""IP-Adapter: ComfyUI patches (the real ModelPatcher path) vs the diffusers twin, on a tiny FLUX built
from the same weights; schedule, per-condition tokens, masks, stacking; FLUX.1-dev shapes on meta."""

from __future__ import annotations

import uuid

import pytest
import torch

from devtools.comfy_flux import (
    build_comfy_flux,
    comfy_flux_forward,
    comfy_flux_state_dict,
)
from omni_attribute import errors, injection, ip_adapter
from omni_attribute.flux_models import (
    FluxLayout,
    build_diffusers_flux,
    comfy_to_diffusers_flux,
    diffusers_flux_forward,
)


@pytest.fixture(scope="module")
def lib(plugin_nodes):
    """The modules under test: the library and the plugin's ComfyUI patch (nodes/apply.py)."""
    class Lib:
        pass
    Lib.ip_adapter, Lib.injection, Lib.errors, Lib.apply = ip_adapter, injection, errors, plugin_nodes.apply
    return Lib


@pytest.fixture(scope="module")
def layout(comfy_in_process):
    return FluxLayout.tiny()


@pytest.fixture(scope="module")
def models(layout, comfy_in_process):
    import comfy.model_patcher

    comfy_model = build_comfy_flux(layout, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(comfy_model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    twin = build_diffusers_flux(layout, comfy_to_diffusers_flux(comfy_flux_state_dict(comfy_model), layout))
    return patcher, twin


@pytest.fixture(scope="module")
def ip(lib, layout):
    torch.manual_seed(5)
    config = lib.ip_adapter.IPAdapterConfig.for_layout(layout, "all", "all")
    module = lib.ip_adapter.IPAdapter(config)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "to_v" in name:
                param.normal_(0, 0.15)
    return module


@pytest.fixture(scope="module")
def inputs(layout):
    g = torch.Generator().manual_seed(3)
    return {"latent": torch.randn(2, 16, 8, 12, generator=g), "sigma": torch.tensor([0.6, 0.6]),
            "context": torch.randn(2, 5, 64, generator=g), "y": torch.randn(2, 32, generator=g),
            "guidance": torch.tensor([3.5, 3.5]), "tokens": torch.randn(1, 4, 64, generator=g)}


def comfy_run(patcher, x, kinds=(0,), sigma=None):
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = patcher.wrappers
    options["cond_or_uncond"] = list(kinds)
    options["uuids"] = [uuid.uuid4() for _ in kinds]
    options["sigmas"] = x["sigma"] if sigma is None else sigma
    with torch.no_grad():
        return comfy_flux_forward(patcher.model, x["latent"], x["sigma"], x["context"], x["y"], x["guidance"],
                                  transformer_options=options)


def twin_run(twin, x, kwargs=None):
    with torch.no_grad():
        return diffusers_flux_forward(twin, x["latent"], x["sigma"], x["context"], x["y"], x["guidance"],
                                      joint_attention_kwargs=kwargs)


def apply(lib, patcher, ip, tokens, weight=1.0, sigma_start=float("inf"), sigma_end=0.0, **settings):
    condition = lib.injection.AttributeCondition(tokens, weight) if tokens is not None else None
    window = lib.injection.SigmaWindow(sigma_start, sigma_end)
    return lib.apply.apply_injection(patcher, lib.injection.Injection(ip=ip, condition=condition, window=window,
                                                                      **settings))


@pytest.fixture(scope="module")
def twin_with_ip(lib, models, ip):
    _, twin = models
    lib.ip_adapter.attach_to_diffusers(twin, ip)
    return twin


def test_unpatched_models_agree(models, inputs):
    patcher, twin = models
    assert torch.allclose(comfy_run(patcher, inputs), twin_run(twin, inputs), atol=1e-4)


def test_weight_zero_is_the_unpatched_model(lib, models, ip, inputs, twin_with_ip):
    patcher, _ = models
    plain = comfy_run(patcher, inputs)
    assert torch.equal(comfy_run(apply(lib, patcher, ip, inputs["tokens"], weight=0.0), inputs), plain)
    zero = lib.ip_adapter.ip_kwargs(inputs["tokens"].expand(2, -1, -1), 0.0, txt_len=5)
    assert torch.allclose(twin_run(twin_with_ip, inputs, zero), plain, atol=1e-4)


def test_weight_changes_output_identically_in_both(lib, models, ip, inputs, twin_with_ip):
    patcher, _ = models
    plain = comfy_run(patcher, inputs)
    patched = comfy_run(apply(lib, patcher, ip, inputs["tokens"], weight=0.8), inputs)
    assert (patched - plain).abs().max() > 1e-2
    twin = twin_run(twin_with_ip, inputs, lib.ip_adapter.ip_kwargs(inputs["tokens"].expand(2, -1, -1), 0.8, txt_len=5))
    assert torch.allclose(patched, twin, atol=1e-4), (patched - twin).abs().max()
    other_tokens = comfy_run(apply(lib, patcher, ip, inputs["tokens"] + 1.0, weight=0.8), inputs)
    assert (other_tokens - patched).abs().max() > 1e-3


def test_each_condition_gets_its_own_tokens(lib, models, ip, inputs, twin_with_ip):
    """Batch of two conditions (positive, negative): 'positive only' leaves the negative row unpatched."""
    patcher, _ = models
    plain = comfy_run(patcher, inputs, kinds=(0, 1))
    patched = comfy_run(apply(lib, patcher, ip, inputs["tokens"], weight=0.8, apply_to=frozenset({0})),
                        inputs, kinds=(0, 1))
    assert torch.allclose(patched[1], plain[1], atol=1e-6) and (patched[0] - plain[0]).abs().max() > 1e-2
    twin = twin_run(twin_with_ip, inputs,
                    lib.ip_adapter.ip_kwargs(inputs["tokens"].expand(2, -1, -1), torch.tensor([0.8, 0.0]), txt_len=5))
    assert torch.allclose(patched, twin, atol=1e-4)


def test_per_condition_tokens_by_uuid(lib, models, ip, inputs, twin_with_ip):
    """A guider puts {uuid: [conditions]} in transformer_options: row 0 gets tokens A, row 1 tokens B."""
    patcher, _ = models
    a, b = inputs["tokens"], torch.randn(1, 4, 64)
    model = apply(lib, patcher, ip, None)
    options = dict(model.model_options["transformer_options"])
    ids = [uuid.uuid4(), uuid.uuid4()]
    per_condition = {ids[0]: [lib.injection.AttributeCondition(a, 0.7)],
                     ids[1]: [lib.injection.AttributeCondition(b, 0.7)]}
    options.update(wrappers=model.wrappers, cond_or_uncond=[0, 1], uuids=ids, sigmas=inputs["sigma"],
                   **{lib.apply.COND_CONDITIONS: per_condition})
    with torch.no_grad():
        out = comfy_flux_forward(model.model, inputs["latent"], inputs["sigma"], inputs["context"], inputs["y"],
                                 inputs["guidance"], transformer_options=options)
    twin = twin_run(twin_with_ip, inputs, lib.ip_adapter.ip_kwargs(torch.cat([a, b]), 0.7, txt_len=5))
    assert torch.allclose(out, twin, atol=1e-4)


def test_mask_limits_where_the_attribute_acts(lib, models, ip, inputs, twin_with_ip):
    patcher, _ = models
    mask = torch.zeros(1, 64, 96)
    mask[:, :, :48] = 1.0  # left half
    patched = comfy_run(apply(lib, patcher, ip, inputs["tokens"], weight=1.0, mask=mask), inputs)
    spatial = lib.injection.spatial_weights(mask, (4, 6), 24, 2)
    assert spatial[0].reshape(4, 6)[:, :3].min() == 1 and spatial[0].reshape(4, 6)[:, 3:].max() == 0
    twin = twin_run(twin_with_ip, inputs, lib.ip_adapter.ip_kwargs(inputs["tokens"].expand(2, -1, -1), 1.0,
                                                                    txt_len=5, spatial=spatial))
    assert torch.allclose(patched, twin, atol=1e-4)


def test_schedule_outside_the_range_is_unpatched(lib, models, ip, inputs):
    patcher, _ = models
    model = apply(lib, patcher, ip, inputs["tokens"], weight=1.0, sigma_start=0.5, sigma_end=0.2)
    assert torch.equal(comfy_run(model, inputs, sigma=torch.tensor([0.9, 0.9])), comfy_run(patcher, inputs))
    assert not torch.allclose(comfy_run(model, inputs, sigma=torch.tensor([0.3, 0.3])),
                              comfy_run(patcher, inputs, sigma=torch.tensor([0.3, 0.3])), atol=1e-3)


def test_two_applies_stack_and_the_input_model_is_untouched(lib, models, ip, inputs):
    patcher, _ = models
    before = dict(patcher.model_options.get("transformer_options", {}))
    once = comfy_run(apply(lib, patcher, ip, inputs["tokens"], weight=0.8), inputs)
    twice = comfy_run(apply(lib, apply(lib, patcher, ip, inputs["tokens"], weight=0.5), ip, inputs["tokens"],
                            weight=0.3), inputs)
    assert torch.allclose(once, twice, atol=1e-5)
    assert patcher.model_options.get("transformer_options", {}) == before
    assert not patcher.additional_models and not patcher.wrappers


def test_layout_and_family_errors(lib, models, layout, comfy_in_process):
    import comfy.model_patcher
    import comfy.supported_models

    patcher, _ = models
    bigger = lib.ip_adapter.IPAdapter(lib.ip_adapter.IPAdapterConfig.for_layout(
        FluxLayout(hidden_size=64, num_heads=2, depth_double=4, depth_single=1, context_dim=64, vec_in_dim=32,
                   axes_dim=[4, 14, 14])))
    with pytest.raises(lib.errors.AdapterMismatchError, match="another block layout"):
        apply(lib, patcher, bigger, torch.zeros(1, 4, 64))
    sd3 = comfy.supported_models.SD3({"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2,
                                      "adm_in_channels": 32, "pos_embed_max_size": 8, "num_patches": 64,
                                      "context_embedder_config": {"target": "torch.nn.Linear",
                                                                  "params": {"in_features": 64, "out_features": 64}}})
    other = comfy.model_patcher.ModelPatcher(sd3.get_model({}, "", device=torch.device("meta")),
                                             load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="supports FLUX.1 models.*OpenAISignatureMMDITWrapper"):
        lib.apply.flux_diffusion_model(other)


def test_flux_dev_layout_on_meta(lib, comfy_in_process):
    import comfy.model_patcher

    dev = FluxLayout.flux_dev()
    with torch.device("meta"):
        ip = lib.ip_adapter.IPAdapter(lib.ip_adapter.IPAdapterConfig.for_layout(dev, "all", "none"))
    per_block = 2 * 4096 * 3072 + 128
    assert sum(p.numel() for p in ip.parameters()) == 19 * per_block  # 478M: K/V for the 19 double blocks
    with torch.device("meta"):
        k, v = ip.double_blocks["0"].keys_values(torch.empty(2, 16, 4096), like=torch.empty(1, device="meta"))
    assert k.shape == v.shape == (2, 24, 16, 128)
    model = comfy.model_patcher.ModelPatcher(build_comfy_flux(dev, device="meta"), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    patched = apply(lib, model, ip, torch.zeros(1, 16, 4096, device="meta"))
    dit = patched.model_options["transformer_options"]["patches_replace"]["dit"]
    assert sorted(dit) == [("double_block", i) for i in range(19)]


def test_schnell_layout_without_guidance_embedding(lib, comfy_in_process):
    """FLUX.1-schnell's layout (no guidance embedder): the patch applies and changes the output."""
    import comfy.model_patcher

    schnell = FluxLayout(**{**FluxLayout.tiny().to_dict(), "guidance_embed": False})
    model = comfy.model_patcher.ModelPatcher(build_comfy_flux(schnell, seed=1), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    assert type(model.model.model_config).__name__ == "FluxSchnell"
    torch.manual_seed(2)
    ip = lib.ip_adapter.IPAdapter(lib.ip_adapter.IPAdapterConfig.for_layout(schnell, "all", "none"))
    with torch.no_grad():
        for block in ip.double_blocks.values():
            block.to_v.weight.normal_(0, 0.2)
    x = {"latent": torch.randn(1, 16, 8, 8), "sigma": torch.tensor([0.5]), "context": torch.randn(1, 3, 64),
         "y": torch.randn(1, 32), "guidance": None}
    plain = comfy_run(model, x)
    patched = comfy_run(apply(lib, model, ip, torch.randn(1, 4, 64), weight=1.0), x)
    assert torch.isfinite(patched).all() and (patched - plain).abs().max() > 1e-3
