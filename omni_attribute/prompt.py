"""Attribute text → instructions for the MLLM.

Users write attributes as free text. One line is one instruction (one embedding); several
attributes in one line, separated by commas or semicolons, are described together, as the
paper does during training: ``man identity, man hairstyle`` →
``Exclusively describe man identity, and man hairstyle:``.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import AttributeTextError

DEFAULT_TEMPLATE = "Exclusively describe {attributes}:"
MAX_ATTRIBUTE_CHARS = 200
MAX_ATTRIBUTES_PER_INSTRUCTION = 16
MAX_INSTRUCTIONS = 64

_SPLIT = re.compile(r"[,;]")
_LEADING_AND = re.compile(r"^(and|&)\s+", re.IGNORECASE)


def _clean(text: str) -> str:
    """Drop control characters and fold runs of white space."""
    kept = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    return " ".join(kept.split())


def parse_attribute_line(line: str) -> list[str]:
    """Split one line into attribute names; raises on empty or absurd names."""
    names = []
    for part in _SPLIT.split(_clean(line)):
        name = _LEADING_AND.sub("", part.strip()).strip()
        if not name:
            continue
        if not any(ch.isalnum() for ch in name):
            raise AttributeTextError(
                f"attribute {name!r} has no letters or digits: name a visual attribute, "
                "e.g. 'object color' or 'image lighting'"
            )
        if len(name) > MAX_ATTRIBUTE_CHARS:
            raise AttributeTextError(
                f"attribute '{name[:40]}...' is {len(name)} characters long (at most "
                f"{MAX_ATTRIBUTE_CHARS}): name the attribute in a few words, e.g. 'man hairstyle'"
            )
        names.append(name)
    if len(names) > MAX_ATTRIBUTES_PER_INSTRUCTION:
        raise AttributeTextError(
            f"{len(names)} attributes in one line (at most {MAX_ATTRIBUTES_PER_INSTRUCTION}): "
            "put attributes that should get separate embeddings on separate lines"
        )
    return names


def parse_attribute_text(text: str) -> list[list[str]]:
    """Parse the multi-line attribute text of a node into one attribute list per instruction."""
    if text is None or not str(text).strip():
        raise AttributeTextError(
            "the attribute text is empty: write the attribute(s) to extract, e.g. "
            "'object color' (one line per embedding; commas combine attributes in one)"
        )
    sets = [names for names in (parse_attribute_line(line) for line in str(text).splitlines()) if names]
    if not sets:
        raise AttributeTextError(
            f"no attribute found in {text[:60]!r}: write e.g. 'object color' or 'image lighting'"
        )
    if len(sets) > MAX_INSTRUCTIONS:
        raise AttributeTextError(
            f"{len(sets)} attribute lines (at most {MAX_INSTRUCTIONS}): split the work over several nodes"
        )
    return sets


def join_attributes(names: list[str]) -> str:
    """'a' · 'a, and b' · 'a, b, and c' — the paper's phrasing."""
    if not names:
        raise AttributeTextError("no attribute to describe")
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + ", and " + names[-1]


def format_instruction(names: list[str], template: str = DEFAULT_TEMPLATE) -> str:
    """Fill the adapter's instruction template with the attribute names. A template without the
    ``{attributes}`` placeholder ignores them: that is a holistic encoder (a baseline)."""
    joined = join_attributes(names)
    return template.replace("{attributes}", joined) if "{attributes}" in template else template
