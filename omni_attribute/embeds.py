"""OMNI_ATTRIBUTE_EMBEDS: attribute tokens and pooled vectors, one row per (image, instruction)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import EmbedsFileError
from .files import atomic_save_safetensors
from .injection import AttributeCondition

FORMAT_NAME = "omni-attribute-embeds"
FORMAT_VERSION = 1


@dataclass
class AttributeEmbeds:
    tokens: torch.Tensor                 # [N, M, D]
    pooled: torch.Tensor                 # [N, D]
    attributes: list[str]                # per row: the attributes described, e.g. "object color, and background"
    image_index: list[int]               # per row: which input image
    info: dict = field(default_factory=dict)  # adapter name, backbone, generator width ...

    def __post_init__(self):
        n = self.tokens.shape[0]
        if self.tokens.ndim != 3 or self.pooled.shape != (n, self.tokens.shape[2]):
            raise EmbedsFileError(
                f"embeds tokens {list(self.tokens.shape)} and pooled {list(self.pooled.shape)} do not fit together"
            )
        if len(self.attributes) != n or len(self.image_index) != n:
            raise EmbedsFileError(f"embeds have {n} rows but {len(self.attributes)} attribute labels")

    @property
    def width(self) -> int:
        return self.tokens.shape[2]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def condition(self, weight: float = 1.0, start_percent: float = 0.0,
                  end_percent: float = 1.0) -> AttributeCondition:
        """All rows as one condition (their tokens act together), labelled by the attributes they describe."""
        label = " + ".join(dict.fromkeys(self.attributes))
        return AttributeCondition(self.tokens, weight, start_percent, end_percent, label)

    def summary(self) -> str:
        lines = [f"{len(self)} embedding(s): tokens {list(self.tokens.shape)}, pooled {list(self.pooled.shape)}"]
        for row in range(len(self)):
            norm = self.pooled[row].float().norm().item()
            lines.append(f"  image {self.image_index[row]} · {self.attributes[row]} · |pooled| = {norm:.4f}")
        return "\n".join(lines)

    @staticmethod
    def concat(parts: list["AttributeEmbeds"]) -> "AttributeEmbeds":
        return AttributeEmbeds(
            tokens=torch.cat([p.tokens for p in parts]), pooled=torch.cat([p.pooled for p in parts]),
            attributes=[a for p in parts for a in p.attributes],
            image_index=[i for p in parts for i in p.image_index],
            info=parts[0].info if parts else {},
        )


def save_embeds(path: str | os.PathLike, embeds: AttributeEmbeds) -> None:
    meta = json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "attributes": embeds.attributes,
                       "image_index": embeds.image_index, "info": embeds.info})
    atomic_save_safetensors({"tokens": embeds.tokens, "pooled": embeds.pooled}, path, {"omni_attribute_embeds": meta})


def load_embeds(path: str | os.PathLike) -> AttributeEmbeds:
    path = Path(path)
    if not path.is_file():
        raise EmbedsFileError(f"embeds file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = (handle.metadata() or {}).get("omni_attribute_embeds")
            if header is None:
                raise EmbedsFileError(
                    f"{path.name} is a safetensors file but not Omni-Attribute embeds (no 'omni_attribute_embeds' "
                    "metadata): save embeds with the 'Save Omni-Attribute Embeds' node"
                )
            keys = set(handle.keys())
            if keys != {"tokens", "pooled"}:
                raise EmbedsFileError(f"{path.name}: expected tensors 'tokens' and 'pooled', found {sorted(keys)}")
            tokens, pooled = handle.get_tensor("tokens"), handle.get_tensor("pooled")
    except (SafetensorError, OSError) as exc:
        raise EmbedsFileError(f"{path.name} is not a readable .safetensors file ({exc}): it may be truncated") from exc
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as exc:
        raise EmbedsFileError(f"{path.name}: damaged metadata ({exc})") from exc
    if meta.get("format") != FORMAT_NAME or meta.get("format_version", 99) > FORMAT_VERSION:
        raise EmbedsFileError(
            f"{path.name}: format {meta.get('format')!r} v{meta.get('format_version')} is not one this plugin reads "
            f"({FORMAT_NAME} v{FORMAT_VERSION}); update the plugin"
        )
    return AttributeEmbeds(tokens=tokens, pooled=pooled, attributes=list(meta["attributes"]),
                           image_index=[int(i) for i in meta["image_index"]], info=meta.get("info") or {})
