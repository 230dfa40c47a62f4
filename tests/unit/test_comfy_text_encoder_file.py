"""The backbone from ComfyUI's Qwen2.5-VL text-encoder file (plain and fp8-scaled) and 8-bit weights, on a
tiny Qwen2.5-VL with ComfyUI's head sizes (no ComfyUI imported: its layout is written by devtools.fixtures)."""

import pytest
import torch
from safetensors.torch import save_file

from devtools.fixtures import make_tiny_comfy_text_encoder, make_untrained_adapter
from omni_attribute.backbone import load_backbone, read_backbone_config
from omni_attribute.comfy_text_encoder_file import comfy_key, hf_key
from omni_attribute.encoder import load_encoder
from omni_attribute.errors import BackboneError
from omni_attribute.float8 import Float8Linear, quantizable_linears, weight_bytes

LINES = "object color\nbackground\nman identity, man hairstyle"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    base = tmp_path_factory.mktemp("comfy_te")
    paths = make_tiny_comfy_text_encoder(base, seed=0, tokenizer_dir=tokenizer_dir)
    paths["adapter"] = make_untrained_adapter(paths["hf"], base / "adapter.safetensors", seed=1)
    return paths


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(3)
    return torch.rand(2, 84, 112, 3)


def embeds(files, tokenizer_dir, image, source="hf", **kw):
    tok = None if source == "hf" else tokenizer_dir
    return load_encoder(files[source], files["adapter"], tokenizer_dir=tok, **kw).encode(image, LINES)


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.tokens.flatten(1), b.tokens.flatten(1)).min().item()


