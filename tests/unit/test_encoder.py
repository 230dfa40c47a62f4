"""The encoder on a tiny real Qwen2.5-VL (transformers) with the real Qwen2.5 tokenizer."""

import json
import shutil

import pytest
import torch

from omni_attribute.backbone import load_backbone
from omni_attribute.encoder import build_encoder, load_encoder
from omni_attribute.errors import AdapterMismatchError, BackboneError, ImageInputError
from devtools.fixtures import tiny_adapter_metadata


@pytest.fixture(scope="module")
def encoder(tiny_backbone, tiny_adapter):
    return load_encoder(tiny_backbone, tiny_adapter)


def test_shared_prefix_equals_full_passes(encoder):
    torch.manual_seed(0)
    image = torch.rand(1, 3, 70, 90)
    instructions = encoder.instructions_for([["object color"], ["man identity", "man hairstyle", "background"],
                                             ["the colour of the object under warm evening light"]])
    with torch.no_grad():
        shared, shared_pooled = encoder.encode_image(image, instructions, shared_prefix=True)
        full, full_pooled = encoder.encode_image(image, instructions, shared_prefix=False)
    assert shared.shape == (3, 4, 64)
    assert torch.allclose(shared, full, atol=1e-4), (shared - full).abs().max()
    assert torch.allclose(shared_pooled, full_pooled, atol=1e-4)


