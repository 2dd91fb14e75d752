"""Gallery index at scale: build time, query latency and recall@K of the HNSW index Quorum ships
(same GalleryIndex class and default parameters), against exact brute force.

SYNTHETIC VECTORS: the gallery here is seeded random unit vectors with a cluster structure (a
stand-in for face embeddings at sizes no labelled face set reaches); they measure the index, not face
recognition accuracy. Run:

    .venv/bin/python bench/index_scale.py --sizes 10000 100000 --dim 128 --k 250

Prints one row per size: build seconds, memory of the index file, median and p95 query latency,
recall@K against brute force.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from quorum.core.config import Settings
from quorum.workers.index import GalleryIndex


def clustered(n: int, dim: int, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around n/4 random centres: like several photos of fewer people."""
    centres = rng.standard_normal((max(1, n // 4), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=250)
    ap.add_argument("--ef", type=int, nargs="+", default=None, help="ef_search values to compare (default: shipped)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    s = Settings()
    efs = args.ef or [s.hnsw_ef_search]
    print(
        f"# index_scale: {platform.machine()} python {platform.python_version()}; M={s.hnsw_m} "
        f"ef_construction={s.hnsw_ef_construction}; k={args.k}; SYNTHETIC clustered vectors"
    )
    print(
        "# recall@10 / recall@K: overlap with exact brute-force top lists; mate@K: a noisy copy of a gallery"
        " item (a 'second photo') finds that item in its top K"
    )
    print(
        f"{'size':>9} {'dim':>4} {'build_s':>8} {'index_MB':>9} {'ef':>5} {'q_med_ms':>9} {'q_p95_ms':>9} "
        f"{'recall@10':>9} {'recall@K':>9} {'mate@K':>7}"
    )
    for n in args.sizes:
        rng = np.random.default_rng(args.seed)
        g = clustered(n, args.dim, rng)
        q = clustered(args.queries, args.dim, rng)
        src = rng.integers(0, n, args.queries)
        mates = g[src] + 0.25 * rng.standard_normal((args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim)
        mates /= np.linalg.norm(mates, axis=1, keepdims=True)
        idx = GalleryIndex(args.dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=efs[0], capacity=n)
        t0 = time.perf_counter()
        step = 50_000
        for i in range(0, n, step):
            idx.add(list(range(i, min(n, i + step))), [str(j) for j in range(i, min(n, i + step))], g[i : i + step])
        build = time.perf_counter() - t0
        data, _ = idx.to_bytes()
        truths = [np.argsort(-(g @ v))[: args.k].astype(str) for v in q]
        for ef in efs:
            idx.ef_search = ef
            lat, hit, hit10 = [], 0, 0
            for v, truth in zip(q, truths, strict=True):
                t = time.perf_counter()
                got = idx.search(v, args.k)
                lat.append((time.perf_counter() - t) * 1000)
                ids = [h.subject_id for h in got]
                hit += len(set(truth) & set(ids))
                hit10 += len(set(truth[:10]) & set(ids[:10]))
            mate = np.mean(
                [str(j) in {h.subject_id for h in idx.search(v, args.k)} for v, j in zip(mates, src, strict=False)]
            )
            print(
                f"{n:>9} {args.dim:>4} {build:>8.1f} {len(data) / 2**20:>9.1f} {ef:>5} {np.median(lat):>9.2f} "
                f"{np.percentile(lat, 95):>9.2f} {hit10 / (10 * len(q)):>9.4f} {hit / (args.k * len(q)):>9.4f} "
                f"{mate:>7.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
