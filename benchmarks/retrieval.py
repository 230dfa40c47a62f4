"""Attribute retrieval at scale: query latency and recall@10 of the index's FAISS search against exact search, on
synthetic pooled vectors of FLUX's width (4096), 1 M rows by default.

    .venv/bin/python benchmarks/retrieval.py                  # 1 M × 4096 (8 GB of fp16 vectors on disk)
    .venv/bin/python benchmarks/retrieval.py --rows 100000    # a quick look

The vectors (why uniform random vectors would not do: in 4096 dimensions all their distances are nearly equal,
so "nearest" means nothing and any ANN scores near-random recall):

* a 64-dimensional latent space holds C = rows/250 cluster centres ~ N(0, I) with log-normal cluster sizes
  (σ = 1, so a few clusters are large and many small);
* a vector is its centre plus within-cluster variation spread·N(0, I) in the latent space, lifted to 4096
  dimensions by a fixed random orthonormal basis, plus isotropic noise in all 4096 dimensions whose energy is
  ``noise_ratio`` (default 0.25) of the within-cluster variation's;
* stored as fp16, like the index stores pooled vectors; queries are fresh draws from the same distribution.

The searched structure is the one ``omni-attribute-index build --ann ivfpq`` makes (``FaissSearcher``):
PCA to 256 dims with a random rotation, IVF with 2048 lists, PQ with 64-byte codes (all learnt from 100 k rows),
L2 on unit vectors, then the
top ``rerank`` candidates re-ranked by exact cosine on the fp16 vectors, memory-mapped from disk. Latency is one
query at a time (the encoder's pass for a query image is not included), wall-clock, with ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omni_attribute.retrieval.search import AnnSettings, ArraySource, ExactSearcher, FaissSearcher, recall_at_k  # noqa: E402


def clustered_vectors(rows: int, width: int, seed: int = 0, latent: int = 64, per_cluster: int = 250,
                      spread: float = 0.35, noise_ratio: float = 0.25, chunk: int = 20000, draws: int = 0,
                      clusters: int = 0):
    """Yield fp16 chunks [n, width] of the synthetic vectors described in the module docstring. ``seed`` fixes the
    world (centres, cluster sizes, basis), ``draws`` the samples: other ``draws``, same world (e.g. queries)."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(2, rows // per_cluster)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32)
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    basis, _ = np.linalg.qr(rng.standard_normal((width, latent)).astype(np.float32))  # [width, latent], orthonormal
    basis = basis.T.copy()
    sigma = np.sqrt(noise_ratio * latent * spread ** 2 / width)
    rng = np.random.default_rng([seed, draws])
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        which = rng.choice(clusters, size=n, p=weights)
        z = centres[which] + spread * rng.standard_normal((n, latent), dtype=np.float32)
        x = z @ basis
        x += sigma * rng.standard_normal((n, width), dtype=np.float32)
        yield x.astype(np.float16)


def vectors_file(cache: Path, rows: int, width: int, seed: int, noise_ratio: float) -> np.memmap:
    path = cache / f"clustered-{rows}x{width}-seed{seed}-noise{noise_ratio}.f16"
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        started = time.time()
        out = np.memmap(tmp, dtype=np.float16, mode="w+", shape=(rows, width))
        at = 0
        for block in clustered_vectors(rows, width, seed, noise_ratio=noise_ratio):
            out[at:at + len(block)] = block
            at += len(block)
            print(f"\r[bench] generating vectors {at}/{rows}", end="", flush=True)
        out.flush()
        del out
        os.replace(tmp, path)
        print(f"\n[bench] generated {path} in {time.time() - started:.0f} s")
    return np.memmap(path, dtype=np.float16, mode="r", shape=(rows, width))


