"""Which pairs to annotate.

Three sources, each giving a list of ``PairTask`` (id, image_a, image_b) in a deterministic order:

- an explicit list: a JSONL (``image_a``, ``image_b``, optional ``id``) or CSV file (columns ``image_a``,
  ``image_b`` and optionally ``id``, or two unnamed columns); paths relative to the list's folder;
- groups: a folder per subject (every sub-folder is a group) or a CSV with an image and a group column;
  pairs are drawn within each group, at most ``per_group`` of them, from a generator seeded by the seed and
  the group's name (adding a group does not change the others' pairs);
- nearest neighbours: each image paired with its ``k`` most similar images under an embedding — this
  project's encoder under a holistic instruction, or a user's ``.npy`` — searched exactly (FAISS flat, or
  NumPy without FAISS) or approximately for large folders (FAISS HNSW).

Deduplication (every source): a pair of two near-identical images (their 16 x 16 thumbnails closer than
``near_duplicate_rms`` in RMS) carries no difference to name and is dropped, and so is a pair whose images
are near-identical to those of an earlier pair. Pair ids are derived from the image paths (or taken from
the list), so the same inputs always give the same ids: what a resumed annotation run keys on.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import AnnotateError
from .images import load_image
from .output import relative_path

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXACT_SEARCH_LIMIT = 50_000      # "auto" index: exact search up to this many images, HNSW above


@dataclass(frozen=True)
class PairTask:
    id: str
    image_a: Path
    image_b: Path
    extra: dict = field(default_factory=dict, compare=False, hash=False)


def pair_id(a: str, b: str) -> str:
    return hashlib.sha1(f"{a}\n{b}".encode()).hexdigest()[:16]


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotateError(f"image folder {str(folder)!r} does not exist: give the folder that holds the images")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# ---- explicit lists --------------------------------------------------------------------------------------

def read_pair_list(path: str | Path) -> list[PairTask]:
    """Pairs from a JSONL or CSV file; fails naming the line for a malformed row or a repeated id."""
    path = Path(path)
    if not path.is_file():
        raise AnnotateError(f"pair list {str(path)!r} does not exist: give a JSONL or CSV of image pairs "
                            "(omni-attribute-annotate pairs writes one)")
    base = path.parent
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            table = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
        if not table:
            raise AnnotateError(f"pair list {path.name} is empty: write one pair per row")
        header = [cell.strip() for cell in table[0]]
        if "image_a" in header and "image_b" in header:
            for number, row in enumerate(table[1:], 2):
                rows.append((f"{path.name}:{number}", dict(zip(header, (c.strip() for c in row)))))
        else:
            for number, row in enumerate(table, 1):
                if len(row) < 2:
                    raise AnnotateError(f"{path.name}:{number}: a row needs two image paths (or a header with "
                                        "image_a,image_b[,id])")
                rows.append((f"{path.name}:{number}", {"image_a": row[0].strip(), "image_b": row[1].strip()}))
    else:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise AnnotateError(f"{path.name}:{number}: not valid JSON ({exc.msg}); write one "
                                        '{"image_a": ..., "image_b": ...} object per line') from exc
                if not isinstance(data, dict):
                    raise AnnotateError(f"{path.name}:{number}: a line must be a JSON object with image_a and image_b")
                rows.append((f"{path.name}:{number}", data))
    tasks, seen = [], {}
    for where, data in rows:
        a, b = data.get("image_a"), data.get("image_b")
        if not isinstance(a, str) or not a.strip() or not isinstance(b, str) or not b.strip():
            raise AnnotateError(f"{where}: image_a and image_b must be non-empty paths")
        pid = str(data.get("id") or "").strip() or pair_id(a, b)
        if pid in seen:
            raise AnnotateError(f"{where}: id {pid!r} repeats {seen[pid]}: every pair needs its own id")
        seen[pid] = where
        tasks.append(PairTask(pid, *(Path(p) if Path(p).is_absolute() else base / p for p in (a, b))))
    if not tasks:
        raise AnnotateError(f"pair list {path.name} holds no pairs: write one pair per line")
    return tasks


# ---- groups ---------------------------------------------------------------------------------------------

def groups_from_folder(folder: str | Path) -> dict[str, list[Path]]:
    """Every sub-folder is a group (its images, at any depth); images at the top level are ignored (logged)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotateError(f"group folder {str(folder)!r} does not exist: give a folder with one sub-folder per subject")
    groups = {sub.name: list_images(sub) for sub in sorted(p for p in folder.iterdir() if p.is_dir())}
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        log.warning("%d images directly in %s belong to no group (put each subject's images in its own sub-folder)",
                    len(loose), folder)
    groups = {name: images for name, images in groups.items() if images}
    if not groups:
        raise AnnotateError(f"{folder} has no sub-folders with images: make one sub-folder per subject (group)")
    return groups


