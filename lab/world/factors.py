"""Factors, values, phrasings and captions of the tiny attribute world."""

from __future__ import annotations

import random
from dataclasses import dataclass

FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "color": ("red", "green", "blue", "yellow"),
    "pattern": ("solid", "stripes", "dots"),
    "background": ("black", "white", "gray", "teal"),
    "lighting": ("left", "right", "top", "bottom"),
    "size": ("small", "medium", "large"),
}

# Several ways to name each factor. The last phrasing of each is held out of training pairs and
# used only in evaluation, so that "works with text it was not trained on" is measured.
PHRASINGS: dict[str, tuple[str, ...]] = {
    "shape": ("object shape", "the shape of the object", "shape", "silhouette of the object"),
    "color": ("object color", "the colour of the object", "color of the foreground object", "object hue"),
    "pattern": ("surface pattern", "the pattern on the object", "object texture", "pattern of the object"),
    "background": ("background color", "the colour of the background", "backdrop color", "background"),
    "lighting": ("lighting direction", "image lighting", "where the light comes from", "illumination"),
    "size": ("object size", "how big the object is", "scale of the object", "size of the object"),
}
TRAIN_PHRASINGS = {k: v[:-1] for k, v in PHRASINGS.items()}
HELD_OUT_PHRASINGS = {k: v[-1] for k, v in PHRASINGS.items()}


@dataclass(frozen=True)
class Assignment:
    """One image's ground truth: a value for every factor."""
    values: tuple[tuple[str, str], ...]

    def __getitem__(self, factor: str) -> str:
        return dict(self.values)[factor]

    def as_dict(self) -> dict[str, str]:
        return dict(self.values)

    @classmethod
    def of(cls, mapping: dict[str, str]) -> "Assignment":
        unknown = [f"{k}={v}" for k, v in mapping.items() if k not in FACTORS or v not in FACTORS[k]]
        if unknown or set(mapping) != set(FACTORS):
            raise ValueError(f"an assignment needs one known value per factor {list(FACTORS)}; bad: {unknown}")
        return cls(tuple((k, mapping[k]) for k in FACTORS))


def sample_assignment(rng: random.Random) -> Assignment:
    return Assignment.of({factor: rng.choice(values) for factor, values in FACTORS.items()})


def vary(base: Assignment, factors: list[str], rng: random.Random) -> Assignment:
    """A copy of ``base`` with a different value for each of ``factors``."""
    values = base.as_dict()
    for factor in factors:
        values[factor] = rng.choice([v for v in FACTORS[factor] if v != values[factor]])
    return Assignment.of(values)


PATTERN_WORDS = {"solid": "plain", "stripes": "striped", "dots": "dotted"}
LIGHTING_WORDS = {"left": "lit from the left", "right": "lit from the right", "top": "lit from above",
                  "bottom": "lit from below"}


def factor_words(a: Assignment, factor: str) -> str:
    """How a caption says ``a``'s value of one factor."""
    if factor == "pattern":
        return PATTERN_WORDS[a["pattern"]]
    if factor == "lighting":
        return LIGHTING_WORDS[a["lighting"]]
    if factor == "background":
        return f"a {a['background']} background"
    return a[factor]


def caption(a: Assignment) -> str:
    return caption_without(a, set())


def caption_without(a: Assignment, omitted: set[str]) -> str:
    """A caption that does not mention ``omitted`` factors (for prompts that leave them to a reference)."""
    head = [factor_words(a, f) for f in ("size", "pattern", "color") if f not in omitted]
    head.append(a["shape"] if "shape" not in omitted else "object")
    text = "a " + " ".join(head)
    if "background" not in omitted:
        text += " on " + factor_words(a, "background")
    if "lighting" not in omitted:
        text += ", " + factor_words(a, "lighting")
    return text
