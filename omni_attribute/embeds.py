"""OMNI_ATTRIBUTE_EMBEDS: attribute tokens and pooled vectors, one row per (image, instruction)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import EmbedsError, EmbedsFileError
from .files import atomic_save_safetensors, save_safetensors_new
from .injection import AttributeCondition
from .validation import (MAX_EMBEDS_ROWS, MAX_LABEL_CHARS, Fields, check_tensors_finite, format_version, json_type,
                         short)

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
        for name, tensor, ndim in (("tokens", self.tokens, 3), ("pooled", self.pooled, 2)):
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != ndim or not tensor.is_floating_point():
                shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise EmbedsError(f"embeds {name} must be a {ndim}-D floating-point tensor, got {shape}")
        n, m, d = self.tokens.shape
        if self.pooled.shape != (n, d):
            raise EmbedsError(
                f"embeds tokens {list(self.tokens.shape)} and pooled {list(self.pooled.shape)} do not fit together"
            )
        if not (n and m and d):
            raise EmbedsError(f"embeds hold no embedding (tokens {list(self.tokens.shape)}: {n} rows of {m} tokens, "
                              f"{d} wide): encode at least one image under one attribute")
        if len(self.attributes) != n or len(self.image_index) != n:
            raise EmbedsError(f"embeds have {n} rows but {len(self.attributes)} attribute labels and "
                              f"{len(self.image_index)} image indices")
        for name, tensor in (("tokens", self.tokens), ("pooled", self.pooled)):
            if not bool(torch.isfinite(tensor).all()):
                raise EmbedsError(f"embeds {name} hold {int((~torch.isfinite(tensor)).sum())} NaN or infinite "
                                  "value(s): they would make every image they touch NaN")

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

    def row_conditions(self, weight: float = 1.0, start_percent: float = 0.0,
                       end_percent: float = 1.0) -> list[AttributeCondition]:
        """Each row as its own condition (one per image and attribute line), labelled by its attribute."""
        return [AttributeCondition(self.tokens[row:row + 1], weight, start_percent, end_percent,
                                   f"image {self.image_index[row]}: {self.attributes[row]}")
                for row in range(len(self))]

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


def save_embeds(path: str | os.PathLike, embeds: AttributeEmbeds, replace: bool = True) -> None:
    """Write ``embeds`` (checked: rows, shapes, finite values) to ``path`` atomically; with ``replace=False``
    an existing file is never replaced (FileExistsError)."""
    if not isinstance(embeds, AttributeEmbeds):
        raise EmbedsError(f"expected attribute embeds, got {type(embeds).__name__}")
    embeds.__post_init__()  # a caller may have changed the tensors since construction
    meta = json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "attributes": embeds.attributes,
                       "image_index": embeds.image_index, "info": embeds.info}, default=str)
    tensors = {"tokens": embeds.tokens, "pooled": embeds.pooled}
    if replace:
        atomic_save_safetensors(tensors, path, {"omni_attribute_embeds": meta})
    else:
        save_safetensors_new(tensors, path, {"omni_attribute_embeds": meta})


RESAVE = "save the embeds again with the 'Save Omni-Attribute Embeds' node"


def load_embeds(path: str | os.PathLike) -> AttributeEmbeds:
    """Read an embeds file, checked: metadata against its schema, tensor names, dtypes and shapes (before
    their data is read), at least one row of at least one token, finite values."""
    path = Path(path)
    if not path.is_file():
        raise EmbedsFileError(f"embeds file {str(path)!r} does not exist")
    source = path.name
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = (handle.metadata() or {}).get("omni_attribute_embeds")
            if header is None:
                raise EmbedsFileError(
                    f"{source} is a safetensors file but not Omni-Attribute embeds (no 'omni_attribute_embeds' "
                    "metadata): save embeds with the 'Save Omni-Attribute Embeds' node"
                )
            keys = set(handle.keys())
            if keys != {"tokens", "pooled"}:
                raise EmbedsFileError(f"{source}: expected tensors 'tokens' and 'pooled', found {sorted(keys)[:6]}: "
                                      f"{RESAVE}")
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in keys}
            tokens_shape = shapes["tokens"]
            if len(tokens_shape) != 3 or shapes["pooled"] != [tokens_shape[0], tokens_shape[-1]]:
                raise EmbedsFileError(f"{source}: tokens {tokens_shape} and pooled {shapes['pooled']} do not fit "
                                      f"together (expected [rows, tokens, width] and [rows, width]): {RESAVE}")
            if not all(tokens_shape):
                raise EmbedsFileError(f"{source} holds no embedding (tokens {tokens_shape}: {tokens_shape[0]} rows of "
                                      f"{tokens_shape[1]} tokens, {tokens_shape[2]} wide): encode and save again")
            rows = tokens_shape[0]
            meta = _embeds_metadata(header, source, rows)
            tokens, pooled = handle.get_tensor("tokens"), handle.get_tensor("pooled")
    except (SafetensorError, OSError) as exc:
        raise EmbedsFileError(f"{source} is not a readable .safetensors file ({exc}): it may be truncated") from exc
    check_tensors_finite({"tokens": tokens, "pooled": pooled}, "embeds", source, EmbedsFileError,
                         "The embeds are unusable: encode the image again and save anew")
    return AttributeEmbeds(tokens=tokens, pooled=pooled, **meta)


def _embeds_metadata(header: str, source: str, rows: int) -> dict:
    """The embeds metadata against its schema: the per-row fields of :class:`AttributeEmbeds`."""
    try:
        data = json.loads(header)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise EmbedsFileError(f"{source}: damaged metadata, not valid JSON ({exc}): {RESAVE}") from exc
    if not isinstance(data, dict):
        raise EmbedsFileError(f"{source}: metadata must be a JSON object, found {json_type(data)}: {RESAVE}")
    if data.get("format") != FORMAT_NAME:
        raise EmbedsFileError(f"{source}: metadata format is {short(data.get('format'))}, expected "
                              f"{FORMAT_NAME!r}: it is not Omni-Attribute embeds; {RESAVE}")
    format_version(data, source, FORMAT_VERSION, EmbedsFileError, "update the Omni-Attribute plugin", RESAVE)
    fields = Fields(data, "", source, EmbedsFileError, RESAVE)
    attributes = fields.raw("attributes")
    if (not isinstance(attributes, list) or len(attributes) != rows
            or not all(isinstance(a, str) and len(a) <= MAX_LABEL_CHARS for a in attributes)):
        fields.fail("attributes", attributes, f"a list of {rows} strings (one label per row)")
    index = fields.int_list("image_index", 0, MAX_EMBEDS_ROWS, rows, unique=False)
    if len(index) != rows:
        fields.fail("image_index", index, f"a list of {rows} whole numbers (one image index per row)")
    info = fields.obj("info", {}).data
    if "adapter" in info and not isinstance(info["adapter"], str):
        fields.obj("info").fail("adapter", info["adapter"], "the adapter's file name (a string)")
    return {"attributes": list(attributes), "image_index": index, "info": info}