def groups_from_csv(path: str | Path, image_column: str = "image", group_column: str = "group") -> dict[str, list[Path]]:
    path = Path(path)
    if not path.is_file():
        raise AnnotateError(f"group table {str(path)!r} does not exist: give a CSV with an image and a group column")
    groups: dict[str, list[Path]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for column in (image_column, group_column):
            if column not in columns:
                raise AnnotateError(f"{path.name} has no column {column!r} (columns: {', '.join(columns)}): name the "
                                    "image and group columns with --image-column / --group-column")
        for number, row in enumerate(reader, 2):
            image, group = (row.get(image_column) or "").strip(), (row.get(group_column) or "").strip()
            if not image or not group:
                raise AnnotateError(f"{path.name}:{number}: empty {image_column!r} or {group_column!r}")
            groups.setdefault(group, []).append(Path(image) if Path(image).is_absolute() else path.parent / image)
    return {name: sorted(set(images)) for name, images in sorted(groups.items())}


def _pair_at(index: int, n: int) -> tuple[int, int]:
    """The ``index``-th pair (i < j) of n items in lexicographic order."""
    i = 0
    while index >= n - 1 - i:
        index -= n - 1 - i
        i += 1
    return i, i + 1 + index


def group_pairs(groups: dict[str, list[Path]], per_group: int, seed: int, root: Path | None = None) -> list[PairTask]:
    """Up to ``per_group`` distinct pairs within each group (all of them when fewer exist)."""
    if per_group < 1:
        raise AnnotateError(f"per_group must be at least 1, got {per_group}")
    tasks = []
    for name, images in sorted(groups.items()):
        images = sorted(images)
        total = len(images) * (len(images) - 1) // 2
        if total == 0:
            continue
        rng = random.Random(f"{seed}/{name}")
        chosen = sorted(rng.sample(range(total), min(per_group, total)))
        for index in chosen:
            i, j = _pair_at(index, len(images))
            a, b = images[i], images[j]
            key_a = relative_path(a, root) if root else str(a)
            key_b = relative_path(b, root) if root else str(b)
            tasks.append(PairTask(pair_id(key_a, key_b), a, b, {"group": name}))
    if not tasks:
        raise AnnotateError("no group has two images: a pair needs two images of one group")
    return tasks


# ---- nearest neighbours ----------------------------------------------------------------------------------

def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def nearest(vectors: np.ndarray, k: int, metric: str = "ip", index: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows of each row: (scores [N,k], indices [N,k]; -1 where fewer exist).
    ``metric``: ip (inner product, larger is nearer) or l2 (squared distance, smaller is nearer).
    ``index``: auto, flat (exact) or hnsw (approximate, FAISS)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if index not in ("auto", "flat", "hnsw"):
        raise AnnotateError(f"index {index!r}: use auto, flat or hnsw")
    faiss = _faiss()
    if index == "auto":
        index = "flat" if n <= EXACT_SEARCH_LIMIT else "hnsw"
        if index == "hnsw" and faiss is None:
            log.warning("%d images and no FAISS: exact search with NumPy (slow; pip install faiss-cpu)", n)
            index = "flat"
    width = min(k + 1, n)
    if index == "hnsw":
        if faiss is None:
            raise AnnotateError("index hnsw needs FAISS: pip install faiss-cpu (or use index flat)")
        built = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)
        built.hnsw.efConstruction = 80
        built.add(vectors)
        built.hnsw.efSearch = max(64, 2 * width)
        scores, indices = built.search(vectors, width)
    elif faiss is not None:
        built = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        built.add(vectors)
        scores, indices = built.search(vectors, width)
    else:
        scores, indices = _numpy_search(vectors, width, metric)
    out_scores = np.full((n, k), -np.inf if metric == "ip" else np.inf, dtype=np.float32)
    out_indices = np.full((n, k), -1, dtype=np.int64)
    for row in range(n):
        keep = [(s, i) for s, i in zip(scores[row], indices[row]) if i != row and i >= 0][:k]
        for col, (s, i) in enumerate(keep):
            out_scores[row, col], out_indices[row, col] = s, i
    return out_scores, out_indices


def _numpy_search(vectors: np.ndarray, width: int, metric: str, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    n = len(vectors)
    scores = np.empty((n, width), dtype=np.float32)
    indices = np.empty((n, width), dtype=np.int64)
    norms = (vectors ** 2).sum(1)
    for start in range(0, n, block):
        chunk = vectors[start:start + block]
        sims = chunk @ vectors.T
        values = sims if metric == "ip" else -(norms[start:start + block, None] - 2 * sims + norms[None, :])
        order = np.argsort(-values, axis=1, kind="stable")[:, :width]
        indices[start:start + block] = order
        picked = np.take_along_axis(values, order, axis=1)
        scores[start:start + block] = picked if metric == "ip" else -picked
    return scores, indices


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.isfinite(vectors).all() or (norms == 0).any():
        raise AnnotateError("some embeddings are zero, NaN or infinite: recompute them")
    return vectors / norms


def neighbour_pairs(images: list[Path], vectors: np.ndarray, k: int, min_similarity: float = -1.0,
                    max_similarity: float = 0.98, index: str = "auto", root: Path | None = None) -> list[PairTask]:
    """Each image with its ``k`` most similar (cosine) images, each unordered pair once; pairs above
    ``max_similarity`` (near-identical) or below ``min_similarity`` are left out."""
    if len(images) != len(vectors):
        raise AnnotateError(f"{len(vectors)} embeddings for {len(images)} images: they must correspond row by row")
    if len(images) < 2:
        raise AnnotateError("nearest-neighbour pairs need at least two images")
    if k < 1:
        raise AnnotateError(f"neighbours must be at least 1, got {k}")
    scores, indices = nearest(normalise(vectors), k, "ip", index)
    found: dict[tuple[int, int], float] = {}
    for i in range(len(images)):
        for score, j in zip(scores[i], indices[i]):
            if j < 0 or not min_similarity <= score < max_similarity:
                continue
            key = (min(i, int(j)), max(i, int(j)))
            found.setdefault(key, float(score))
    tasks = []
    for (i, j), score in sorted(found.items()):
        a, b = images[i], images[j]
        key_a = relative_path(a, root) if root else str(a)
        key_b = relative_path(b, root) if root else str(b)
        tasks.append(PairTask(pair_id(key_a, key_b), a, b, {"similarity": round(score, 6)}))
    if not tasks:
        raise AnnotateError(f"no neighbour pair has a similarity in [{min_similarity}, {max_similarity}): "
                            "loosen --min-similarity / --max-similarity")
    return tasks


def load_embeddings(npy: str | Path, count: int) -> np.ndarray:
    path = Path(npy)
    if not path.is_file():
        raise AnnotateError(f"embeddings file {str(path)!r} does not exist: save your embeddings with numpy.save, "
                            "or embed with --encoder-backbone and --encoder-adapter")
    try:
        vectors = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise AnnotateError(f"{path.name} is not a plain .npy array ({exc}): save it with numpy.save") from exc
    if vectors.ndim != 2 or len(vectors) != count:
        raise AnnotateError(f"{path.name} has shape {list(vectors.shape)}; expected [{count}, dim]: one row per image, "
                            "in the order of the image list (sorted paths, or --embedding-paths)")
    return vectors


def encoder_embeddings(images: list[Path], backbone: str | Path, adapter: str | Path, attribute: str = "the whole image",
                       device: str = "cpu", dtype: str = "fp32", progress: bool = True) -> np.ndarray:
    """Pooled embeddings of each image from this project's encoder under one (holistic) instruction."""
    import torch
    from tqdm.auto import tqdm

    from ..encoder import load_encoder
    from ..images import pil_to_tensor

    encoder = load_encoder(backbone, adapter, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, device=device)
    rows = []
    for path in tqdm(images, desc="embedding", unit="image", disable=not progress):
        pixels = pil_to_tensor(load_image(path)).permute(1, 2, 0)[None]   # [1,H,W,3] like a ComfyUI IMAGE
        rows.append(encoder.encode(pixels, [[attribute]]).pooled[0].float().numpy())
    return np.stack(rows)


# ---- deduplication ---------------------------------------------------------------------------------------

def thumbnails(paths: list[Path], side: int = 16) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(load_image(p).resize((side, side), Image.BOX), dtype=np.float32).reshape(-1) / 255.0
                     for p in paths])


