"""Attribute-oriented retrieval, scored against labels: precision@k per attribute and the leakage onto the
other labels (the paper's CelebA experiment; the tiny world's metric, lab/world/evaluate.py, is the same).

Labels come as a CSV (a header, the image name in the first column, one column per label) or in CelebA's
``list_attr_celeba.txt`` layout (a count line, a line of 40 names, then ``000001.jpg -1 1 ...``), read as is.

Each queried attribute line is scored on a *label group* (one or more columns; two images agree on it when
every column agrees): precision@k = the fraction of a query's k nearest neighbours (itself left out) that agree
with it on the group, averaged over queries; chance = that fraction for a retrieval blind to the group (the
share of agreeing pairs). Leakage = the same precision on every *other* label, averaged, with its chance level. Selectivity = (precision − chance) − (leakage −
leakage chance): 0 for an embedding that ignores the attribute text.

The other labels are every column outside the attribute's group, each on its own.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OmniAttributeError
from ..retrieval.search import unit


class EvaluationError(OmniAttributeError):
    """An evaluation's inputs (labels, groups, index, config) cannot be used as given."""


# Our reading of the paper's three CelebA attributes in CelebA's 40 binary labels (CelebA has no clothing
# labels as such: hats, neckwear and jewellery stand in for it).
CELEBA_GROUPS = {
    "hairstyle": ["Bald", "Bangs", "Receding_Hairline", "Straight_Hair", "Wavy_Hair"],
    "facial expression": ["Smiling", "Mouth_Slightly_Open", "Narrow_Eyes"],
    "clothing": ["Wearing_Hat", "Wearing_Necktie", "Wearing_Necklace", "Wearing_Earrings"],
}


@dataclass
class Labels:
    columns: list[str]
    rows: dict[str, tuple[str, ...]]     # image name → one value per column

    def lookup(self, name: str) -> tuple[str, ...] | None:
        if name in self.rows:
            return self.rows[name]
        return self._by_base.get(Path(name).name)

    def __post_init__(self):
        self._by_base = {Path(k).name: v for k, v in self.rows.items()}