def test_one_attribute_takes_one_mllm_call_and_equals_the_shared_path(encoder):
    """K = 1 runs the full pass (one call) — the same result as the shared path's two calls; K > 1 shares
    the prefix (two calls) unless told not to (K calls)."""
    torch.manual_seed(1)
    image = torch.rand(1, 3, 70, 90)
    one = encoder.instructions_for([["object color"]])
    three = encoder.instructions_for([["object color"], ["background"], ["man identity", "man hairstyle"]])
    calls = []
    hook = encoder.mllm.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1),
                                                        with_kwargs=True)
    try:
        with torch.no_grad():
            counts = []
            for instructions, shared in ((one, True), (three, True), (three, False)):
                calls.clear()
                tokens, _ = encoder.encode_image(image, instructions, shared_prefix=shared)
                counts.append(len(calls))
            single, _ = encoder.encode_image(image, one)
            pixel_values, grid, n = encoder.prepare_image(image)
            suffix, mask = encoder.suffix_ids(one)
            image_hidden, hidden = encoder.hidden_shared_prefix(pixel_values, grid, encoder.prefix_ids(n), suffix, mask)
    finally:
        hook.remove()
    assert counts == [1, 2, 3]
    rows, cols = (int(v) // 2 for v in grid[0, 1:])
    via_shared, _ = encoder.connector(torch.cat([image_hidden, hidden], dim=1), None, image_grid=(rows, cols))
    assert torch.allclose(single, via_shared, atol=1e-4), (single - via_shared).abs().max()


def test_prefix_layout_is_qwen_rope_index_and_the_image_span(encoder):
    """The host-side layout (worked out once per image size) is what Qwen2.5-VL's rope index gives for
    prefix + suffix, and its image slice holds exactly the image tokens."""
    from omni_attribute.backbone import IMAGE_PAD

    pixel_values, grid, n = encoder.prepare_image(torch.rand(1, 3, 84, 56))
    layout = encoder.prefix_layout(grid.cpu())
    suffix, _, lengths = encoder.suffix_batch(encoder.instructions_for([["surface pattern of the object"]]))
    ids = torch.cat([layout.ids, suffix[:, :lengths[0]]], dim=1)
    reference, _ = encoder.mllm.model.get_rope_index(input_ids=ids, image_grid_thw=grid,
                                                     attention_mask=torch.ones_like(ids))
    text = (layout.next_position + torch.arange(lengths[0])).view(1, 1, -1).expand(3, 1, -1)
    assert torch.equal(torch.cat([layout.positions, text], dim=2), reference)
    image_id = encoder.backbone.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert (layout.ids[0, layout.image] == image_id).all() and int((layout.ids == image_id).sum()) == n
    assert encoder.prefix_layout(grid.cpu()) is layout  # cached per image size


def test_connector_by_suffix_length_equals_the_masked_connector(encoder):
    """encode_image runs the connector per suffix length with the padding cut off and no key mask (its
    fast attention): the same tokens as one masked call over the padded batch."""
    torch.manual_seed(2)
    lengths = [5, 3, 5, 4]
    hidden = torch.randn(4, 12 + 5, encoder.connector.config.in_dim)
    mask = torch.ones(4, 12 + 5, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, 12 + length:] = False
        hidden[row, 12 + length:] = 1e3  # whatever the padding holds
    with torch.no_grad():
        masked, masked_pooled = encoder.connector(hidden, mask, image_grid=(3, 4))
        grouped, grouped_pooled = encoder.connect(hidden, lengths, (3, 4))
        same_length, _ = encoder.connect(hidden[:, :15], [3, 3, 3, 3], (3, 4))
        all_true, _ = encoder.connector(hidden[:, :15], torch.ones(4, 15, dtype=torch.bool), image_grid=(3, 4))
    assert torch.allclose(grouped, masked, atol=1e-5), (grouped - masked).abs().max()
    assert torch.allclose(grouped_pooled, masked_pooled, atol=1e-5)
    assert torch.allclose(same_length, all_true, atol=1e-5)


def test_connector_reads_the_image_states_unless_told_not_to(encoder):
    """With read_image the image-token states (computed once, before any instruction) join the
    instruction states; the shared-prefix and full paths agree on them."""
    image = torch.rand(1, 3, 56, 56)
    pixel_values, grid, n = encoder.prepare_image(image)
    prefix = encoder.prefix_ids(n)
    suffix, mask = encoder.suffix_ids(encoder.instructions_for([["object color"], ["background"]]))
    with torch.no_grad():
        image_shared, _ = encoder.hidden_shared_prefix(pixel_values, grid, prefix, suffix, mask)
        image_full, _ = encoder.hidden_full(pixel_values, grid, prefix, suffix, mask)
    assert image_shared.shape == (1, n, 64) and torch.allclose(image_shared, image_full, atol=1e-4)
    assert encoder.connector.config.read_image
    seen = []
    hook = encoder.connector.input_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            encoder.encode_image(image, ["Exclusively describe object color:"])
            for field in ("read_image", "image_positions"):
                object.__setattr__(encoder.connector.config, field, False)
            encoder.encode_image(image, ["Exclusively describe object color:"])
    finally:
        for field in ("read_image", "image_positions"):
            object.__setattr__(encoder.connector.config, field, True)
        hook.remove()
    assert seen[0] == seen[1] + n


def test_rows_are_image_major_and_depend_on_image_and_attribute(encoder):
    torch.manual_seed(1)
    images = torch.rand(2, 64, 64, 3)
    embeds = encoder.encode(images, "object color\nbackground, lighting")
    assert embeds.tokens.shape == (4, 4, 64) and embeds.pooled.shape == (4, 64)
    assert embeds.image_index == [0, 0, 1, 1]
    assert embeds.attributes == ["object color", "background, and lighting"] * 2
    assert not torch.allclose(embeds.pooled[0], embeds.pooled[1], atol=1e-4)  # same image, other attribute
    assert not torch.allclose(embeds.pooled[0], embeds.pooled[2], atol=1e-4)  # other image, same attribute
    single = encoder.encode(images[1:], "object color")
    assert torch.allclose(single.tokens[0], embeds.tokens[2], atol=1e-5)


def test_adapter_round_trip_and_lora_acts(tiny_backbone, tiny_adapter, encoder, tmp_path):
    image = torch.rand(1, 48, 48, 3)
    reference = encoder.encode(image, "object color").tokens
    again = load_encoder(tiny_backbone, tiny_adapter).encode(image, "object color").tokens
    assert torch.equal(reference, again)
    copy = tmp_path / "copy.safetensors"
    encoder.save_adapter(copy)
    assert torch.equal(load_encoder(tiny_backbone, copy).encode(image, "object color").tokens, reference)
    without_lora = load_encoder(tiny_backbone, tiny_adapter)
    with torch.no_grad():
        for name, param in without_lora.mllm.named_parameters():
            if ".lora_B." in name:
                param.zero_()
    assert not torch.allclose(without_lora.encode(image, "object color").tokens, reference, atol=1e-5)


def test_lora_targets_only_the_language_model(encoder):
    names = [n for n, _ in encoder.mllm.named_parameters() if ".lora_A." in n]
    assert len(names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(n.startswith("model.language_model.") for n in names)
    assert not any(p.requires_grad for n, p in encoder.mllm.named_parameters() if ".lora_" not in n)


@pytest.mark.parametrize("shape", [(1, 32, 32, 4), (1, 32, 32, 1), (1, 1, 1, 3), (1, 1500, 1400, 3), (1, 20, 600, 3)])
def test_odd_images_are_adapted(encoder, shape):
    embeds = encoder.encode(torch.rand(shape), "object color")
    assert embeds.tokens.shape == (1, 4, 64) and torch.isfinite(embeds.tokens).all()


def test_rgba_alpha_is_ignored(encoder):
    rgb = torch.rand(1, 40, 40, 3)
    rgba = torch.cat([rgb, torch.rand(1, 40, 40, 1)], dim=-1)
    assert torch.equal(encoder.encode(rgb, "object color").tokens, encoder.encode(rgba, "object color").tokens)


def test_extreme_aspect_ratio_is_refused(encoder):
    with pytest.raises(ImageInputError, match="aspect ratio"):
        encoder.encode(torch.rand(1, 2, 1000, 3), "object color")


def test_mismatched_adapter_fails_before_loading_weights(tiny_backbone, narrow_adapter):
    with pytest.raises(AdapterMismatchError, match="hidden size 32, backbone has 64"):
        load_encoder(tiny_backbone, narrow_adapter)


def test_backbone_folder_errors(tmp_path, tiny_backbone):
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(tmp_path / "empty")
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(BackboneError, match="supports qwen2_5_vl"):
        load_backbone(llava)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_backbone, pickled)
    for weights in pickled.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BackboneError, match="holds only pickled weights \\(model.bin\\): Omni-Attribute refuses "
                                            "pickled formats on purpose"):
        load_backbone(pickled)


def test_build_encoder_starts_with_zero_lora(tiny_backbone):
    backbone = load_backbone(tiny_backbone)
    fresh = build_encoder(backbone, tiny_adapter_metadata(backbone.info()))
    lora_b = [p for n, p in fresh.mllm.named_parameters() if ".lora_B." in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