def latency(searcher, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[float]]:
    found, times = [], []
    for q in queries:
        started = time.perf_counter()
        _, rows = searcher.search(q[None], k)
        times.append((time.perf_counter() - started) * 1000)
        found.append(rows[0])
    return np.stack(found), times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--noise-ratio", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 48, 64])
    p.add_argument("--rerank", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--nlist", type=int, default=2048, help="IVF lists (default %(default)s)")
    p.add_argument("--pca", type=int, default=256)
    p.add_argument("--pq-bytes", type=int, default=64)
    p.add_argument("--train-rows", type=int, default=100_000, help="rows the PCA, k-means and PQ learn from")
    p.add_argument("--cache", type=Path, default=Path(os.environ.get("OMNI_ATTRIBUTE_CACHE",
                                                                     Path.home() / ".cache" / "omni-attribute"))
                   / "bench-retrieval")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    vectors = vectors_file(args.cache, args.rows, args.width, 0, args.noise_ratio)
    source = ArraySource(vectors)
    # fresh draws from the same clusters (same world seed, other draws)
    queries = np.concatenate(list(clustered_vectors(args.queries, args.width, seed=0, noise_ratio=args.noise_ratio,
                                                    chunk=args.queries, draws=1,
                                                    clusters=max(2, args.rows // 250)))).astype(np.float32)

    started = time.time()
    exact = ExactSearcher(source, cache_bytes=0, chunk_rows=32768)
    truth_scores, truth = exact.search(queries, args.k)
    exact_batch_s = time.time() - started
    started = time.perf_counter()
    exact.search(queries[:1], args.k)
    exact_single_ms = (time.perf_counter() - started) * 1000
    print(f"[bench] exact search: {args.queries} queries in one scan {exact_batch_s:.1f} s; one query alone "
          f"{exact_single_ms:.0f} ms")

    settings = AnnSettings(kind="ivfpq", pca=args.pca, nlist=args.nlist, pq_bytes=args.pq_bytes,
                           train_rows=min(args.rows, args.train_rows))
    started = time.time()
    last = [0.0]

    def progress(done, total):
        if time.time() - last[0] > 10 or done == total:
            last[0] = time.time()
            print(f"[bench] adding {done}/{total}", flush=True)

    ann = FaissSearcher.build(source, settings, progress=progress)
    build_s = time.time() - started
    index_file = args.cache / "ivfpq.faiss"
    ann.save(index_file)
    index_mb = index_file.stat().st_size / 1e6
    index_file.unlink()
    print(f"[bench] built {ann.settings.factory(args.width)} in {build_s:.0f} s (training "
          f"{ann.settings.extra.get('train_seconds')} s on {ann.settings.train_rows} rows); index {index_mb:.0f} MB")

    rows = []
    for nprobe in args.nprobe:
        for rerank in args.rerank:
            ann.settings.nprobe, ann.settings.rerank = nprobe, rerank
            ann.apply_search_settings()
            latency(ann, queries[:5], args.k)  # warm up
            found, times = latency(ann, queries, args.k)
            row = {"nprobe": nprobe, "rerank": rerank, "recall@10": recall_at_k(found, truth, args.k),
                   "p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                   "mean_ms": float(np.mean(times))}
            rows.append(row)
            print(f"[bench] nprobe {nprobe:3d} rerank {rerank:4d}: recall@10 {row['recall@10']:.3f}, "
                  f"p50 {row['p50_ms']:.1f} ms, p95 {row['p95_ms']:.1f} ms", flush=True)
    result = {"rows": args.rows, "width": args.width, "queries": args.queries, "noise_ratio": args.noise_ratio,
              "threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "factory": ann.settings.factory(args.width),
              "build_seconds": round(build_s, 1), "train_seconds": ann.settings.extra.get("train_seconds"),
              "index_mb": round(index_mb, 1), "exact_batch_seconds": round(exact_batch_s, 1),
              "exact_single_ms": round(exact_single_ms, 1), "load_average_at_end": os.getloadavg(), "sweep": rows}
    print(f"[bench] load average (1, 5, 15 min) at the end: {os.getloadavg()} on {os.cpu_count()} cores")
    print("\n| nprobe | rerank | recall@10 | p50 ms | p95 ms |\n| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['nprobe']} | {r['rerank']} | {r['recall@10']:.3f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
