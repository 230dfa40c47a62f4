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

from .connector import ConnectorConfig
from .errors import AdapterFileError, AdapterMismatchError
from .files import atomic_save_safetensors

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
        except json.JSONDecodeError as exc:
            raise AdapterFileError(f"{source}: metadata is not valid JSON ({exc}); the file is damaged") from exc
        if data.get("format") != FORMAT_NAME:
            raise AdapterFileError(f"{source}: metadata format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AdapterFileError(
                f"{source}: format version {version!r} is newer than this plugin reads ({FORMAT_VERSION}): "
                "update the Omni-Attribute plugin"
            )
        missing = [k for k in ("backbone", "lora", "connector", "prompt_template") if k not in data]
        if missing:
            raise AdapterFileError(f"{source}: metadata lacks {', '.join(missing)}; the file is incomplete")
        return cls(
            backbone=data["backbone"],
            lora=data["lora"],
            connector=ConnectorConfig.from_dict(data["connector"]),
            prompt_template=data["prompt_template"],
            image=data.get("image") or {},
            generator=data.get("generator"),
            training=data.get("training") or {},
        )


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
    name = Path(path).name
    tensors: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SECTIONS}
    with _open(path) as handle:
        metadata = _metadata_of(handle, path)
        try:
            for key in handle.keys():
                section, _, rest = key.partition(".")
                if section not in tensors or not rest:
                    raise AdapterFileError(f"{name}: unexpected tensor {key!r}; the file was not written by Omni-Attribute")
                tensors[section][rest] = handle.get_tensor(key)
        except SafetensorError as exc:
            raise AdapterFileError(f"{name}: tensor data is damaged ({exc}); re-download or re-export the file") from exc
    if not tensors["connector"]:
        raise AdapterFileError(f"{name}: holds no connector weights; it cannot encode attributes")
    return AdapterFile(metadata=metadata, tensors=tensors, path=str(path))


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
