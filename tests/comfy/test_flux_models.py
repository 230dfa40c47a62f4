"""FLUX.1 in ComfyUI's and diffusers' form: layouts, exact weight mapping, same outputs, full-size shapes on meta."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from devtools.comfy_flux import (
    build_comfy_flux,
    comfy_flux_forward,
    comfy_flux_state_dict,
    comfy_unet_config,
)
from omni_attribute.flux_models import (
    FluxLayout,
    build_diffusers_flux,
    comfy_to_diffusers_flux,
    count_parameters,
    diffusers_flux_forward,
    diffusers_to_comfy_flux,
    pack_latent,
    unpack_latent,
)


@pytest.fixture(scope="module", autouse=True)
def _comfyui_on_path(comfy_in_process) -> None:
    """Every test here builds ComfyUI models in-process."""


@pytest.fixture(scope="module")
def tiny() -> FluxLayout:
    return FluxLayout.tiny()


@pytest.fixture(scope="module")
def tiny_pair(tiny):
    """A tiny ComfyUI FLUX and a diffusers FLUX loaded with its converted weights."""
    comfy_model = build_comfy_flux(tiny, seed=0)
    diffusers_model = build_diffusers_flux(tiny, comfy_to_diffusers_flux(comfy_flux_state_dict(comfy_model), tiny))
    return comfy_model, diffusers_model


@pytest.fixture(scope="module")
def dev_meta():
    layout = FluxLayout.flux_dev()
    return layout, build_comfy_flux(layout, device="meta"), build_diffusers_flux(layout, device="meta")


def random_inputs(layout: FluxLayout, seed: int = 1, batch: int = 2, height: int = 8, width: int = 12,
                  tokens: int = 7):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, layout.latent_channels, height, width, generator=gen)
    context = torch.randn(batch, tokens, layout.context_dim, generator=gen)
    y = torch.randn(batch, layout.vec_in_dim, generator=gen)
    return latent, context, y


def test_layout_presets_and_dict_round_trip():
    dev, schnell, tiny = FluxLayout.flux_dev(), FluxLayout.flux_schnell(), FluxLayout.tiny()
    assert (dev.hidden_size, dev.num_heads, dev.depth_double, dev.depth_single) == (3072, 24, 19, 38)
    assert (dev.context_dim, dev.vec_in_dim, dev.in_channels, dev.axes_dim) == (4096, 768, 64, [16, 56, 56])
    assert dev.guidance_embed and not schnell.guidance_embed
    assert dataclasses.replace(schnell, guidance_embed=True) == dev
    assert (tiny.hidden_size, tiny.num_heads, tiny.axes_dim, tiny.context_dim, tiny.vec_in_dim) == (64, 2, [4, 14, 14],
                                                                                                    64, 32)
    for layout in (dev, schnell, tiny):
        assert FluxLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="unknown"):
        FluxLayout.from_dict({**tiny.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="axes_dim"):
        dataclasses.replace(tiny, axes_dim=[4, 14, 16])


def test_round_trip_tiny_is_exact(tiny, tiny_pair):
    comfy_model, diffusers_model = tiny_pair
    comfy_sd = comfy_flux_state_dict(comfy_model)
    diffusers_sd = comfy_to_diffusers_flux(comfy_sd, tiny)
    reference = diffusers_model.state_dict()
    assert set(diffusers_sd) == set(reference)
    assert all(diffusers_sd[k].shape == reference[k].shape for k in reference)
    back = diffusers_to_comfy_flux(diffusers_sd, tiny)
    assert list(back) != [] and set(back) == set(comfy_sd)
    for key, tensor in comfy_sd.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    # ComfyUI's final modulation is (shift, scale), diffusers' is (scale, shift)
    final = comfy_sd["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(diffusers_sd["norm_out.linear.weight"][:tiny.hidden_size], final[tiny.hidden_size:])
    # fused q/k/v (+ MLP in) split along the output dimension
    linear1 = comfy_sd["single_blocks.1.linear1.weight"]
    assert torch.equal(diffusers_sd["single_transformer_blocks.1.attn.to_k.weight"], linear1[64:128])
    assert torch.equal(diffusers_sd["single_transformer_blocks.1.proj_mlp.weight"], linear1[192:])


def test_round_trip_flux_dev_shapes_on_meta(dev_meta):
    layout, comfy_model, diffusers_model = dev_meta
    comfy_sd = comfy_flux_state_dict(comfy_model)
    assert all(t.device.type == "meta" for t in comfy_sd.values())
    diffusers_sd = comfy_to_diffusers_flux(comfy_sd, layout)
    reference = diffusers_model.state_dict()
    assert set(diffusers_sd) == set(reference)
    assert {k: tuple(v.shape) for k, v in diffusers_sd.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    back = diffusers_to_comfy_flux(reference, layout)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in comfy_sd.items()}
    assert diffusers_sd["single_transformer_blocks.37.proj_mlp.weight"].shape == (4 * 3072, 3072)
    # our unet_config is exactly what ComfyUI's own detection derives from such a state dict
    import comfy.model_detection

    detected = comfy.model_detection.detect_unet_config(comfy_sd, "")
    assert detected == comfy_unet_config(layout)


def test_unmapped_and_missing_keys_raise(tiny, tiny_pair):
    comfy_sd = comfy_flux_state_dict(tiny_pair[0])
    with pytest.raises(ValueError, match="unmapped keys.*double_blocks.2.img_mod.lin.weight"):
        comfy_to_diffusers_flux({**comfy_sd, "double_blocks.2.img_mod.lin.weight": torch.zeros(1)}, tiny)
    with pytest.raises(ValueError, match="missing keys.*txt_in.bias"):
        comfy_to_diffusers_flux({k: v for k, v in comfy_sd.items() if k != "txt_in.bias"}, tiny)
    with pytest.raises(ValueError, match="guidance_in"):
        comfy_to_diffusers_flux(comfy_sd, dataclasses.replace(tiny, guidance_embed=False))
    diffusers_sd = comfy_to_diffusers_flux(comfy_sd, tiny)
    with pytest.raises(ValueError, match="unmapped keys.*pos_embed.extra"):
        diffusers_to_comfy_flux({**diffusers_sd, "pos_embed.extra": torch.zeros(1)}, tiny)
    with pytest.raises(ValueError, match="outputs"):
        comfy_to_diffusers_flux(comfy_sd, dataclasses.replace(tiny, mlp_ratio=2.0))


def test_pack_matches_comfyui_process_img(tiny_pair):
    net = tiny_pair[0].diffusion_model
    latent = torch.randn(2, 16, 7, 10)
    tokens, ids = pack_latent(latent)
    comfy_tokens, comfy_ids = net.process_img(latent)
    assert torch.equal(tokens, comfy_tokens) and torch.equal(ids, comfy_ids[0])
    assert torch.equal(unpack_latent(tokens, 7, 10), latent)


@pytest.mark.parametrize("sigma", [[0.3, 0.9], [1.0, 0.05]])
def test_comfy_and_diffusers_agree(tiny, tiny_pair, sigma):
    comfy_model, diffusers_model = tiny_pair
    latent, context, y = random_inputs(tiny)
    sigma, guidance = torch.tensor(sigma), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ours = comfy_flux_forward(comfy_model, latent, sigma, context, y, guidance)
        theirs = diffusers_flux_forward(diffusers_model, latent, sigma, context, y, guidance)
    assert ours.shape == theirs.shape == (2, 16, 8, 12)
    assert ours.abs().mean() > 0.1  # not trivially small
    assert (ours - theirs).abs().max() < 1e-4


def test_comfy_and_diffusers_agree_without_guidance_odd_size(tiny):
    layout = dataclasses.replace(tiny, guidance_embed=False)
    comfy_model = build_comfy_flux(layout, seed=5)
    diffusers_model = build_diffusers_flux(layout, comfy_to_diffusers_flux(comfy_flux_state_dict(comfy_model), layout))
    latent, context, y = random_inputs(layout, seed=2, height=7, width=9, tokens=4)
    sigma = torch.tensor([0.6, 0.2])
    with torch.no_grad():
        ours = comfy_flux_forward(comfy_model, latent, sigma, context, y)
        theirs = diffusers_flux_forward(diffusers_model, latent, sigma, context, y)
    assert ours.shape == theirs.shape == (2, 16, 7, 9)
    assert (ours - theirs).abs().max() < 1e-4


def test_context_changes_output(tiny, tiny_pair):
    comfy_model, diffusers_model = tiny_pair
    latent, context, y = random_inputs(tiny)
    sigma, guidance = torch.tensor([0.5, 0.5]), torch.tensor([3.5, 3.5])
    with torch.no_grad():
        base = comfy_flux_forward(comfy_model, latent, sigma, context, y, guidance)
        other = comfy_flux_forward(comfy_model, latent, sigma, context + 1.0, y, guidance)
        other_diffusers = diffusers_flux_forward(diffusers_model, latent, sigma, context + 1.0, y, guidance)
    assert (base - other).abs().max() > 1e-2
    assert (other - other_diffusers).abs().max() < 1e-4


def test_flux_dev_on_meta_sizes_and_parameter_count(dev_meta):
    _, comfy_model, diffusers_model = dev_meta
    net = comfy_model.diffusion_model
    assert len(net.double_blocks) == 19 and len(net.single_blocks) == 38 and net.hidden_size == 3072
    assert net.img_in.weight.shape == (3072, 64) and net.txt_in.weight.shape == (3072, 4096)
    n_comfy, n_diffusers = count_parameters(net), count_parameters(diffusers_model)
    assert n_comfy == n_diffusers
    assert 11.8e9 < n_comfy < 12.0e9