def test_key_mapping_round_trips():
    for name in ("model.language_model.layers.3.self_attn.q_proj.weight", "model.visual.merger.mlp.0.bias",
                 "lm_head.weight"):
        assert hf_key(comfy_key(name)) == name
    assert comfy_key("model.language_model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert comfy_key("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"


def test_config_is_read_off_the_shapes(files):
    config = read_backbone_config(files["plain"])
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (256, 2, 2, 1, 512, 151936)
    vision = config["vision_config"]
    assert (vision["depth"], vision["hidden_size"], vision["num_heads"], vision["intermediate_size"],
            vision["out_hidden_size"], vision["spatial_merge_size"], vision["patch_size"]) == (2, 160, 2, 320, 256, 2, 14)
    assert read_backbone_config(files["fp8"])["hidden_size"] == 256


def test_plain_file_is_the_hf_folder(files, tokenizer_dir, image):
    """bf16 file of bf16-rounded weights, loaded in fp32: the same tensors, hence the same embeds (exactly)."""
    hf, comfy = load_backbone(files["hf"]).model.state_dict(), load_backbone(files["plain"], tokenizer_dir=tokenizer_dir).model.state_dict()
    assert set(hf) == set(comfy)
    assert all(torch.equal(hf[k], comfy[k]) for k in hf)
    a, b = embeds(files, tokenizer_dir, image), embeds(files, tokenizer_dir, image, "plain")
    assert torch.allclose(a.tokens, b.tokens, atol=1e-6) and torch.allclose(a.pooled, b.pooled, atol=1e-6)


def test_fp8_scaled_file_is_dequantised(files, tokenizer_dir, image):
    model = load_backbone(files["fp8"], tokenizer_dir=tokenizer_dir).model
    hf = load_backbone(files["hf"]).model.state_dict()
    state = model.state_dict()
    w = "model.language_model.layers.0.mlp.up_proj.weight"
    assert state[w].dtype == torch.float32
    assert (state[w] - hf[w]).abs().max() <= hf[w].abs().max() / 16  # e4m3: 3 mantissa bits
    assert torch.equal(state["model.language_model.embed_tokens.weight"], hf["model.language_model.embed_tokens.weight"])
    assert cosine(embeds(files, tokenizer_dir, image), embeds(files, tokenizer_dir, image, "fp8")) >= 0.99


def test_fp8_file_kept_in_fp8_holds_the_files_bytes(files, tokenizer_dir, image):
    from safetensors import safe_open

    model = load_backbone(files["fp8"], tokenizer_dir=tokenizer_dir, weight_dtype="fp8_e4m3fn").model
    layer = model.get_submodule("model.language_model.layers.1.self_attn.q_proj")
    assert isinstance(layer, Float8Linear) and layer.qweight.dtype == torch.float8_e4m3fn
    with safe_open(str(files["fp8"]), framework="pt") as f:
        stored = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        scale = f.get_tensor("model.layers.1.self_attn.q_proj.scale_weight")
    assert torch.equal(layer.qweight.view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale.expand(layer.out_features, 1))
    # kept fp8 computes the same as dequantised fp8
    kept, dequantised = embeds(files, tokenizer_dir, image, "fp8", weight_dtype="fp8_e4m3fn"), embeds(files, tokenizer_dir, image, "fp8")
    assert cosine(kept, dequantised) >= 0.9999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8bit_weights_keep_the_embeds_and_halve_linear_memory(files, tokenizer_dir, image, dtype):
    """Goal: cosine ≥ 0.99 against the same dtype unquantised; Linear weight bytes ≤ 0.52 × bf16 (per-row scales)."""
    full = load_encoder(files["hf"], files["adapter"], dtype=dtype)
    eight = load_encoder(files["hf"], files["adapter"], dtype=dtype, weight_dtype="fp8_e4m3fn")
    linears = [m for _, m in quantizable_linears(full.mllm)]
    float8 = [m for m in eight.mllm.modules() if isinstance(m, Float8Linear)]
    assert len(float8) == len(linears) > 0
    before = sum(weight_bytes(m) for m in linears)
    after = sum(weight_bytes(m) for m in float8)
    bf16_bytes = sum(m.weight.numel() * 2 + (m.bias.numel() * 2 if m.bias is not None else 0) for m in linears)
    assert after <= 0.52 * bf16_bytes, (after, bf16_bytes)
    assert weight_bytes(eight.mllm) < weight_bytes(full.mllm) - (before - after) * 0.99
    assert cosine(full.encode(image, LINES), eight.encode(image, LINES)) >= 0.99


def test_bad_files_say_what_to_use(tmp_path, files, tokenizer_dir):
    clip = tmp_path / "clip_l.safetensors"
    save_file({"text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 2),
               "text_model.embeddings.token_embedding.weight": torch.zeros(8, 2)}, str(clip))
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(2, 2), "shared.weight": torch.zeros(4, 2)}, str(t5))
    from safetensors import safe_open

    with safe_open(str(files["plain"]), framework="pt") as f:
        text_only = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("visual.")}
    no_vision = tmp_path / "qwen_2.5_7b.safetensors"
    save_file(text_only, str(no_vision))
    hf_layout = tmp_path / "model.safetensors"
    save_file({"model.language_model.norm.weight": torch.zeros(2)}, str(hf_layout))
    cases = [(clip, "is a CLIP text encoder"), (t5, "is a T5 text encoder"),
             (no_vision, "without the vision tower .*needs the file that includes visual"),
             (hf_layout, "Hugging Face's layout"), (tmp_path / "missing.safetensors", "does not exist")]
    for path, message in cases:
        with pytest.raises(BackboneError, match=message) as caught:
            load_backbone(path, tokenizer_dir=tokenizer_dir)
        assert "qwen_2.5_vl_7b" in str(caught.value) or "does not exist" in message
    with pytest.raises(BackboneError, match="not one of default, fp8_e4m3fn"):
        load_backbone(files["plain"], tokenizer_dir=tokenizer_dir, weight_dtype="int4")
    with pytest.raises(BackboneError, match="qwen25_tokenizer"):
        load_backbone(files["plain"])
