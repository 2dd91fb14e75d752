"""One gallery of a million templates: the shipped HNSW index against an exact scan and against
face_recognition's face_distance, then the same gallery split into shards (issue 12, benchmarks 1-2).

SYNTHETIC VECTORS, the stand-in for embeddings at a size no labelled face set reaches; they measure the
index, not face recognition. Two generators (``--data``):

* ``isotropic`` (the first recorded figures): unit vectors around n/4 random Gaussian centres (~4 noisy
  copies each); outside its own cluster a query's cosines are pure isotropic noise (~N(0, 1/dim)), the
  worst case for an ANN graph and unlike real templates.
* ``fitted``: sampled from a Gaussian model fitted to REAL templates of the ci faces
  (``bench/fit_templates.py`` -> ``bench/results/fitted-templates.npz``; SFace for 128-d, ArcFace for
  512-d): one "identity" per gallery item drawn from the between-person distribution, the gallery item
  and its probe each that identity plus within-person noise fitted from real same-person differences,
  normalised to unit length. Still synthetic: a Gaussian with the real spectrum, not real faces.

    .venv/bin/python bench/index_1m.py --n 1000000 --dim 128 --data fitted --ef 1000 1500 2500 --shards 2 4

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
from pathlib import Path

import numpy as np

from quorum.core.config import Settings
from quorum.workers.index import GalleryIndex
from quorum.workers.shards import merge, shard_of

FITTED = Path(__file__).parent / "results" / "fitted-templates.npz"
FIT_ENGINE = {128: "sface", 512: "arcface"}


def clustered(n: int, dim: int, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    centres = rng.standard_normal((max(1, n // 4), dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    step = 200_000
    for i in range(0, n, step):
        m = min(step, n - i)
        x = centres[rng.integers(0, len(centres), m)] + spread * rng.standard_normal((m, dim)).astype(np.float32)
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def isotropic_data(
    n: int, dim: int, queries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first recorded generator, draw for draw (same seed, same vectors): gallery, probes, mates."""
    g = clustered(n, dim, rng)
    src = rng.integers(0, n, queries)  # each query is a noisy second photo of one gallery item
    q = g[src] + 0.25 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # float32 like the gallery: the first recorded run left q in float64, so its exact scan (g @ v) converted
    # the whole gallery to float64 on every query (4x slower at 1M, 25x at 200k, than the float32 scan).
    return g, q.astype(np.float32), src


