"""The adapter file: one .safetensors with LoRA, connector and IP-Adapter weights plus JSON metadata.

Tensors are stored under the prefixes ``lora.``, ``connector.`` and ``ip_adapter.``; the
metadata is one JSON document under the safetensors metadata key ``omni_attribute``. Only
safetensors is read: user files are never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .connector import Connector, ConnectorConfig
from .errors import AdapterFileError, AdapterMismatchError
from .files import atomic_save_safetensors
from .ip_adapter import IPAdapter, IPAdapterConfig
from .validation import (MAX_HEADS, MAX_LAYERS, MAX_LORA_RANK, MAX_MAX_PIXELS, MAX_MLP_RATIO, MAX_TEXT, MAX_TOKENS,
                         MAX_WIDTH, MIN_MAX_PIXELS, Fields, check_tensors_finite, compare_shapes, expected_shapes,
                         format_version, ip_fields, json_type, short)

FORMAT_NAME = "omni-attribute-adapter"
FORMAT_VERSION = 1
METADATA_KEY = "omni_attribute"
SECTIONS = ("lora", "connector", "ip_adapter")


@dataclass
class AdapterMetadata:
    backbone: dict                    # family, hidden_size, num_hidden_layers, (name)
    lora: dict                        # r, alpha, dropout, target_modules (regex)
    connector: ConnectorConfig
    prompt_template: str
    image: dict = field(default_factory=lambda: {"min_pixels": 56 * 56, "max_pixels": 448 * 448})
    generator: dict | None = None     # family, hidden_size, context_dim, double_blocks, single_blocks ...
    training: dict = field(default_factory=dict)  # config_hash and free-form provenance

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone,
            "lora": self.lora,
            "connector": self.connector.to_dict(),
            "prompt_template": self.prompt_template,
            "image": self.image,
            "generator": self.generator,
            "training": self.training,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "adapter") -> "AdapterMetadata":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise AdapterFileError(f"{source}: metadata is not valid JSON ({exc}); the file is damaged") from exc
        return cls(**parse_metadata(data, source))


REEXPORT = "the file is damaged or was edited by hand: re-export it with omni-attribute-train"


def parse_metadata(data: object, source: str) -> dict:
    """The adapter metadata checked against its schema (types, required fields, bounded sizes): the
    keyword arguments of :class:`AdapterMetadata`."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{source}: metadata must be a JSON object, found {json_type(data)}: {REEXPORT}")
    if data.get("format") != FORMAT_NAME:
        raise AdapterFileError(f"{source}: metadata format is {short(data.get('format'))}, expected {FORMAT_NAME!r}: "
                               "it is not an Omni-Attribute adapter")
    format_version(data, source, FORMAT_VERSION, AdapterFileError, "update the Omni-Attribute plugin", REEXPORT)
    missing = [k for k in ("backbone", "lora", "connector", "prompt_template") if k not in data]
    if missing:
        raise AdapterFileError(f"{source}: metadata lacks {', '.join(missing)}; the file is incomplete: {REEXPORT}")
    root = Fields(data, "", source, AdapterFileError, REEXPORT)
    backbone = root.obj("backbone")
    backbone_meta = {"family": backbone.text("family", 100, non_empty=True)}
    for key, high in (("hidden_size", MAX_WIDTH), ("num_hidden_layers", MAX_LAYERS)):
        if key in backbone.data:
            backbone_meta[key] = backbone.integer(key, 1, high)
    if backbone.has("name"):
        backbone_meta["name"] = backbone.text("name", 200)
    lora = root.obj("lora")
    lora.integer("r", 1, MAX_LORA_RANK)
    lora.number("alpha", 0, 1e6, low_open=True)
    lora.number("dropout", 0, 1, default=0.0, high_open=True)
    lora.regex("target_modules")
    lora_meta = {**lora.data, "r": lora.integer("r", 1, MAX_LORA_RANK)}
    return {"backbone": {**backbone.data, **backbone_meta}, "lora": lora_meta,
            "connector": ConnectorConfig.from_dict(connector_fields(root.obj("connector"))),
            "prompt_template": root.text("prompt_template", MAX_TEXT),
            "image": image_fields(root.obj("image", {})), "generator": generator_fields(root, source),
            "training": root.obj("training", {}).data}


