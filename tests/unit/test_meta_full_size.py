"""Full-size shapes on the meta device: Qwen2.5-VL-7B-Instruct's real configuration (no weights needed)."""

import torch

from devtools.fixtures import make_qwen25vl_7b_config_folder
from omni_attribute.backbone import load_backbone
from omni_attribute.connector import POSITION_FREQUENCIES, Connector, ConnectorConfig
from omni_attribute.lora import DEFAULT_LORA, DEFAULT_TARGETS, apply_lora, count_lora_targets


def test_qwen25vl_7b_lora_and_connector_on_meta(tmp_path, tokenizer_dir):
    folder = make_qwen25vl_7b_config_folder(tmp_path / "Qwen2.5-VL-7B-Instruct", tokenizer_dir)
    backbone = load_backbone(folder, meta=True)
    model = backbone.model
    assert backbone.info() == {"family": "qwen2_5_vl", "hidden_size": 3584, "num_hidden_layers": 28,
                               "name": "Qwen2.5-VL-7B-Instruct"}
    base = sum(p.numel() for p in model.parameters())
    assert 8.2e9 < base < 8.4e9  # Qwen2.5-VL-7B-Instruct has 8.29B parameters

    assert count_lora_targets(model, DEFAULT_TARGETS) == 28 * 7
    apply_lora(model, DEFAULT_LORA)
    lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert all(".visual." not in n for n in lora)
    r = DEFAULT_LORA["r"]
    # per layer: q 3584→3584, k/v 3584→512, o 3584→3584, gate/up 3584→18944, down 18944→3584
    per_layer = r * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)
    assert sum(p.numel() for p in lora.values()) == 28 * per_layer
    assert lora["model.language_model.layers.0.self_attn.k_proj.lora_B.default.weight"].shape == (512, r)
    assert all(p.requires_grad for p in lora.values())

    with torch.device("meta"):
        connector = Connector(ConnectorConfig(in_dim=3584))
        tokens, pooled = connector(torch.empty(2, 30, 3584), torch.ones(2, 30, dtype=torch.bool), image_grid=(4, 5))
    assert tokens.shape == (2, 16, 4096) and pooled.shape == (2, 4096)
    w, ffn = 1024, 4096
    layer = (3 * w * w + 3 * w) + (w * w + w) + (w * ffn + ffn) + (ffn * w + w) + 4 * w
    place_map = 4 * POSITION_FREQUENCIES * w  # the image tokens' 2D place features (image_positions, on by default)
    expected = (3584 * w + w) + 16 * w + 8 * layer + 2 * w + (w * 4096 + 4096) + place_map
    assert sum(p.numel() for p in connector.parameters()) == expected
