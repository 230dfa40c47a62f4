import json

import pytest
import torch
from safetensors.torch import save_file

from omni_attribute.adapter_file import (AdapterMetadata, check_backbone, load_adapter, read_adapter_metadata,
                                         save_adapter)
from omni_attribute.connector import Connector, ConnectorConfig
from omni_attribute.ip_adapter import IPAdapter, IPAdapterConfig
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


def sections_for(meta: AdapterMetadata, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors that fit ``meta``: the connector it describes, one LoRA pair of its rank, its IP-Adapter (if any)."""
    torch.manual_seed(seed)
    r = meta.lora["r"]
    sections = {"connector": {k: torch.randn(v.shape) for k, v in Connector(meta.connector).state_dict().items()},
                "lora": {"m.q_proj.lora_A.weight": torch.randn(r, 8), "m.q_proj.lora_B.weight": torch.randn(8, r)}}
    if meta.generator and "ip" in meta.generator:
        ip = IPAdapter(IPAdapterConfig.from_dict(meta.generator["ip"]))
        sections["ip_adapter"] = {k: torch.randn(v.shape).to(torch.bfloat16) for k, v in ip.state_dict().items()}
    return sections


def with_ip(meta: AdapterMetadata) -> AdapterMetadata:
    meta.generator = {"family": "flux", "ip": {"family": "flux", "hidden_size": 32, "num_heads": 4, "context_dim": 64,
                                               "double_blocks": [0, 1], "single_blocks": [0]}}
    return meta


def test_round_trip_is_exact(tmp_path):
    sections = sections_for(with_ip(metadata()))
    path = tmp_path / "a.safetensors"
    save_adapter(path, with_ip(metadata()), sections)
    loaded = load_adapter(path)
    assert loaded.metadata.to_json() == with_ip(metadata()).to_json()
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


# ---- schema, shapes and values: every bad file is refused with the file, the field and the fix ------------------

def write_raw(path, data, sections) -> None:
    """An adapter file with hand-made metadata (any JSON) and the given tensors."""
    flat = {f"{section}.{name}": tensor for section, tensors in sections.items() for name, tensor in tensors.items()}
    save_file(flat, str(path), metadata={"omni_attribute": json.dumps(data) if not isinstance(data, str) else data})


def edited(change):
    data = json.loads(with_ip(metadata()).to_json())
    change(data)
    return data


def set_path(path, value):
    def change(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    return change


RAW_MARKERS = ("object has no attribute", "invalid literal", "not supported between", "KeyError", "Traceback",
               "state_dict", "NoneType")


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.clear() or d.update({"format": "omni-attribute-adapter", "format_version": 1}),
     "lacks backbone, lora, connector, prompt_template"),
    (set_path("format_version", "1"), "'format_version' is '1' (a string); expected the whole number 1"),
    (set_path("format_version", 0), "'format_version' is 0"),
    (set_path("format_version", True), "'format_version' is True (a boolean)"),
    (set_path("backbone", [1, 2]), "'backbone' must be a JSON object, found a list"),
    (set_path("backbone.hidden_size", "64"), "'backbone.hidden_size' is '64' (a string)"),
    (set_path("lora.r", "four"), "'lora.r' is 'four' (a string); expected a whole number from 1 to 1024"),
    (set_path("lora.r", 0), "'lora.r' is 0"),
    (set_path("lora.alpha", float("nan")), "'lora.alpha' is nan"),
    (set_path("lora.target_modules", "(unclosed"), "a valid regular expression"),
    (set_path("connector.width", 2 ** 20),
     "'connector.width' is 1048576 (a number); expected a whole number from 1 to 16384"),
    (set_path("connector.num_layers", 10 ** 6), "'connector.num_layers' is 1000000"),
    (set_path("connector.num_heads", 3), "a divisor of the connector width 32"),
    (set_path("connector.in_dim", None), "'connector.in_dim' is None (null)"),
    (set_path("connector.mlp_ratio", float("inf")), "'connector.mlp_ratio' is inf"),
    (set_path("connector.read_image", "yes"), "'connector.read_image' is 'yes' (a string); expected true or false"),
    (set_path("image.max_pixels", 0), "'image.max_pixels' is 0 (a number); expected a whole number from 784"),
    (set_path("image", {"min_pixels": 500, "max_pixels": 500}), "'image.max_pixels' is 500"),
    (set_path("image", {"min_pixels": 50000, "max_pixels": 10000}), "expected at most max_pixels (10000)"),
    (set_path("generator.ip.double_blocks", [0, 0]), "'generator.ip.double_blocks' is [0, 0]"),
    (set_path("generator.ip.context_dim", 2 ** 40), "'generator.ip.context_dim' is 1099511627776"),
    (set_path("generator.ip.hidden_size", "32"), "'generator.ip.hidden_size' is '32' (a string)"),
    (set_path("prompt_template", ["x"]), "'prompt_template' is ['x'] (a list)"),
    (set_path("training", 5), "'training' must be a JSON object, found a number"),
], ids=["missing-sections", "version-string", "version-zero", "version-bool", "backbone-list", "hidden-string",
        "rank-string", "rank-zero", "alpha-nan", "bad-regex", "width-bomb", "layers-bomb", "heads-divisor",
        "in-dim-null", "mlp-inf", "bool-string", "max-pixels-zero", "pixels-too-small", "pixels-swapped",
        "duplicate-blocks", "context-bomb", "ip-hidden-string", "template-list", "training-number"])
def test_metadata_schema(tmp_path, change, fragment):
    path = tmp_path / "bad.safetensors"
    write_raw(path, edited(change), sections_for(with_ip(metadata())))
    with pytest.raises(AdapterFileError) as caught:
        load_adapter(path)
    message = str(caught.value)
    assert fragment in message and message.startswith("bad.safetensors"), message
    assert not any(marker in message for marker in RAW_MARKERS), message


@pytest.mark.parametrize("data", ["[1, 2]", "\"text\"", "null", "{\"format\": 3}", "[" * 5000 + "]" * 5000],
                         ids=["list", "string", "null", "format-number", "deep-nesting"])
def test_metadata_of_the_wrong_json_type(tmp_path, data):
    path = tmp_path / "odd.safetensors"
    write_raw(path, data, sections_for(metadata()))
    with pytest.raises(AdapterFileError, match="odd.safetensors") as caught:
        read_adapter_metadata(path)
    assert not any(marker in str(caught.value) for marker in RAW_MARKERS), str(caught.value)


def mutate(section, name, value):
    def change(sections):
        if value is None:
            sections[section].pop(name)
        else:
            sections[section][name] = value
    return change


@pytest.mark.parametrize("change, fragment", [
    (lambda s: s.pop("lora"), "holds no LoRA weights although its metadata describes LoRA of rank 4"),
    (mutate("lora", "m.q_proj.lora_B.weight", None), "has no partner m.q_proj.lora_B.weight"),
    (mutate("lora", "m.q_proj.lora_A.weight", torch.zeros(5, 8)), "does not fit the metadata's LoRA of rank 4"),
    (mutate("connector", "output.weight", None),
     "the connector tensors do not match the file's own metadata: 1 missing (e.g. output.weight)"),
    (mutate("connector", "output.weight", torch.zeros(64, 33)),
     "of another shape (e.g. output.weight is [64, 33], the metadata implies [64, 32])"),
    (mutate("connector", "extra.weight", torch.zeros(1)), "1 not described by it (e.g. extra.weight)"),
    (mutate("ip_adapter", "double_blocks.0.to_k.weight", torch.zeros(3, 3)), "the IP-Adapter tensors do not match"),
    (mutate("connector", "output.bias", torch.full((64,), float("nan"))), "connector tensor output.bias holds 64 NaN"),
    (mutate("connector", "output.bias", torch.zeros(64, dtype=torch.int64)),
     "has dtype int64; weights must be floating point"),
    (mutate("ip_adapter", "double_blocks.1.to_v.weight", torch.full((32, 64), float("inf"))),
     "ip-adapter tensor double_blocks.1.to_v.weight holds 2048 NaN or infinite"),
], ids=["lora-stripped", "lora-half", "lora-rank", "connector-missing", "connector-shape", "connector-extra",
        "ip-shape", "nan-tensor", "int-tensor", "inf-ip-tensor"])
def test_tensors_against_metadata(tmp_path, change, fragment):
    meta = with_ip(metadata())
    sections = sections_for(meta)
    change(sections)
    path = tmp_path / "bad.safetensors"
    write_raw(path, json.loads(meta.to_json()), sections)
    with pytest.raises(AdapterFileError) as caught:
        load_adapter(path)
    assert fragment in str(caught.value), str(caught.value)
    assert not any(marker in str(caught.value) for marker in RAW_MARKERS), str(caught.value)


def test_ip_tensors_without_their_description(tmp_path):
    meta = with_ip(metadata())
    sections = sections_for(meta)
    data = json.loads(meta.to_json())
    data["generator"] = None
    write_raw(tmp_path / "a.safetensors", data, sections)
    with pytest.raises(AdapterFileError, match="has no 'generator.ip' entry"):
        load_adapter(tmp_path / "a.safetensors")


def test_ip_adapter_loader_checks_before_allocating():
    from omni_attribute.ip_adapter import load_ip_adapter

    meta = with_ip(metadata())
    tensors = sections_for(meta)["ip_adapter"]
    assert load_ip_adapter(meta.generator, tensors, "a").config.context_dim == 64
    with pytest.raises(AdapterFileError, match="'generator.ip.context_dim' is 1099511627776"):
        load_ip_adapter({"ip": {**meta.generator["ip"], "context_dim": 2 ** 40}}, tensors, "a")
    with pytest.raises(AdapterFileError, match="1 missing"):
        load_ip_adapter(meta.generator, {k: v for k, v in list(tensors.items())[1:]}, "a")
    with pytest.raises(AdapterFileError, match="metadata describes an IP-Adapter but the file holds no IP-Adapter"):
        load_ip_adapter(meta.generator, {}, "a")