def connector_fields(c: Fields) -> dict:
    width = c.integer("width", 1, MAX_WIDTH, 1024)
    heads = c.integer("num_heads", 1, MAX_HEADS, 16)
    if width % heads:
        c.fail("num_heads", heads, f"a divisor of the connector width {width}")
    read_image = c.boolean("read_image", True)
    positions = c.boolean("image_positions", False)  # adapters written before the field existed have none
    if positions and not read_image:
        c.fail("image_positions", positions, "false when read_image is false (no image tokens to place)")
    ratio = c.number("mlp_ratio", 0, MAX_MLP_RATIO, 4.0, low_open=True)
    if int(width * ratio) < 1:
        c.fail("mlp_ratio", ratio, f"at least {1 / width:g} for width {width}")
    return {"in_dim": c.integer("in_dim", 1, MAX_WIDTH), "out_dim": c.integer("out_dim", 1, MAX_WIDTH, 4096),
            "num_tokens": c.integer("num_tokens", 1, MAX_TOKENS, 16), "width": width,
            "num_layers": c.integer("num_layers", 0, MAX_LAYERS, 8), "num_heads": heads, "mlp_ratio": ratio,
            "read_image": read_image, "image_positions": positions}


def image_fields(image: Fields) -> dict:
    out = dict(image.data)
    low = image.integer("min_pixels", 1, MAX_MAX_PIXELS, None)
    high = image.integer("max_pixels", MIN_MAX_PIXELS, MAX_MAX_PIXELS, None)
    if low is not None:
        out["min_pixels"] = low
    if high is not None:
        out["max_pixels"] = high
    if (low or MIN_MAX_PIXELS) > (high or 448 * 448):
        image.fail("min_pixels", low, f"at most max_pixels ({high or 448 * 448})")
    return out


def generator_fields(root: Fields, source: str) -> dict | None:
    if not root.has("generator"):
        return None
    generator = root.obj("generator")
    out = dict(generator.data)
    if generator.has("layout"):
        generator.obj("layout")
    if "ip" in generator.data:
        out["ip"] = ip_fields(generator.obj("ip"))
    return out


@dataclass
class AdapterFile:
    metadata: AdapterMetadata
    tensors: dict[str, dict[str, torch.Tensor]]  # section → name → tensor
    path: str = ""

    def section(self, name: str) -> dict[str, torch.Tensor]:
        return self.tensors.get(name, {})


