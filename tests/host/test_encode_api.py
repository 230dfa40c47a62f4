"""Load + Encode + Save through the live server's HTTP API and websocket; results read back via /view."""

import numpy as np
import pytest
import torch
from PIL import Image

from omni_attribute.encoder import load_encoder

pytestmark = pytest.mark.host


def test_encode_through_the_api_matches_the_library(client, graphs, tiny_backbone, tiny_adapter, tmp_path):
    rng = np.random.default_rng(0)
    png = tmp_path / "reference.png"
    Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(png)
    name = client.upload_image(png)
    events = []
    history = client.run(graphs.encode(("LoadImage", {"image": name}), attributes="object color\nbackground, lighting"),
                         on_event=lambda kind, data: events.append(kind))
    embeds, item = graphs.fetch(client, history, tmp_path)
    assert item["subfolder"] == "omni_attribute_embeds" and item["filename"].endswith(".safetensors")
    assert embeds.attributes == ["object color", "background, and lighting"]
    assert embeds.tokens.shape == (2, 4, 64)
    assert "progress" in events and "executed" in events

    # the same computation in-process, with the image as ComfyUI's LoadImage decodes it
    image = torch.from_numpy(np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0)[None]
    expected = load_encoder(tiny_backbone, tiny_adapter).encode(image, "object color\nbackground, lighting")
    assert torch.allclose(embeds.tokens, expected.tokens, atol=1e-5)
    assert torch.allclose(embeds.pooled, expected.pooled, atol=1e-5)
    summary = [text for out in history["outputs"].values() for text in out.get("text", [])]
    assert summary == [embeds.summary()]  # the Save node shows the summary of exactly what it saved


def test_saved_embeds_load_back_without_the_encoder(client, graphs, tmp_path):
    first, item = graphs.fetch(client, client.run(graphs.encode(graphs.image(seed=3), prefix="reuse")), tmp_path)
    graph = graphs.builder()
    loaded = graph.node("OmniAttributeLoadEmbeds", embeds_file=item["filename"])
    graph.node("OmniAttributeSaveEmbeds", embeds=loaded.out(0), filename_prefix="copy")
    second, item2 = graphs.fetch(client, client.run(graph.finalize()), tmp_path)
    assert item2["filename"] != item["filename"]
    assert torch.equal(first.tokens, second.tokens) and torch.equal(first.pooled, second.pooled)
    assert first.attributes == second.attributes and first.image_index == second.image_index


def test_counter_advances_instead_of_overwriting(client, graphs, tmp_path):
    names = {graphs.fetch(client, client.run(graphs.encode(graphs.image(seed=s), prefix="counter")), tmp_path)[1]["filename"]
             for s in (10, 11)}
    assert len(names) == 2


def test_backbone_from_the_users_extra_model_paths_encodes(client, graphs, tmp_path):
    info = client.object_info()["OmniAttributeEncoderLoader"]["input"]["required"]["backbone"][1]["options"]
    user = next(name for name in info if name.endswith("user-qwen"))
    embeds, _ = graphs.fetch(client, client.run(graphs.encode(graphs.image(), backbone=user)), tmp_path)
    assert embeds.tokens.shape == (1, 4, 64)


def test_batch_of_images_gives_one_row_per_image_and_line(client, graphs, tmp_path):
    embeds, _ = graphs.fetch(client, client.run(graphs.encode(graphs.image(batch=3), attributes="shape\ncolor")), tmp_path)
    assert embeds.image_index == [0, 0, 1, 1, 2, 2]


def test_a_trained_adapter_loads_and_encodes_without_conversion(client, graphs, comfy_base, tiny_backbone, tiny_pairs,
                                                                tmp_path):
    from pathlib import Path

    from omni_attribute.train.config import load_config
    from omni_attribute.train.trainer import train

    repo = Path(__file__).resolve().parents[2]
    config = load_config(repo / "configs" / "train_tiny.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.pairs={tiny_pairs}", "data.validation_pairs=null",
        f"backbone.path={tiny_backbone}", "optim.max_steps=3", "runtime.validate_every=0"])
    adapter = train(config, progress=False)
    (comfy_base / "models" / "omni_attribute" / "trained.safetensors").write_bytes(adapter.read_bytes())
    embeds, _ = graphs.fetch(client, client.run(graphs.encode(graphs.image(), adapter="trained.safetensors")), tmp_path)
    assert embeds.tokens.shape == (1, 4, 64)
    assert embeds.info["adapter"] == "trained.safetensors"