def read_labels(path: str | Path) -> Labels:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise EvaluationError(f"cannot read the labels file {str(path)!r}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise EvaluationError(f"{path.name} holds no labelled images: a header line and one line per image")
    if lines[0].strip().isdigit():  # CelebA: count, names, then rows separated by spaces
        columns = lines[1].split()
        rows = {}
        for number, line in enumerate(lines[2:], 3):
            parts = line.split()
            if len(parts) != len(columns) + 1:
                raise EvaluationError(f"{path.name} line {number}: {len(parts) - 1} values for {len(columns)} labels")
            rows[parts[0]] = tuple(parts[1:])
        return Labels(columns, rows)
    reader = list(csv.reader(lines))
    header = [h.strip() for h in reader[0]]
    if len(header) < 2:
        raise EvaluationError(f"{path.name}: the header needs the image column and at least one label column")
    rows = {}
    for number, parts in enumerate(reader[1:], 2):
        if len(parts) != len(header):
            raise EvaluationError(f"{path.name} line {number}: {len(parts)} fields, the header has {len(header)}")
        rows[parts[0].strip()] = tuple(p.strip() for p in parts[1:])
    return Labels(header[1:], rows)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def resolve_groups(attributes: list[str], labels: Labels, groups: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """Which label columns each queried attribute is scored on: given groups, else a column of the same name."""
    by_norm = {_norm(c): c for c in labels.columns}
    resolved = {}
    for attribute in attributes:
        columns = (groups or {}).get(attribute)
        if columns is None:
            match = by_norm.get(_norm(attribute))
            if match is None:
                raise EvaluationError(
                    f"no label column for attribute {attribute!r} (columns: {', '.join(labels.columns[:12])}"
                    f"{' ...' if len(labels.columns) > 12 else ''}): name its columns with --group "
                    f"\"{attribute}=COL1,COL2\" (or --preset celeba)")
            columns = [match]
        missing = [c for c in columns if c not in labels.columns]
        if missing:
            raise EvaluationError(f"attribute {attribute!r}: the labels have no column(s) {missing}")
        resolved[attribute] = list(columns)
    return resolved


def _chance(codes: np.ndarray) -> float:
    n = len(codes)
    _, counts = np.unique(codes, return_counts=True)
    return float(((counts * (counts - 1)).sum()) / (n * (n - 1))) if n > 1 else 0.0


def _codes(values: list[tuple[str, ...]], columns: list[int]) -> np.ndarray:
    keys = [tuple(v[c] for c in columns) for v in values]
    lookup: dict[tuple, int] = {}
    return np.array([lookup.setdefault(key, len(lookup)) for key in keys])


def nearest(vectors: np.ndarray, k: int, queries: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
    """Exact cosine top-k of the chosen rows among all rows, the row itself left out: [Q, k] row numbers."""
    vectors = unit(vectors)
    queries = np.arange(len(vectors)) if queries is None else queries
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block):
        rows = queries[start:start + block]
        sim = vectors[rows] @ vectors.T
        sim[np.arange(len(rows)), rows] = -np.inf
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
        out[start:start + len(rows)] = np.take_along_axis(part, order, 1)
    return out


def _score(values, columns, group, neighbours, chosen) -> tuple[float, float]:
    """(precision of the neighbours on the group's labels, its chance level)."""
    codes = _codes(values, [columns.index(c) for c in group])
    return float((codes[neighbours] == codes[chosen][:, None]).mean()), _chance(codes)


@dataclass
class RetrievalResult:
    attribute: str
    group: list[str]
    precision: float
    chance: float
    leakage: float
    leakage_chance: float
    per_label: dict = field(default_factory=dict)   # other label → {"precision", "chance"}

    @property
    def selectivity(self) -> float:
        return (self.precision - self.chance) - (self.leakage - self.leakage_chance)

    def to_dict(self) -> dict:
        return {"attribute": self.attribute, "group": self.group, "precision": self.precision, "chance": self.chance,
                "leakage": self.leakage, "leakage_chance": self.leakage_chance, "selectivity": self.selectivity,
                "per_label": self.per_label}


def evaluate_retrieval(vectors: dict[str, np.ndarray], values: list[tuple[str, ...]], columns: list[str],
                       groups: dict[str, list[str]], k: int = 10, queries: np.ndarray | None = None
                       ) -> list[RetrievalResult]:
    """``vectors``: attribute → [N, D] (row i is the image with label values ``values[i]``)."""
    n = len(values)
    if n <= k:
        raise EvaluationError(f"{n} labelled images are too few for precision@{k}: lower --k or label more images")
    results = []
    for attribute, rows in vectors.items():
        group = groups[attribute]
        others = [[c] for c in columns if c not in group]
        neighbours = nearest(np.asarray(rows), k, queries)
        chosen = queries if queries is not None else np.arange(n)
        precision, chance = _score(values, columns, group, neighbours, chosen)
        per_label = {"+".join(o): dict(zip(("precision", "chance"), _score(values, columns, o, neighbours, chosen)))
                     for o in others}
        leak = [v["precision"] for v in per_label.values()]
        leak_chance = [v["chance"] for v in per_label.values()]
        results.append(RetrievalResult(attribute, group, precision, chance,
                                       float(np.mean(leak)) if leak else 0.0,
                                       float(np.mean(leak_chance)) if leak_chance else 0.0, per_label))
    return results


def evaluate_index(index, labels: Labels, groups: dict[str, list[str]] | None = None, k: int = 10,
                   queries: int = 0, seed: int = 0) -> tuple[list[RetrievalResult], dict]:
    """Score an AttributeIndex's attribute lines against the labels of its images."""
    names = [r[0] for r in index.images]
    keep = [i for i, name in enumerate(names) if labels.lookup(name) is not None]
    if not keep:
        raise EvaluationError(f"none of the index's {len(names)} images (e.g. {names[0] if names else '-'}) is in the "
                              "labels file: the first column must name the images as the index does (or by file name)")
    values = [labels.lookup(names[i]) for i in keep]
    resolved = resolve_groups(index.attributes, labels, groups)
    vectors = {a: index.vectors(a)[keep] for a in index.attributes}
    chosen = None
    if queries and queries < len(keep):
        chosen = np.sort(np.random.default_rng(seed).choice(len(keep), size=queries, replace=False))
    results = evaluate_retrieval(vectors, values, labels.columns, resolved, k, chosen)
    info = {"images": len(names), "labelled": len(keep), "queries": len(chosen) if chosen is not None else len(keep),
            "k": k, "adapter": index.adapter.to_dict(), "index": str(index.folder)}
    return results, info


def markdown_table(results: list[RetrievalResult], k: int) -> str:
    lines = [f"| attribute | label group | precision@{k} | chance | leakage | leakage chance | selectivity |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.attribute} | {', '.join(r.group)} | {r.precision:.3f} | {r.chance:.3f} | {r.leakage:.3f} "
                     f"| {r.leakage_chance:.3f} | {r.selectivity:+.3f} |")
    return "\n".join(lines)


def write_results(out: Path, results: list[RetrievalResult], info: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps({**info, "results": [r.to_dict() for r in results]}, indent=1))
    (out / "retrieval.md").write_text(markdown_table(results, info["k"]) + "\n")