def near_duplicate_clusters(paths: list[Path], rms: float, index: str = "auto", neighbours: int = 8) -> list[int]:
    """A cluster number per image: images whose thumbnails are within ``rms`` (RMS difference in [0,1]) share one."""
    if rms <= 0 or len(paths) < 2:
        return list(range(len(paths)))
    thumbs = thumbnails(paths)
    limit = thumbs.shape[1] * rms * rms           # squared L2 distance of that RMS difference
    distances, indices = nearest(thumbs, min(neighbours, len(paths) - 1), "l2", index)
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i in range(len(paths)):
        for distance, j in zip(distances[i], indices[i]):
            if j >= 0 and distance <= limit:
                a, b = root(i), root(int(j))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(paths))]


def deduplicate(tasks: list[PairTask], near_duplicate_rms: float = 0.01, index: str = "auto") -> tuple[list[PairTask], dict]:
    """Drop pairs of near-identical images and pairs near-identical to an earlier one (order kept)."""
    paths = sorted({p for t in tasks for p in (t.image_a, t.image_b)})
    cluster = dict(zip(paths, near_duplicate_clusters(paths, near_duplicate_rms, index)))
    kept, seen, dropped = [], set(), {"near-identical images": 0, "near-identical to an earlier pair": 0}
    for task in tasks:
        a, b = cluster[task.image_a], cluster[task.image_b]
        if a == b:
            dropped["near-identical images"] += 1
            continue
        key = (min(a, b), max(a, b))
        if key in seen:
            dropped["near-identical to an earlier pair"] += 1
            continue
        seen.add(key)
        kept.append(task)
    return kept, {k: v for k, v in dropped.items() if v}


def check_images(tasks: list[PairTask], limit: int = 20) -> None:
    missing = [f"{t.id}: {p}" for t in tasks for p in (t.image_a, t.image_b) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - limit} more)" if len(missing) > limit else ""
        raise AnnotateError("missing image files:\n  " + "\n  ".join(missing[:limit]) + more)


def write_pair_list(tasks: list[PairTask], path: str | Path) -> Path:
    """The pairs to annotate as JSONL (paths relative to its folder): the input of ``omni-attribute-annotate run``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent
    lines = [json.dumps({"id": t.id, "image_a": relative_path(t.image_a, folder), "image_b": relative_path(t.image_b, folder),
                         **t.extra}) for t in tasks]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