class FittedModel:
    """Gaussian between-person and within-person distributions fitted to real templates of one engine."""

    def __init__(self, mean: np.ndarray, between_vals, between_vecs, within_vals, within_vecs) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.dim = len(self.mean)
        # x = mean + eps @ A.T with eps ~ N(0, I) has covariance U diag(vals) U.T
        self.between = (np.asarray(between_vecs) * np.sqrt(np.clip(between_vals, 0, None))).astype(np.float32).T
        self.within = (np.asarray(within_vecs) * np.sqrt(np.clip(within_vals, 0, None))).astype(np.float32).T

    @classmethod
    def load(cls, path: Path, engine: str) -> FittedModel:
        z = np.load(path)
        f = {k: z[f"{engine}_{k}"] for k in ("mean", "between_vals", "between_vecs", "within_vals", "within_vecs")}
        return cls(**f)

    def identities(self, m: int, rng: np.random.Generator) -> np.ndarray:
        return self.mean + rng.standard_normal((m, self.dim), dtype=np.float32) @ self.between

    def photos(self, identities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = identities + rng.standard_normal(identities.shape, dtype=np.float32) @ self.within
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def fitted_data(
    n: int, queries: int, model: FittedModel, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n identities, one gallery photo each; ``queries`` probes, each another photo of a random gallery identity."""
    src = np.sort(rng.choice(n, size=queries, replace=False))
    g = np.empty((n, model.dim), dtype=np.float32)
    q = np.empty((queries, model.dim), dtype=np.float32)
    step = 100_000
    for i in range(0, n, step):
        people = model.identities(min(step, n - i), rng)
        g[i : i + len(people)] = model.photos(people, rng)
        mine = (src >= i) & (src < i + len(people))
        if mine.any():
            q[mine] = model.photos(people[src[mine] - i], rng)
    order = rng.permutation(queries)
    return g, q[order], src[order]


def describe(g: np.ndarray, q: np.ndarray, src: np.ndarray, rng: np.random.Generator) -> str:
    """Sanity figures of a generated set: mate and non-mate cosines, and the spectrum's effective dimension."""
    mate = np.einsum("ij,ij->i", q, g[src])
    other = g[rng.integers(0, len(g), (2000, 2))]
    non = np.einsum("ij,ij->i", other[:, 0], other[:, 1])
    sample = g[rng.integers(0, len(g), min(len(g), 20_000))]
    ev = np.linalg.eigvalsh(np.cov(sample, rowvar=False))[::-1]
    ev = ev / ev.sum()
    return (
        f"mate cosine median {np.median(mate):.3f} (5% {np.percentile(mate, 5):.3f}); non-mate cosine median "
        f"{np.median(non):.3f} (99.9% {np.percentile(non, 99.9):.3f}); top-10 PCs carry {ev[:10].sum():.2f} of the "
        f"variance; participation dim {1 / (ev**2).sum():.1f} of {g.shape[1]}"
    )


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


def times(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def run_single(
    idx: GalleryIndex, g: np.ndarray, q: np.ndarray, exact: list[np.ndarray], src: np.ndarray, k: int
) -> dict:
    """Each probe searched in the index, then scanned exactly right after it (the same moment's load on a
    shared machine): the speed-up over the exact scan is the ratio of the two medians."""
    lat, lat_exact, recall, same_rank, answers = [], [], 0, 0, []
    for v, truth, j in zip(q, exact, src, strict=True):
        t = time.perf_counter()
        hits = idx.search(v, k)
        lat.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        exact_top(g, v, k)
        lat_exact.append((time.perf_counter() - t) * 1000)
        got = [int(h.subject_id) for h in hits]
        answers.append(got)
        recall += len(set(truth.tolist()) & set(got))
        rank_exact = int(np.where(truth == j)[0][0]) if j in truth else None
        rank_hnsw = got.index(int(j)) if int(j) in got else None
        same_rank += rank_exact == rank_hnsw
    return {
        "p50": float(np.median(lat)),
        "p95": float(np.percentile(lat, 95)),
        "exact": float(np.median(lat_exact)),
        "recall": recall / (k * len(q)),
        "same_rank": same_rank / len(q),
        "answers": answers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--data", choices=["isotropic", "fitted"], default="fitted")
    ap.add_argument("--model", type=Path, default=FITTED, help="fitted model (bench/fit_templates.py)")
    ap.add_argument(
        "--engine", default=None, help="engine of the fitted model (default: sface at 128-d, arcface at 512-d)"
    )
    ap.add_argument("--k", type=int, default=250)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", type=int, nargs="+", default=None, help="ef_search values, side by side (default: shipped)")
    ap.add_argument("--m", type=int, nargs="+", default=None, help="HNSW M values to build (default: shipped)")
    ap.add_argument("--shards", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--shard-ef", type=int, default=None, help="ef_search in the shards (default: shipped)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    s = Settings()
    efs = args.ef or [s.hnsw_ef_search]
    ms = args.m or [s.hnsw_m]
    shard_ef = args.shard_ef or s.hnsw_ef_search
    rng = np.random.default_rng(args.seed)
    what = "SYNTHETIC clustered isotropic vectors"
    if args.data == "fitted":
        engine = args.engine or FIT_ENGINE.get(args.dim)
        if engine is None:
            raise SystemExit(f"no fitted engine for dim {args.dim}: pass --engine")
        model = FittedModel.load(args.model, engine)
        if model.dim != args.dim:
            raise SystemExit(f"{engine}'s fitted model is {model.dim}-d, not {args.dim}")
        what = f"SYNTHETIC vectors from a Gaussian fitted to real {engine} templates ({args.model.name})"
    print(
        f"# index_1m: {platform.machine()} python {platform.python_version()}; n={args.n} dim={args.dim} k={args.k} "
        f"queries={args.queries}; M={ms} ef_construction={s.hnsw_ef_construction} ef_search={efs} "
        f"(shipped: M={s.hnsw_m} ef_search={s.hnsw_ef_search}); {what}",
        flush=True,
    )
    t0 = time.perf_counter()
    if args.data == "isotropic":
        g, q, src = isotropic_data(args.n, args.dim, args.queries, rng)
    else:
        g, q, src = fitted_data(args.n, args.queries, model, rng)
    assert g.dtype == np.float32 and np.isfinite(g).all() and np.isfinite(q).all()
    assert np.allclose(np.linalg.norm(g[:1000], axis=1), 1, atol=1e-4) and np.allclose(
        np.linalg.norm(q, axis=1), 1, atol=1e-4
    )
    ids = np.arange(args.n)
    print(
        f"# data generated in {time.perf_counter() - t0:.1f} s; {describe(g, q, src, np.random.default_rng(0))}",
        flush=True,
    )
    if args.data == "fitted":
        z = np.load(args.model)
        print(
            f"# real {engine} templates of the ci set: same-person cosine "
            f"median {np.median(z[f'{engine}_real_same_cos']):.3f} "
            f"(5% {np.percentile(z[f'{engine}_real_same_cos'], 5):.3f}), different-person median "
            f"{np.median(z[f'{engine}_real_diff_cos']):.3f} (99.9% "
            f"{np.percentile(z[f'{engine}_real_diff_cos'], 99.9):.3f})",
            flush=True,
        )

    # Exact scan and face_distance: the references.
    exact, t_exact = [], []
    for v in q:
        t = time.perf_counter()
        exact.append(exact_top(g, v, args.k))
        t_exact.append((time.perf_counter() - t) * 1000)
    fd, fd_name = face_distance_fn()
    # face_recognition's encodings are float64 (dlib returns float64), and so is a gallery built from them.
    g64 = g.astype(np.float64)
    t_fd = []
    for v in q[: min(50, len(q))].astype(np.float64):
        t = time.perf_counter()
        d = fd(g64, v)
        np.argpartition(d, args.k)[: args.k]
        t_fd.append((time.perf_counter() - t) * 1000)
    del g64
    ex_ms, fd_ms = float(np.median(t_exact)), float(np.median(t_fd))
    mate_rank1 = np.mean([truth[0] == j for truth, j in zip(exact, src, strict=True)])
    print(
        f"exact scan (numpy, float32): {ex_ms:.1f} ms/query median; "
        f"{fd_name}, float64 gallery: {fd_ms:.1f} ms/query median; "
        f"exact search puts the mate at rank 1 for {mate_rank1:.3f} of probes",
        flush=True,
    )
    print(
        f"| M | ef_search | build (s) | bytes/template | p50 (ms) | p95 (ms) | recall@{args.k} | mate rank as exact "
        "| exact scan p50 (ms, interleaved) | x exact scan | x face_distance |"
        "\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        flush=True,
    )
    single_answers = None

    def sweep(m: int) -> None:
        nonlocal single_answers
        s_m = Settings(hnsw_m=m) if m != s.hnsw_m else s
        idx, build_s = build(g, ids, s_m, efs[0])
        data, _ = idx.to_bytes()
        per_template = len(data) / args.n
        del data
        for ef in efs:
            idx.ef_search = ef
            r = run_single(idx, g, q, exact, src, args.k)
            if m == s.hnsw_m and ef == shard_ef:
                single_answers = r["answers"]
            print(
                f"| {m} | {ef} | {build_s:.0f} | {per_template:.0f} | "
                f"{r['p50']:.2f} | {r['p95']:.2f} | {r['recall']:.4f} "
                f"| {r['same_rank']:.4f} | {r['exact']:.1f} | {times(r['exact'] / r['p50'])} "
                f"| {times(fd_ms / r['p50'])} |",
                flush=True,
            )
        del idx

    sweep(ms[0])  # the first M, then the shards, then any further M (the shards' figures land sooner)
    s_sh = Settings(hnsw_m=s.hnsw_m, hnsw_ef_search=shard_ef)
    for shards in args.shards:
        which = np.array([shard_of(str(i), shards) for i in ids])
        parts, builds = [], []
        for sh in range(shards):
            mine = np.nonzero(which == sh)[0]
            part, b = build(g[mine], mine, s_sh, shard_ef)
            parts.append(part)
            builds.append(b)
        seq, par, lat_exact, rec, equal, same_rank = [], [], [], 0, 0, 0
        for i, (v, truth, j) in enumerate(zip(q, exact, src, strict=True)):
            per = []
            answers = []
            for part in parts:
                t = time.perf_counter()
                answers.append(part.search(v, args.k))
                per.append((time.perf_counter() - t) * 1000)
            merged = [int(h.subject_id) for h in merge(answers, args.k)]
            t = time.perf_counter()
            exact_top(g, v, args.k)
            lat_exact.append((time.perf_counter() - t) * 1000)
            seq.append(sum(per))
            par.append(max(per))
            rec += len(set(truth.tolist()) & set(merged))
            equal += single_answers is not None and merged == single_answers[i]
            rank_exact = int(np.where(truth == j)[0][0]) if j in truth else None
            same_rank += rank_exact == (merged.index(int(j)) if int(j) in merged else None)
        ex_ms = float(np.median(lat_exact))  # interleaved, as for the single index
        same = (
            f"{equal / len(q):.3f}" if single_answers is not None else "n/a (shard ef/M not in the single-index sweep)"
        )
        print(
            f"{shards} shards (M={s.hnsw_m}, ef_search={shard_ef}): build {max(builds):.0f} s per shard in parallel "
            f"({sum(builds):.0f} s in all); query p50 {np.median(par):.2f} "
            f"ms p95 {np.percentile(par, 95):.2f} ms with shards "
            f"in parallel, p50 {np.median(seq):.2f} ms one after another ({times(ex_ms / np.median(par))} / "
            f"{times(ex_ms / np.median(seq))} the exact scan); recall@{args.k} "
            f"{rec / (args.k * len(q)):.4f}; mate rank as exact "
            f"{same_rank / len(q):.4f}; merged list == single index {same}",
            flush=True,
        )
        del parts
    for m in ms[1:]:
        sweep(m)


if __name__ == "__main__":
    main()
