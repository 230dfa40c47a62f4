import json

import pytest
import torch
from safetensors.torch import save_file

from omni_attribute.adapter_file import (AdapterMetadata, check_backbone, load_adapter, read_adapter_metadata,
                                         save_adapter)
from omni_attribute.connector import ConnectorConfig
from omni_attribute.errors import AdapterFileError, AdapterMismatchError


def metadata(hidden=64):
    return AdapterMetadata(
        backbone={"family": "qwen2_5_vl", "hidden_size": hidden, "num_hidden_layers": 2, "name": "tiny"},
        lora={"r": 4, "alpha": 4, "dropout": 0.0, "target_modules": "x"},
        connector=ConnectorConfig(in_dim=hidden, out_dim=64, num_tokens=4, width=32, num_layers=2, num_heads=2),
        prompt_template="Exclusively describe {attributes}:",
        generator={"family": "flux", "hidden_size": 3072, "double_blocks": [0, 1], "single_blocks": []},
        training={"config_hash": "abc"},
    )


def test_round_trip_is_exact(tmp_path):
    sections = {"lora": {"a.lora_A.weight": torch.randn(4, 8)}, "connector": {"w": torch.randn(3, 3)},
                "ip_adapter": {"double.0.to_k.weight": torch.randn(5, 2).to(torch.bfloat16)}}
    path = tmp_path / "a.safetensors"
    save_adapter(path, metadata(), sections)
    loaded = load_adapter(path)
    assert loaded.metadata.to_json() == metadata().to_json()
    for section, tensors in sections.items():
        for name, tensor in tensors.items():
            assert torch.equal(loaded.section(section)[name], tensor) and loaded.section(section)[name].dtype == tensor.dtype
    assert not list(tmp_path.glob("*.tmp"))


def test_backbone_mismatch_names_both_sizes():
    with pytest.raises(AdapterMismatchError, match="hidden size 3584, backbone has 2048"):
        check_backbone(metadata(3584), {"family": "qwen2_5_vl", "hidden_size": 2048, "num_hidden_layers": 2}, "a")
    with pytest.raises(AdapterMismatchError, match="family"):
        check_backbone(metadata(), {"family": "llava", "hidden_size": 64, "num_hidden_layers": 2}, "a")
    check_backbone(metadata(), {"family": "qwen2_5_vl", "hidden_size": 64, "num_hidden_layers": 2}, "a")


def test_unreadable_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_adapter(good, metadata(), {"connector": {"w": torch.randn(64, 64)}})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(AdapterFileError, match="truncated or corrupted"):
        load_adapter(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError, match="not a readable"):
        read_adapter_metadata(garbage)
    foreign = tmp_path / "ip_adapter_other_pack.safetensors"
    save_file({"w": torch.zeros(1)}, str(foreign))
    with pytest.raises(AdapterFileError, match="not an Omni-Attribute adapter"):
        read_adapter_metadata(foreign)
    with pytest.raises(AdapterFileError, match="does not exist"):
        read_adapter_metadata(tmp_path / "missing.safetensors")


def test_newer_format_version_asks_for_an_update(tmp_path):
    data = json.loads(metadata().to_json())
    data["format_version"] = 99
    path = tmp_path / "future.safetensors"
    save_file({"connector.w": torch.zeros(1)}, str(path), metadata={"omni_attribute": json.dumps(data)})
    with pytest.raises(AdapterFileError, match="update the Omni-Attribute plugin"):
        read_adapter_metadata(path)


def test_stray_tensor_names_are_refused(tmp_path):
    path = tmp_path / "stray.safetensors"
    save_file({"connector.w": torch.zeros(1), "unet.x": torch.zeros(1)}, str(path),
              metadata={"omni_attribute": metadata().to_json()})
    with pytest.raises(AdapterFileError, match="unexpected tensor 'unet.x'"):
        load_adapter(path)
