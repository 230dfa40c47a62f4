"""ComfyUI's own Qwen2.5-VL text encoder (comfy.text_encoders.llama / qwen_vl, tiny) against the library's
transformers model loaded from the same file in ComfyUI's layout (plain and fp8-scaled), and the Load
Encoder node on a text_encoders/ file against the HF-folder path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from devtools.fixtures import make_tiny_comfy_text_encoder, make_untrained_adapter
from omni_attribute.backbone import load_backbone

# fp32 throughout: the two implementations differ only in float rounding order
ATOL_PLAIN = 1e-4
ATOL_FP8 = 1e-4      # both dequantise the same float8 bytes with the same scales


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer_dir):
    base = tmp_path_factory.mktemp("comfy_te")
    paths = make_tiny_comfy_text_encoder(base / "text_encoders", seed=0, tokenizer_dir=tokenizer_dir)
    paths["adapter"] = make_untrained_adapter(paths["hf"], base / "adapter.safetensors", seed=1)
    return paths


def comfy_model(path, fp8: bool):
    """ComfyUI's Qwen25_7BVLI class at the tiny sizes (its language model and vision tower classes, ComfyUI's
    ops), loaded from the file the way SDClipModel.load_sd does (state dict, strict=False)."""
    import comfy.ops
    from comfy.text_encoders import llama, qwen_vl

    class TinyQwen25_7BVLI(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(
                hidden_size=160, output_hidden_size=config.hidden_size, intermediate_size=320, num_heads=2,
                num_layers=2, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    ops = (comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, override_dtype=torch.float8_e4m3fn) if fp8
           else comfy.ops.manual_cast)
    config = {"vocab_size": 151936, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}
    model = TinyQwen25_7BVLI(config, torch.float32, "cpu", ops)
    if fp8:
        model.scaled_fp8 = torch.nn.Parameter(torch.tensor([], dtype=torch.float8_e4m3fn))
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    assert not missing and set(unexpected) <= {"lm_head.weight"}, (missing, unexpected)
    return model.eval()


def comfy_hidden(model, ids, pixel_values, grid, image_id=151655):
    """ComfyUI's multimodal pass: image rows replaced by its vision tower's output, its 3D positions."""
    embeds = model.model.embed_tokens(ids, out_dtype=torch.float32)
    start = int((ids[0] == image_id).nonzero()[0])
    image = model.visual(pixel_values, grid)
    embeds = embeds.clone()
    embeds[0, start:start + image.shape[0]] = image
    info = [{"type": "image", "index": start, "size": image.shape[0], "extra": grid}]
    return model(ids, embeds=embeds, embeds_info=info)[0]


@pytest.fixture(scope="module")
def inputs(files, tokenizer_dir):
    """Token ids, pixel values and grids of a one-window image (112 x 112: 4 x 4 merged tokens, the vision
    tower's window) and of a two-window one (112 x 168, fitted to the adapter's 112 x 112 pixels)."""
    from omni_attribute.encoder import load_encoder

    encoder = load_encoder(files["hf"], files["adapter"])
    torch.manual_seed(5)
    out = {}
    for name, (h, w) in {"one_window": (112, 112), "two_windows": (112, 168)}.items():
        pixel_values, grid, _ = encoder._prepare_image(torch.rand(1, 3, h, w))
        layout = encoder.prefix_layout(grid)
        suffix, _, _ = encoder.suffix_batch(encoder.instructions_for([["object color"]]))
        out[name] = (torch.cat([layout.ids, suffix], dim=1), pixel_values, grid)
    assert out["one_window"][2].tolist() == [[1, 8, 8]] and out["two_windows"][2].tolist() == [[1, 6, 10]]  # 3 x 5 merged: two windows
    return out


# plain file / fp8 file dequantised / fp8 file kept in float8 (the plain file quantised on load is another
# model than ComfyUI's: its deviation is the unit tests' cosine)
@pytest.mark.parametrize("kind, weight_dtype", [("plain", "default"), ("fp8", "default"), ("fp8", "fp8_e4m3fn")])
def test_same_hidden_states_as_comfyuis_model(comfy_in_process, files, tokenizer_dir, inputs, kind, weight_dtype):
    comfy = comfy_model(files[kind], fp8=kind == "fp8")
    ours = load_backbone(files[kind], tokenizer_dir=tokenizer_dir, weight_dtype=weight_dtype).model
    atol = ATOL_FP8 if kind == "fp8" else ATOL_PLAIN
    with torch.no_grad():
        ids, pixel_values, grid = inputs["one_window"]
        text = ids[:, :8]  # text only: 1D positions on both sides
        theirs_text = comfy(text)[0]
        ours_text = ours.model(input_ids=text).last_hidden_state
        assert torch.allclose(theirs_text, ours_text, atol=atol), (theirs_text - ours_text).abs().max()
        # the whole multimodal pass, ComfyUI's untouched (its vision tower, its 3D positions)
        theirs = comfy_hidden(comfy, ids, pixel_values, grid)
        mine = ours.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid).last_hidden_state
        assert theirs.shape == mine.shape
        assert torch.allclose(theirs, mine, atol=atol), (theirs - mine).abs().max()
        # Across several windows ComfyUI 0.3.75's vision tower returns the merged tokens in window order (it
        # does not undo its window permutation, transformers does): the same values, permuted.
        _, pixel_values, grid = inputs["two_windows"]
        theirs_vision = comfy.visual(pixel_values, grid)
        ours_vision = ours.model.visual(pixel_values, grid_thw=grid)
        ours_vision = getattr(ours_vision, "pooler_output", ours_vision)
        window_order, _ = comfy.visual.get_window_index(grid)
        assert not torch.allclose(theirs_vision, ours_vision, atol=atol)
        assert torch.allclose(theirs_vision, ours_vision[window_order], atol=atol), \
            (theirs_vision - ours_vision[window_order]).abs().max()


def test_loader_node_on_a_text_encoder_file_gives_the_hf_folders_embeds(plugin_nodes, files, tmp_path):
    import folder_paths

    folders = plugin_nodes.folders
    folder_paths.add_model_folder_path(folders.TEXT_ENCODERS, str(files["plain"].parent))
    folder_paths.add_model_folder_path(folders.BACKBONES, str(files["hf"].parent))
    folder_paths.add_model_folder_path(folders.ADAPTERS, str(files["adapter"].parent))
    loader, encode = plugin_nodes.encode.LoadOmniAttributeEncoder, plugin_nodes.encode.OmniAttributeEncode
    options = folders.list_backbones()
    assert {"text_encoders/qwen_2.5_vl_tiny.safetensors", "text_encoders/qwen_2.5_vl_tiny_fp8_scaled.safetensors",
            files["hf"].name} <= set(options)
    torch.manual_seed(2)
    image = torch.rand(1, 84, 112, 3)

    def run(backbone, **extra):
        assert loader.validate_inputs(backbone=backbone, adapter="adapter.safetensors", dtype="fp32",
                                      device="cpu", **extra) is True
        handle = loader.execute(backbone=backbone, adapter="adapter.safetensors", dtype="fp32", device="cpu",
                                **extra).result[0]
        return encode.execute(encoder=handle, image=image, attributes="object color\nbackground").result[0]

    folder = run(files["hf"].name)
    plain = run("text_encoders/qwen_2.5_vl_tiny.safetensors")
    assert torch.allclose(folder.tokens, plain.tokens, atol=1e-6) and torch.allclose(folder.pooled, plain.pooled, atol=1e-6)
    fp8 = run("text_encoders/qwen_2.5_vl_tiny_fp8_scaled.safetensors", weight_dtype="fp8_e4m3fn")
    cosine = torch.nn.functional.cosine_similarity(folder.tokens.flatten(1), fp8.tokens.flatten(1)).min()
    assert cosine >= 0.99, cosine
    problem = loader.validate_inputs(backbone="text_encoders/clip_l.safetensors", adapter="adapter.safetensors",
                                     dtype="fp32", device="cpu")
    assert isinstance(problem, str) and "qwen_2.5_vl_7b" in problem
    assert "weight_dtype" in loader.validate_inputs(backbone=files["hf"].name, adapter="adapter.safetensors",
                                                    dtype="fp32", device="cpu", weight_dtype="int4")
