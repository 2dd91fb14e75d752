"""One gallery of a million templates: the shipped HNSW index against an exact scan and against
face_recognition's face_distance, then the same gallery split into shards (issue 12, benchmarks 1-2).

SYNTHETIC VECTORS: seeded clustered unit vectors (several "photos" of fewer "people"), the stand-in
for embeddings at a size no labelled face set reaches. They measure the index, not face recognition.

    .venv/bin/python bench/index_1m.py --n 1000000 --dim 128 --shards 1 2 4

Prints, for the single index: build seconds, bytes per template, query p50/p95 at k, recall@k against
the exact scan, how often a probe's true mate gets the same rank as in the exact scan, and the
per-query time of the exact scan (numpy matrix-vector product + top-k) and of face_distance (the
Euclidean distance to every gallery vector, as face_recognition computes it; the package itself is
used when it is installed). Then, per shard count: per-shard build, query latency (shards searched one
after another, and the slowest shard: the latency when shards run in parallel on their own cores),
recall@k, and how often the merged shard answers equal the single index's answer exactly.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from core.config import Settings
from workers.gallery import GalleryIndex
from workers.shards import merge, shard_of


def clustered(n: int, dim: int, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    centres = rng.standard_normal((max(1, n // 4), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 200_000
    for i in range(0, n, step):
        m = min(step, n - i)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, dim)).astype(np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def face_distance_fn():
    try:
        from face_recognition import face_distance  # type: ignore[import-not-found]

        return face_distance, "face_recognition.face_distance"
    except Exception:  # not installed here (it needs dlib built from source): its one line, verbatim in effect

        def face_distance(face_encodings: np.ndarray, face_to_compare: np.ndarray) -> np.ndarray:
            return np.linalg.norm(face_encodings - face_to_compare, axis=1)

        return face_distance, "face_distance as face_recognition computes it (np.linalg.norm over the gallery)"


def build(vectors: np.ndarray, ids: np.ndarray, s: Settings, ef: int) -> tuple[GalleryIndex, float]:
    idx = GalleryIndex(
        vectors.shape[1], m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=ef, capacity=len(ids)
    )
    t0 = time.perf_counter()
    step = 100_000
    for i in range(0, len(ids), step):
        idx.add(ids[i : i + step].tolist(), [str(j) for j in ids[i : i + step]], vectors[i : i + step])
    return idx, time.perf_counter() - t0


def exact_top(g: np.ndarray, v: np.ndarray, k: int) -> np.ndarray:
    sims = g @ v
    part = np.argpartition(-sims, k)[:k]
    return part[np.argsort(-sims[part], kind="stable")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=250)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--shards", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    s = Settings()
    ef = s.hnsw_ef_search
    rng = np.random.default_rng(args.seed)
    print(
        f"# index_1m: {platform.machine()} python {platform.python_version()}; n={args.n} dim={args.dim} k={args.k} "
        f"queries={args.queries}; M={s.hnsw_m} ef_construction={s.hnsw_ef_construction} ef_search={ef}; "
        "SYNTHETIC clustered vectors",
        flush=True,
    )
    t0 = time.perf_counter()
    g = clustered(args.n, args.dim, rng)
    ids = np.arange(args.n)
    src = rng.integers(0, args.n, args.queries)  # each query is a noisy second photo of one gallery item
    q = g[src] + 0.25 * rng.standard_normal((args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"# data generated in {time.perf_counter() - t0:.1f} s", flush=True)

    # Exact scan and face_distance: the references.
    exact, t_exact = [], []
    for v in q:
        t = time.perf_counter()
        exact.append(exact_top(g, v, args.k))
        t_exact.append((time.perf_counter() - t) * 1000)
    fd, fd_name = face_distance_fn()
    t_fd = []
    for v in q[: min(50, len(q))]:
        t = time.perf_counter()
        d = fd(g, v)
        np.argpartition(d, args.k)[: args.k]
        t_fd.append((time.perf_counter() - t) * 1000)

    idx, build_s = build(g, ids, s, ef)
    data, _ = idx.to_bytes()
    lat, recall, same_rank = [], 0, 0
    single_answers = []
    for v, truth, j in zip(q, exact, src, strict=True):
        t = time.perf_counter()
        hits = idx.search(v, args.k)
        lat.append((time.perf_counter() - t) * 1000)
        got = [int(h.subject_id) for h in hits]
        single_answers.append(got)
        recall += len(set(truth.tolist()) & set(got))
        rank_exact = int(np.where(truth == j)[0][0]) if j in truth else None
        rank_hnsw = got.index(int(j)) if int(j) in got else None
        same_rank += rank_exact == rank_hnsw
    p50, p95 = np.median(lat), np.percentile(lat, 95)
    print(
        f"single index: build {build_s:.0f} s; {len(data) / args.n:.0f} bytes/template (index file); "
        f"query p50 {p50:.2f} ms p95 {p95:.2f} ms; recall@{args.k} {recall / (args.k * len(q)):.4f}; "
        f"mate rank as exact {same_rank / len(q):.4f}",
        flush=True,
    )
    print(
        f"exact scan (numpy): {np.median(t_exact):.1f} ms/query median ({np.median(t_exact) / p50:.0f}x the index); "
        f"{fd_name}: {np.median(t_fd):.1f} ms/query median ({np.median(t_fd) / p50:.0f}x the index)",
        flush=True,
    )
    del data

    for shards in args.shards:
        which = np.array([shard_of(str(i), shards) for i in ids])
        parts, builds = [], []
        for sh in range(shards):
            mine = np.nonzero(which == sh)[0]
            part, b = build(g[mine], mine, s, ef)
            parts.append(part)
            builds.append(b)
        seq, par, rec, equal = [], [], 0, 0
        for v, truth, single in zip(q, exact, single_answers, strict=True):
            per = []
            answers = []
            for part in parts:
                t = time.perf_counter()
                answers.append(part.search(v, args.k))
                per.append((time.perf_counter() - t) * 1000)
            merged = [int(h.subject_id) for h in merge(answers, args.k)]
            seq.append(sum(per))
            par.append(max(per))
            rec += len(set(truth.tolist()) & set(merged))
            equal += merged == single
        print(
            f"{shards} shards: build {max(builds):.0f} s per shard in parallel ({sum(builds):.0f} s in all); "
            f"query p50 {np.median(par):.2f} ms with shards in parallel, {np.median(seq):.2f} ms one after another; "
            f"recall@{args.k} {rec / (args.k * len(q)):.4f}; merged list == single index {equal / len(q):.3f}",
            flush=True,
        )
        del parts


if __name__ == "__main__":
    main()