def config_hash(config: dict) -> str:
    """Stable short hash of a training configuration, stored in the metadata."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_adapter(path: str | os.PathLike, metadata: AdapterMetadata, sections: dict[str, dict[str, torch.Tensor]]) -> None:
    flat: dict[str, torch.Tensor] = {}
    for section, tensors in sections.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown adapter section {section!r}; expected one of {SECTIONS}")
        for name, tensor in tensors.items():
            flat[f"{section}.{name}"] = tensor
    atomic_save_safetensors(flat, path, {METADATA_KEY: metadata.to_json()})


def read_adapter_metadata(path: str | os.PathLike) -> AdapterMetadata:
    """Read only the header: cheap, for listing and validation."""
    with _open(path) as handle:
        return _metadata_of(handle, path)


def load_adapter(path: str | os.PathLike) -> AdapterFile:
    """The whole file, checked before anything is built from it: the metadata against its schema, every
    tensor's name and shape (from the header, before its data is read) against the modules the metadata
    describes (built on the meta device, no memory), then the values (floating point, finite)."""
    name = Path(path).name
    tensors: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    with _open(path) as handle:
        metadata = _metadata_of(handle, path)
        try:
            shapes: dict[str, dict[str, tuple[int, ...]]] = {s: {} for s in SECTIONS}
            for key in handle.keys():
                section, _, rest = key.partition(".")
                if section not in tensors or not rest:
                    raise AdapterFileError(f"{name}: unexpected tensor {key!r}; the file was not written by Omni-Attribute")
                shapes[section][rest] = tuple(handle.get_slice(key).get_shape())
            check_tensor_shapes(metadata, shapes, name)
            for key in handle.keys():
                section, _, rest = key.partition(".")
                tensors[section][rest] = handle.get_tensor(key)
        except SafetensorError as exc:
            raise AdapterFileError(f"{name}: tensor data is damaged ({exc}); re-download or re-export the file") from exc
    for section, group in tensors.items():
        check_tensors_finite(group, section.replace("_", "-"), name, AdapterFileError,
                             REEXPORT[0].upper() + REEXPORT[1:])
    return AdapterFile(metadata=metadata, tensors=tensors, path=str(path))


def check_tensor_shapes(metadata: AdapterMetadata, shapes: dict[str, dict[str, tuple[int, ...]]], name: str) -> None:
    """Tensor names and shapes (read from the header) against what the metadata describes."""
    fix = REEXPORT[0].upper() + REEXPORT[1:]
    if not shapes["connector"]:
        raise AdapterFileError(f"{name}: holds no connector weights; it cannot encode attributes ({REEXPORT})")
    compare_shapes(expected_shapes(lambda: Connector(metadata.connector)), shapes["connector"], "connector", name,
                   AdapterFileError, fix)
    rank = metadata.lora["r"]
    if not shapes["lora"]:
        raise AdapterFileError(f"{name}: holds no LoRA weights although its metadata describes LoRA of rank {rank}: "
                               f"the file is incomplete (was its LoRA section stripped?); {REEXPORT}")
    for key, shape in shapes["lora"].items():
        module, _, kind = key.rpartition(".lora_")
        ok = kind in ("A.weight", "B.weight") and len(shape) == 2 and shape[0 if kind == "A.weight" else 1] == rank
        if not ok:
            raise AdapterFileError(f"{name}: LoRA tensor {key} of shape {list(shape)} does not fit the metadata's "
                                   f"LoRA of rank {rank} (expected <module>.lora_A.weight [{rank}, in] and "
                                   f"<module>.lora_B.weight [out, {rank}]). {fix}")
        partner = f"{module}.lora_{'B' if kind == 'A.weight' else 'A'}.weight"
        if partner not in shapes["lora"]:
            raise AdapterFileError(f"{name}: LoRA tensor {key} has no partner {partner}: the file is incomplete. {fix}")
    ip = (metadata.generator or {}).get("ip")
    if shapes["ip_adapter"]:
        if ip is None:
            raise AdapterFileError(f"{name}: holds IP-Adapter tensors but its metadata has no 'generator.ip' entry "
                                   f"describing them. {fix}")
        config = IPAdapterConfig.from_dict(ip)
        compare_shapes(expected_shapes(lambda: IPAdapter(config)), shapes["ip_adapter"], "IP-Adapter", name,
                       AdapterFileError, fix)


def check_backbone(metadata: AdapterMetadata, backbone_info: dict, adapter_name: str = "adapter") -> None:
    """Compare the adapter's recorded backbone with the one it is loaded on; say exactly what differs."""
    want = metadata.backbone
    problems = []
    if want.get("family") != backbone_info.get("family"):
        problems.append(f"backbone family {want.get('family')!r}, the folder holds {backbone_info.get('family')!r}")
    for key, label in (("hidden_size", "hidden size"), ("num_hidden_layers", "layer count")):
        if key in want and want[key] != backbone_info.get(key):
            problems.append(f"{label} {want[key]}, backbone has {backbone_info.get(key)}")
    if metadata.connector.in_dim != backbone_info.get("hidden_size"):
        problems.append(
            f"connector input width {metadata.connector.in_dim}, backbone hidden size {backbone_info.get('hidden_size')}"
        )
    if problems:
        trained = want.get("name") or want.get("family")
        raise AdapterMismatchError(
            f"{adapter_name} was trained for a different backbone: adapter trained for "
            + "; ".join(problems)
            + f". Load the backbone it was trained with ({trained}, hidden size {want.get('hidden_size')})."
        )


class _open:
    """safe_open with errors a user can act on."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self):
        if not self.path.is_file():
            raise AdapterFileError(f"adapter file {str(self.path)!r} does not exist")
        try:
            self._ctx = safe_open(str(self.path), framework="pt", device="cpu")
            return self._ctx.__enter__()
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterFileError(
                f"{self.path.name} is not a readable .safetensors file ({exc}); it may be truncated or "
                "corrupted: re-download or re-export it"
            ) from exc

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _metadata_of(handle, path) -> AdapterMetadata:
    name = Path(path).name
    header = handle.metadata() or {}
    if METADATA_KEY not in header:
        raise AdapterFileError(
            f"{name} has no Omni-Attribute metadata: it is not an Omni-Attribute adapter (an IP-Adapter "
            "or LoRA file from another pack?). Use a file written by omni-attribute-train."
        )
    return AdapterMetadata.from_json(header[METADATA_KEY], source=name)
