"""Checks on what users hand the library, before anything is built from it.

* JSON metadata against a schema: types, required fields and bounded sizes (:class:`Fields`), so a
  hand-edited or foreign file fails with the file, the field, the value and the fix — never with
  ``'list' object has no attribute 'get'`` or an allocator asked for terabytes.
* Tensors against the shapes the metadata implies, read from the safetensors header and compared with
  the module built on the ``meta`` device (no memory): :func:`expected_shapes`, :func:`compare_shapes`.
* Tensor values: floating point and finite (:func:`check_tensors_finite`).

Every check raises the caller's error class (an :class:`~omni_attribute.errors.OmniAttributeError`).
Nothing here imports the library's model modules (callers pass a builder), so it sits below them all.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping

import torch

# Bounds on sizes read from files: generous for every real model (Qwen2.5-VL-72B is 8192 wide with 80
# layers, FLUX.1 3072 wide with 24 heads and 19 + 38 blocks), small enough that a damaged or hostile
# header cannot make us allocate absurd modules. README "Limits" lists them.
MAX_WIDTH = 16384            # any hidden size, connector width, token width D
MAX_LAYERS = 256             # connector layers, backbone layers
MAX_HEADS = 256
MAX_TOKENS = 1024            # connector query tokens M
MAX_MLP_RATIO = 16.0
MAX_LORA_RANK = 1024
MAX_BLOCKS = 1024            # DiT block indices carrying IP attention
MIN_MAX_PIXELS = 28 * 28     # the smallest image Qwen2.5-VL's processor makes (one 28x28 patch group)
MAX_MAX_PIXELS = 16384 * 28 * 28  # Qwen2.5-VL's own ceiling (12.8 M pixels)
MAX_TEXT = 2000              # prompt template, LoRA target regex, names
MAX_EMBEDS_ROWS = 65536
MAX_LABEL_CHARS = 4096

_MISSING = object()


def json_type(value: Any) -> str:
    """How a JSON value reads to a user: 'a string', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Fields:
    """Typed reads of one JSON object; a failure names the source, the field path and the value.

    ``fix`` ends every message (what the user should do, e.g. "re-export the file")."""

    def __init__(self, data: Any, path: str, source: str, error: type[Exception], fix: str,
                 noun: str = "metadata field"):
        self.path, self.source, self.error, self.fix, self.noun = path, source, error, fix, noun
        if not isinstance(data, dict):
            raise error(f"{source}: {self._where(None)} must be a JSON object, found {json_type(data)} "
                        f"{short(data)}: {fix}")
        self.data = data

    def _where(self, key: str | None) -> str:
        name = ".".join(p for p in (self.path, key) if p)
        return f"{self.noun} {name!r}" if name else "the metadata"

    def fail(self, key: str | None, value: Any, expected: str) -> None:
        raise self.error(f"{self.source}: {self._where(key)} is {short(value)} ({json_type(value)}); "
                         f"expected {expected}: {self.fix}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data or (self.data[key] is None and default is not _MISSING):
            if default is _MISSING:
                raise self.error(f"{self.source}: {self._where(key)} is missing: {self.fix}")
            return default
        return self.data[key]

    def integer(self, key: str, low: int, high: int, default: Any = _MISSING) -> int:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.fail(key, value, f"a whole number from {low} to {high}")
        return value

    def number(self, key: str, low: float, high: float, default: Any = _MISSING, low_open: bool = False,
               high_open: bool = False) -> float:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return default
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            ok = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not ok:
            lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
            self.fail(key, value, f"a finite number in {lo}{low:g}, {high:g}{hi}")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "true or false")
        return value

    def text(self, key: str, max_chars: int = MAX_TEXT, default: Any = _MISSING, non_empty: bool = False) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or len(value) > max_chars or (non_empty and not value.strip()):
            self.fail(key, value, f"a{' non-empty' if non_empty else ''} string of at most {max_chars} characters")
        return value

    def obj(self, key: str, default: Any = _MISSING) -> "Fields":
        return Fields(self.raw(key, default), ".".join(p for p in (self.path, key) if p), self.source, self.error,
                      self.fix, self.noun)

    def int_list(self, key: str, low: int, high: int, max_items: int, unique: bool = True) -> list[int]:
        value = self.raw(key)
        expected = f"a list of at most {max_items} {'different ' if unique else ''}whole numbers from {low} to {high}"
        if not isinstance(value, list) or len(value) > max_items:
            self.fail(key, value, expected)
        items = []
        for item in value:
            if isinstance(item, float) and item.is_integer():
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                self.fail(key, value, expected)
            items.append(item)
        if unique and len(set(items)) != len(items):
            self.fail(key, value, expected)
        return items

    def regex(self, key: str) -> str:
        value = self.text(key, non_empty=True)
        try:
            re.compile(value)
        except re.error as exc:
            self.fail(key, value, f"a valid regular expression ({exc.msg} at position {exc.pos})")
        return value


def ip_fields(ip: Fields) -> dict:
    """An IP-Adapter description (``generator.ip``), checked: what ``IPAdapterConfig.from_dict`` takes."""
    hidden = ip.integer("hidden_size", 1, MAX_WIDTH)
    heads = ip.integer("num_heads", 1, MAX_HEADS)
    if hidden % heads:
        ip.fail("num_heads", heads, f"a divisor of hidden_size {hidden}")
    return {"family": ip.text("family", 100, "flux"), "hidden_size": hidden, "num_heads": heads,
            "context_dim": ip.integer("context_dim", 1, MAX_WIDTH),
            "double_blocks": ip.int_list("double_blocks", 0, MAX_BLOCKS - 1, MAX_BLOCKS),
            "single_blocks": ip.int_list("single_blocks", 0, MAX_BLOCKS - 1, MAX_BLOCKS)}


def format_version(data: Mapping, source: str, supported: int, error: type[Exception], update: str,
                   fix: str) -> int:
    """The document's ``format_version``: the integer 1..``supported``; a newer one asks for ``update``."""
    version = data.get("format_version")
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise error(f"{source}: metadata field 'format_version' is {short(version)} ({json_type(version)}); "
                    f"expected the whole number {supported}: {fix}")
    if version > supported:
        raise error(f"{source}: format version {version} is newer than this plugin reads ({supported}): {update}")
    return version


# ---- tensors ---------------------------------------------------------------------------------------

def expected_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the module ``build`` makes, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = build()
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def compare_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, Iterable[int]], what: str,
                   source: str, error: type[Exception], fix: str) -> None:
    """Same names and shapes, or an error that counts what is missing, extra and of another shape (with
    an example of each) instead of a state_dict dump."""
    found = {k: tuple(v) for k, v in found.items()}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [(k, found[k], expected[k]) for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    if not (missing or extra or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:2])})")
    if extra:
        parts.append(f"{len(extra)} not described by it (e.g. {', '.join(extra[:2])})")
    if wrong:
        key, got, want = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {key} is {list(got)}, the metadata implies {list(want)})")
    raise error(f"{source}: the {what} tensors do not match the file's own metadata: {'; '.join(parts)}. {fix}")


def check_tensors_finite(tensors: Mapping[str, torch.Tensor], what: str, source: str, error: type[Exception],
                         fix: str) -> None:
    """Floating point and free of NaN / infinity, or an error naming the first bad tensor."""
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point()):
            raise error(f"{source}: {what} tensor {name} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                        f"weights must be floating point. {fix}")
        if tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise error(f"{source}: {what} tensor {name} holds {bad} NaN or infinite value(s). {fix}")
