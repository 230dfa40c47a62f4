"""Nearest neighbours by cosine similarity: exact (small sets) or FAISS (large ones), always re-ranked exactly.

Vectors come from a ``VectorSource``: rows of fp16 vectors, possibly memory-mapped from the index's safetensors
shards (never all converted to float32 at once). Cosine is computed on L2-normalised float32 copies.

Approximate kinds (faiss-cpu), all searched in L2 on unit vectors (the same order as cosine) and then re-ranked
with exact cosine on the stored vectors:

* ``ivfpq``  — ``PCAR{p},IVF{nlist},PQ{m}``: a PCA to ``p`` dims with a random rotation (spreads the variance over
  the PQ sub-vectors), an inverted file of ``nlist`` lists of which ``nprobe`` are scanned, product-quantised codes
  of ``m`` bytes. 1 M vectors of width 4096: ~64 MB of codes instead of 8 GB (the fp16 vectors stay on disk,
  memory-mapped, for the re-ranking).
* ``hnsw``   — a graph (``HNSW{M}``), on PCA-reduced vectors when the width is over ``p``.
* ``ivf``    — ``IVF{nlist},Flat`` (exact distances within the scanned lists).
* ``exact``  — a full scan; the default below ``EXACT_LIMIT`` stored numbers (rows × width).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from ..errors import OmniAttributeError

EXACT_LIMIT = 200_000_000       # rows × width below which 'auto' scans everything (50 k vectors of width 4096)
CACHE_LIMIT_BYTES = 1 << 30     # exact search keeps a normalised fp16 copy in memory up to this size
KINDS = ("auto", "exact", "ivfpq", "hnsw", "ivf")
MIN_PQ_ROWS = 1000              # PQ learns 256 centroids per sub-vector


class SearchError(OmniAttributeError):
    """A search index cannot be built, loaded or used as asked."""


class VectorSource(Protocol):
    width: int

    def __len__(self) -> int: ...
    def gather(self, rows: np.ndarray) -> np.ndarray: ...
    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]: ...


class ArraySource:
    """An [N, D] array (numpy, possibly a memmap) as a vector source."""

    def __init__(self, array: np.ndarray):
        if array.ndim != 2:
            raise SearchError(f"vectors must be [rows, width], got shape {array.shape}")
        self.array = array
        self.width = int(array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        order = np.argsort(rows)  # sorted reads are kinder to a memmap
        out = np.empty((len(rows), self.width), dtype=self.array.dtype)
        out[order] = self.array[rows[order]]
        return out

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), size):
            yield start, np.asarray(self.array[start:start + size])


def unit(x: np.ndarray) -> np.ndarray:
    """Rows as float32 unit vectors (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the k largest scores, best first: (scores [Q,k], columns [Q,k])."""
    k = min(k, scores.shape[1])
    if k == 0:
        return np.zeros((scores.shape[0], 0), np.float32), np.zeros((scores.shape[0], 0), np.int64)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1))
    picked = np.take_along_axis(scores, part, 1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(picked, order, 1), np.take_along_axis(part, order, 1)


def _merge(best_s, best_i, scores, offset, k):
    s, i = _top_k(scores, k)
    all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + offset], 1)
    order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_s, order, 1), np.take_along_axis(all_i, order, 1)


def _exclusion_mask(rows: np.ndarray, exclude: list[set[int]] | None, qi: int) -> np.ndarray | None:
    if not exclude or not exclude[qi]:
        return None
    return np.isin(rows, list(exclude[qi]))


class ExactSearcher:
    """A full scan. Keeps a normalised float32 copy when it fits ``cache_bytes`` (fp16 when only that fits), else
    streams the source."""

    kind = "exact"

    def __init__(self, source: VectorSource, cache_bytes: int = CACHE_LIMIT_BYTES, chunk_rows: int = 16384):
        self.source, self.chunk_rows = source, chunk_rows
        self.cache = None
        numbers = len(source) * source.width
        dtype = np.float32 if numbers * 4 <= cache_bytes else np.float16 if numbers * 2 <= cache_bytes else None
        if dtype is not None:
            parts = [unit(c).astype(dtype, copy=False) for _, c in source.chunks(chunk_rows)]
            self.cache = np.concatenate(parts) if parts else np.zeros((0, source.width), dtype)

    def search(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        q = unit(np.atleast_2d(queries))
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        want = min(k + extra, len(self.source))
        best_s = np.full((len(q), 0), -np.inf, np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        chunks = ((s, self.cache[s:s + self.chunk_rows]) for s in range(0, len(self.cache), self.chunk_rows)) \
            if self.cache is not None else ((s, unit(c)) for s, c in self.source.chunks(self.chunk_rows))
        for start, block in chunks:
            scores = q @ block.astype(np.float32, copy=False).T
            best_s, best_i = _merge(best_s, best_i, scores, start, want)
        return _drop_excluded(best_s, best_i, exclude, k)


def _drop_excluded(scores, rows, exclude, k):
    if not exclude:
        return scores[:, :k], rows[:, :k]
    out_s = np.full((len(rows), k), -np.inf, np.float32)
    out_i = np.full((len(rows), k), -1, np.int64)
    for qi in range(len(rows)):
        mask = _exclusion_mask(rows[qi], exclude, qi)
        keep = ~mask if mask is not None else np.ones(len(rows[qi]), bool)
        s, i = scores[qi][keep][:k], rows[qi][keep][:k]
        out_s[qi, :len(s)], out_i[qi, :len(i)] = s, i
    return out_s, out_i


@dataclass
class AnnSettings:
    """How an approximate index is made and searched; 0 means 'pick from the data size'."""
    kind: str = "ivfpq"
    pca: int = 256            # reduced width (ivfpq always; hnsw when the width is larger)
    nlist: int = 0            # IVF lists
    pq_bytes: int = 0         # PQ code size (bytes per vector)
    hnsw_m: int = 32
    nprobe: int = 48
    ef_search: int = 128
    rerank: int = 256         # candidates re-ranked exactly
    train_rows: int = 0       # rows used to train PCA / k-means / PQ
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def resolved(self, rows: int, width: int) -> "AnnSettings":
        s = AnnSettings(**{**self.__dict__})
        s.pca = min(s.pca, width)
        if s.nlist <= 0:
            s.nlist = int(2 ** round(math.log2(max(16.0, 4 * math.sqrt(rows)))))
            s.nlist = max(1, min(s.nlist, rows // 39 if rows >= 39 * 16 else 16))
        if s.pq_bytes <= 0:
            s.pq_bytes = max(1, s.pca // 4)
        while s.pca % s.pq_bytes:
            s.pq_bytes -= 1
        if s.train_rows <= 0:
            s.train_rows = min(rows, max(64 * s.nlist, 50_000))
        return s

    def factory(self, width: int) -> str:
        reduce = f"PCAR{self.pca}," if self.pca < width else ""
        if self.kind == "ivfpq":
            return f"{reduce}IVF{self.nlist},PQ{self.pq_bytes}"
        if self.kind == "ivf":
            return f"IVF{self.nlist},Flat"
        if self.kind == "hnsw":
            return f"{reduce}HNSW{self.hnsw_m}"
        raise SearchError(f"unknown index kind {self.kind!r}: choose one of {', '.join(KINDS)}")


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise SearchError("approximate search needs faiss: pip install faiss-cpu (or use kind 'exact')") from exc
    return faiss


def pick_kind(rows: int, width: int) -> str:
    return "exact" if rows * width <= EXACT_LIMIT or rows < 1000 else "ivfpq"


class FaissSearcher:
    """A FAISS index over unit vectors; its candidates are re-ranked with exact cosine on the source."""

    def __init__(self, source: VectorSource, index, settings: AnnSettings):
        self.source, self.index, self.settings = source, index, settings
        self.kind = settings.kind
        self.apply_search_settings()

    def apply_search_settings(self) -> None:
        faiss = _faiss()
        space = faiss.ParameterSpace()
        if self.kind in ("ivfpq", "ivf"):
            space.set_index_parameter(self.index, "nprobe", int(self.settings.nprobe))
        elif self.kind == "hnsw":
            space.set_index_parameter(self.index, "efSearch", int(self.settings.ef_search))

    @classmethod
    def build(cls, source: VectorSource, settings: AnnSettings, progress=None, add_chunk: int = 65536
              ) -> "FaissSearcher":
        faiss = _faiss()
        rows, width = len(source), source.width
        if rows < 2:
            raise SearchError(f"an approximate index needs vectors to learn from; this one has {rows}: use 'exact'")
        settings = settings.resolved(rows, width)
        if settings.kind in ("ivfpq", "ivf") and rows < settings.nlist:
            raise SearchError(f"{rows} vectors are too few for {settings.nlist} IVF lists: use 'exact' or a smaller "
                              "nlist")
        if settings.kind == "ivfpq" and min(rows, settings.train_rows) < MIN_PQ_ROWS:
            raise SearchError(f"{rows} vectors are too few to learn PQ codes from (at least {MIN_PQ_ROWS}): use "
                              "'exact' (or 'hnsw')")
        index = faiss.index_factory(width, settings.factory(width), faiss.METRIC_L2)
        rng = np.random.default_rng(settings.seed)
        if not index.is_trained:
            sample = np.sort(rng.choice(rows, size=min(rows, settings.train_rows), replace=False))
            train = unit(source.gather(sample))
            started = time.time()
            try:
                index.train(train)
            except RuntimeError as exc:
                raise SearchError(f"FAISS could not learn {settings.factory(width)} from {len(train)} vectors "
                                  f"({str(exc).strip().splitlines()[-1]}): use 'exact' or other settings") from None
            settings.extra["train_seconds"] = round(time.time() - started, 2)
        done = 0
        for _, chunk in source.chunks(add_chunk):
            index.add(unit(chunk))
            done += len(chunk)
            if progress:
                progress(done, rows)
        return cls(source, index, settings)

    def candidates(self, queries: np.ndarray, count: int) -> np.ndarray:
        _, rows = self.index.search(unit(np.atleast_2d(queries)), count)
        return rows

    def search(self, queries: np.ndarray, k: int, exclude: list[set[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        q = unit(np.atleast_2d(queries))
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        want = min(len(self.source), k + extra)
        count = min(len(self.source), max(self.settings.rerank, want))
        cand = self.candidates(q, count)
        out_s = np.full((len(q), want), -np.inf, np.float32)
        out_i = np.full((len(q), want), -1, np.int64)
        for qi in range(len(q)):
            rows = cand[qi][cand[qi] >= 0]
            if len(rows) == 0:
                continue
            scores = unit(self.source.gather(rows)) @ q[qi]
            order = np.argsort(-scores, kind="stable")[:want]
            out_s[qi, :len(order)], out_i[qi, :len(order)] = scores[order], rows[order]
        return _drop_excluded(out_s, out_i, exclude, k)

    def save(self, path: str | os.PathLike) -> None:
        faiss = _faiss()
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, source: VectorSource, path: str | os.PathLike, settings: AnnSettings) -> "FaissSearcher":
        faiss = _faiss()
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise SearchError(f"cannot read the search index {str(path)!r} ({str(exc).splitlines()[0]}): rebuild it "
                              "(omni-attribute-index build ... --ann ...)") from exc
        if index.ntotal != len(source):
            raise SearchError(f"search index {Path(path).name} holds {index.ntotal} vectors but the index has "
                              f"{len(source)}: it is stale; rebuild it")
        return cls(source, index, settings)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean over queries of |found[:k] ∩ truth[:k]| / k."""
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)
