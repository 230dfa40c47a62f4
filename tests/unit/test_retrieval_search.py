"""Exact and FAISS search (omni_attribute.retrieval.search) against brute force, on clustered vectors."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.retrieval import clustered_vectors
from omni_attribute.retrieval.search import (AnnSettings, ArraySource, ExactSearcher, FaissSearcher, SearchError,
                                             pick_kind, recall_at_k, unit)


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = unit(queries) @ unit(vectors).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def clustered():
    """20 000 fp16 vectors of width 256 in 80 clusters, and 50 fresh queries from the same clusters."""
    vectors = np.concatenate(list(clustered_vectors(20_000, 256, seed=3, latent=32, clusters=80)))
    queries = np.concatenate(list(clustered_vectors(50, 256, seed=3, latent=32, clusters=80, draws=1)))
    return vectors, queries.astype(np.float32)


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0], ids=["in-memory", "streamed"])
def test_exact_search_is_brute_force(cache_bytes):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1000, 24)).astype(np.float16)
    queries = rng.standard_normal((7, 24)).astype(np.float32)
    scores, rows = ExactSearcher(ArraySource(vectors), cache_bytes=cache_bytes, chunk_rows=128).search(queries, 5)
    assert np.array_equal(rows, brute_force(vectors, queries, 5))
    expected = np.take_along_axis(unit(queries) @ unit(vectors).T, rows, 1)
    assert np.allclose(scores, expected, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_exact_search_leaves_out_excluded_rows():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 8)).astype(np.float16)
    _, rows = ExactSearcher(ArraySource(vectors)).search(vectors[:3].astype(np.float32), 4,
                                                         exclude=[{0}, {1}, {2, 5}])
    assert rows[0][0] != 0 and 1 not in rows[1] and not {2, 5} & set(rows[2])
    assert rows.shape == (3, 4) and (rows >= 0).all()


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw", "ivf"])
def test_faiss_search_recalls_the_exact_neighbours(clustered, kind, tmp_path):
    vectors, queries = clustered
    source = ArraySource(vectors)
    truth = brute_force(vectors, queries, 10)
    settings = AnnSettings(kind=kind, pca=64, nlist=64, pq_bytes=8, nprobe=16, rerank=200, train_rows=5000)
    searcher = FaissSearcher.build(source, settings)
    scores, rows = searcher.search(queries, 10)
    recall = recall_at_k(rows, truth, 10)
    print(kind, "recall@10", recall)
    assert recall >= 0.95, recall
    # scores are exact cosines of the returned rows (re-ranked on the stored vectors)
    assert np.allclose(scores, np.take_along_axis(unit(queries) @ unit(vectors).T, rows, 1), atol=1e-5)
    searcher.save(tmp_path / "ann.faiss")
    again = FaissSearcher.load(source, tmp_path / "ann.faiss", searcher.settings)
    assert np.array_equal(again.search(queries, 10)[1], rows)


def test_without_reranking_pq_alone_misses_neighbours(clustered):
    """The re-ranking is what makes PQ's recall: candidates = k, ranked by compressed distances only."""
    vectors, queries = clustered
    truth = brute_force(vectors, queries, 10)
    searcher = FaissSearcher.build(ArraySource(vectors), AnnSettings(kind="ivfpq", pca=64, nlist=64, pq_bytes=4,
                                                                     nprobe=12, rerank=10, train_rows=5000))
    recall = recall_at_k(searcher.search(queries, 10)[1], truth, 10)
    print("PQ4 without re-ranking: recall@10", recall)
    assert recall < 0.9, recall


def test_auto_kind_and_refusals(tmp_path):
    assert pick_kind(10_000, 4096) == "exact" and pick_kind(1_000_000, 4096) == "ivfpq"
    assert pick_kind(500, 10 ** 6) == "exact"
    tiny = ArraySource(np.ones((100, 8), np.float16))
    with pytest.raises(SearchError, match="too few for 256 IVF lists"):
        FaissSearcher.build(tiny, AnnSettings(kind="ivfpq", nlist=256))
    with pytest.raises(SearchError, match="100 vectors are too few to learn PQ codes from"):
        FaissSearcher.build(tiny, AnnSettings(kind="ivfpq", nlist=4))
    with pytest.raises(SearchError, match="unknown index kind 'annoy'"):
        FaissSearcher.build(tiny, AnnSettings(kind="annoy"))
    (tmp_path / "bad.faiss").write_bytes(b"junk")
    with pytest.raises(SearchError, match="cannot read the search index .*rebuild it"):
        FaissSearcher.load(tiny, tmp_path / "bad.faiss", AnnSettings())
