"""1:N accuracy evaluation: protocol, embedding cache, CMC, FNIR@FPIR, DET, demographic differentials.

The harness runs the production pieces (``workers.detect`` decoding, YuNet detection and largest-face
choice, ``workers.engines`` embedders, ``workers.gallery.GalleryIndex`` search and
``workers.fusion.fuse``) in process, so what it measures is what a real search does. Embeddings are
expensive (about 0.2 s per image for the three engines on one core), so they are cached on disk,
outside the repository, keyed by

* the image's content (SHA-1 of its bytes, so moving the data folder invalidates nothing),
* the detector configuration (a different face means a different embedding), and
* the engine's ``name`` and ``version`` (an engine whose preprocessing changes gets a new version
  string: only that engine is recomputed).

Protocol (seeded, see :func:`make_protocol`): in a folder of ``<identity>/<image>``, identities with
two or more images are *multi*, the others *singles*. A seeded fraction of the multi identities is
held out of the gallery; every image of theirs is a *non-mated* probe. Each remaining multi identity
enrols one seeded-random image; every single-image identity is enrolled as a distractor. Every other
image of an enrolled multi identity is a *mated* probe. Probe identities (mated and non-mated) are
then split, seeded and identity-disjoint, into a ``fit`` half (used to learn score normalisation and
fusion) and a ``test`` half (reported). The gallery is the same for both halves.

Metrics (ISO/IEC 19795-1 and NIST FRVT 1:N conventions):

* CMC rank-r hit rate: the fraction of mated probes whose mate is at rank <= r. A probe that failed
  (no face, engine failure) or whose mate failed to enrol counts as a miss.
* FPIR(T): the fraction of non-mated probes whose best candidate scores >= T. A non-mated probe
  that produced no candidates cannot be a false positive.
* FNIR(T): the fraction of mated probes whose mate is not in the candidate list with score >= T
  (the whole top-N list, "rank <= N"); failures count as misses.
* FNIR at FPIR p: T is the smallest threshold with FPIR(T) <= p, found from the non-mated top
  scores; with ``m`` non-mated probes, FPIR values below ``1/m`` cannot be resolved and T is then
  just above the highest non-mated score (reported with ``resolvable: false``).
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
OK = "OK"


# --------------------------------------------------------------------------------------------------
# Data and protocol
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    identity: str
    rel: str  # "<identity>/<file>", the image's name in reports and label files
    path: Path


def list_dataset(root: Path | str) -> list[Image]:
    """Every image of a folder of ``<identity>/<image>``, sorted (files at the top level are ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    images: list[Image] = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        for f in sorted(ident.iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                images.append(Image(ident.name, f"{ident.name}/{f.name}", f))
    if not images:
        raise ValueError(f"no <identity>/<image> files under {root}")
    return images


def default_data_dir() -> Path:
    import os

    env = os.environ.get("QUORUM_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """``$QUORUM_EVAL_CACHE``, else ``$QUORUM_HOME/eval-cache``, else ``~/.cache/quorum/eval-cache``."""
    import os

    if os.environ.get("QUORUM_EVAL_CACHE"):
        return Path(os.environ["QUORUM_EVAL_CACHE"])
    if os.environ.get("QUORUM_HOME"):
        return Path(os.environ["QUORUM_HOME"]) / "eval-cache"
    return Path.home() / ".cache" / "quorum" / "eval-cache"


@dataclass
class Protocol:
    seed: int
    holdout: float
    gallery: list[Image]  # one template per enrolled identity
    mated: list[Image]  # probes whose identity is enrolled
    nonmated: list[Image]  # probes whose identity is not enrolled
    split: dict[str, str]  # probe identity -> "fit" | "test"
    distractors: int  # how many gallery identities have no probe

    def probes(self, part: str | None = None) -> tuple[list[Image], list[Image]]:
        """(mated, non-mated) probes of one split part (``None``: all)."""
        if part is None:
            return self.mated, self.nonmated
        return ([p for p in self.mated if self.split[p.identity] == part],
                [p for p in self.nonmated if self.split[p.identity] == part])

    def summary(self) -> dict:
        out = {
            "seed": self.seed,
            "holdout_fraction": self.holdout,
            "gallery_identities": len(self.gallery),
            "gallery_distractors": self.distractors,
        }
        for part in ("fit", "test", None):
            m, n = self.probes(part)
            key = part or "all"
            out[key] = {
                "mated_probes": len(m),
                "mated_identities": len({p.identity for p in m}),
                "nonmated_probes": len(n),
                "nonmated_identities": len({p.identity for p in n}),
            }
        return out


def make_protocol(images: Sequence[Image], *, seed: int = 0, holdout: float = 0.4,
                  gallery_size: int | None = None, fit_fraction: float = 0.5, max_identities: int | None = None,
                  max_images_per_identity: int | None = None) -> Protocol:
    """The seeded 1:N protocol described in the module docstring.

    ``gallery_size`` caps the number of enrolled identities: distractors (single-image identities)
    are dropped first (seeded), then enrolled multi identities (whose probes go with them).
    ``max_identities`` first keeps a seeded sample of the identities and ``max_images_per_identity``
    a seeded sample of each one's images (both for quick runs, e.g. tests).
    """
    rng = np.random.default_rng(seed)
    by_id: dict[str, list[Image]] = {}
    for im in images:
        by_id.setdefault(im.identity, []).append(im)
    ids = sorted(by_id)
    if max_identities is not None and max_identities < len(ids):
        ids = sorted(ids[j] for j in rng.permutation(len(ids))[:max_identities])
    if max_images_per_identity is not None:
        for i in ids:
            if len(by_id[i]) > max_images_per_identity:
                keep = sorted(rng.permutation(len(by_id[i]))[:max_images_per_identity])
                by_id[i] = [by_id[i][j] for j in keep]
    multi = [i for i in ids if len(by_id[i]) >= 2]
    singles = [i for i in ids if len(by_id[i]) == 1]
    multi_perm = [multi[j] for j in rng.permutation(len(multi))]
    n_hold = int(round(holdout * len(multi)))
    if len(multi) >= 2 and holdout > 0:
        n_hold = min(max(n_hold, 1), len(multi) - 1)
    held = sorted(multi_perm[:n_hold])
    enrolled = sorted(multi_perm[n_hold:])
    singles_perm = [singles[j] for j in rng.permutation(len(singles))]
    if gallery_size is not None:
        if gallery_size < 1:
            raise ValueError("gallery_size must be >= 1")
        keep_d = max(0, gallery_size - len(enrolled))
        singles_perm = singles_perm[:keep_d]
        if len(enrolled) > gallery_size:
            sub = rng.permutation(len(enrolled))[:gallery_size]
            enrolled = sorted(enrolled[j] for j in sub)
    distractors = sorted(singles_perm)
    gallery: list[Image] = []
    mated: list[Image] = []
    for ident in enrolled:
        imgs = by_id[ident]
        g = int(rng.integers(len(imgs)))
        gallery.append(imgs[g])
        mated.extend(im for j, im in enumerate(imgs) if j != g)
    gallery.extend(by_id[i][0] for i in distractors)
    nonmated = [im for i in held for im in by_id[i]]
    # Identity-disjoint fit/test split of the probe identities, stratified by mated / non-mated.
    split: dict[str, str] = {}
    for group in (enrolled, held):
        perm = [group[j] for j in rng.permutation(len(group))]
        n_fit = int(round(fit_fraction * len(perm)))
        for j, ident in enumerate(perm):
            split[ident] = "fit" if j < n_fit else "test"
    return Protocol(seed, holdout, gallery, mated, nonmated, split, len(distractors))


# --------------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------------


def file_key(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def detector_id() -> str:
    """Everything that decides which face an embedding is computed from."""
    from quorum.config import settings
    from workers.detect import Detector

    d = Detector.__init__.__defaults__  # (score_threshold, nms_threshold, top_k, max_side)
    s = settings()
    return (f"yunet-2023mar-int8bq/score{d[0]:g}/nms{d[1]:g}/max{d[3]}/minface{s.min_face_pixels}/largest/"
            f"maxpx{s.max_image_pixels}")


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=120.0)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


class EmbeddingCache:
    """Faces and embeddings on disk: ``faces.sqlite`` and one ``emb-<engine>.sqlite`` per engine.

    Rows are keyed by (detector id | engine version, image SHA-1); a failure is stored as its error
    code so that a failed image is not retried on every run. Safe for several writer processes.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._keys_path = self.root / "keys.sqlite"
        with _connect(self._keys_path) as con:
            con.execute("CREATE TABLE IF NOT EXISTS keys (path TEXT PRIMARY KEY, mtime REAL, size INTEGER, "
                        "sha1 TEXT)")
        with _connect(self.root / "faces.sqlite") as con:
            con.execute("CREATE TABLE IF NOT EXISTS faces (detector TEXT, key TEXT, status TEXT, face TEXT, "
                        "PRIMARY KEY (detector, key))")

    # ---- image keys (SHA-1 of the bytes, memoised by path + mtime + size) --------------------------
    def keys(self, paths: Sequence[Path]) -> list[str]:
        out: list[str] = []
        with _connect(self._keys_path) as con:
            known = {r[0]: r[1:] for r in con.execute("SELECT path, mtime, size, sha1 FROM keys")}
            new = []
            for p in paths:
                st = p.stat()
                row = known.get(str(p))
                if row and row[0] == st.st_mtime and row[1] == st.st_size:
                    out.append(row[2])
                else:
                    k = file_key(p)
                    out.append(k)
                    new.append((str(p), st.st_mtime, st.st_size, k))
            if new:
                con.executemany("INSERT OR REPLACE INTO keys VALUES (?,?,?,?)", new)
        return out

    # ---- faces -----------------------------------------------------------------------------------
    def faces(self, detector: str, keys: Iterable[str] | None = None) -> dict[str, tuple[str, str | None]]:
        with _connect(self.root / "faces.sqlite") as con:
            rows = con.execute("SELECT key, status, face FROM faces WHERE detector=?", (detector,)).fetchall()
        want = None if keys is None else set(keys)
        return {k: (s, f) for k, s, f in rows if want is None or k in want}

    def put_faces(self, detector: str, rows: Sequence[tuple[str, str, str | None]]) -> None:
        if rows:
            with _connect(self.root / "faces.sqlite") as con:
                con.executemany("INSERT OR REPLACE INTO faces VALUES (?,?,?,?)",
                                [(detector, k, s, f) for k, s, f in rows])

    # ---- embeddings ------------------------------------------------------------------------------
    def _emb_path(self, engine: str) -> Path:
        return self.root / f"emb-{engine}.sqlite"

    def _emb_con(self, engine: str) -> sqlite3.Connection:
        con = _connect(self._emb_path(engine))
        con.execute("CREATE TABLE IF NOT EXISTS emb (version TEXT, key TEXT, status TEXT, vec BLOB, "
                    "PRIMARY KEY (version, key))")
        return con

    def done(self, engine: str, version: str) -> set[str]:
        with self._emb_con(engine) as con:
            return {r[0] for r in con.execute("SELECT key FROM emb WHERE version=?", (version,))}

    def put_embeddings(self, engine: str, version: str, rows: Sequence[tuple[str, str, np.ndarray | None]]) -> None:
        if rows:
            with self._emb_con(engine) as con:
                con.executemany(
                    "INSERT OR REPLACE INTO emb VALUES (?,?,?,?)",
                    [(version, k, s, None if v is None else np.asarray(v, dtype="<f4").tobytes())
                     for k, s, v in rows])

    def embeddings(self, engine: str, version: str, dim: int) -> dict[str, tuple[str, np.ndarray | None]]:
        with self._emb_con(engine) as con:
            rows = con.execute("SELECT key, status, vec FROM emb WHERE version=?", (version,)).fetchall()
        return {k: (s, None if v is None else np.frombuffer(v, dtype="<f4", count=dim)) for k, s, v in rows}

    def versions(self, engine: str) -> dict[str, int]:
        with self._emb_con(engine) as con:
            return dict(con.execute("SELECT version, COUNT(*) FROM emb GROUP BY version").fetchall())


def _embed_version(engine_version: str, det: str) -> str:
    return f"{engine_version}|{det}"


def fill_cache(paths: Sequence[Path], engines: Sequence[str], cache_dir: Path | str, *, shard: int = 0,
               shards: int = 1, batch: int = 16, progress: bool = True, threads: int | None = None) -> dict:
    """Detect and embed every image of ``paths[shard::shards]`` not yet in the cache (resumable)."""
    import cv2

    from quorum.config import settings
    from quorum.errors import QuorumError
    from workers.detect import Detector, Face, choose_face, decode_image
    from workers.engines import get_engine

    if threads:
        cv2.setNumThreads(threads)
    s = settings()
    cache = EmbeddingCache(cache_dir)
    det_id = detector_id()
    mine = list(paths)[shard::shards]
    keys = cache.keys(mine)
    faces = cache.faces(det_id)
    engs = [get_engine(e) for e in engines]
    versions = {e.name: _embed_version(e.version, det_id) for e in engs}
    done = {e.name: cache.done(e.name, versions[e.name]) for e in engs}
    todo = [i for i, k in enumerate(keys) if k not in faces or any(k not in done[e.name] for e in engs)]
    detector: Detector | None = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"{'+'.join(engines)} {shard + 1}/{shards}",
                   unit="img", position=shard, leave=True, mininterval=2.0, smoothing=0.05)
    stats = {"images": len(mine), "computed": 0}
    for start in range(0, len(todo), batch):
        idx = todo[start:start + batch]
        decoded: dict[str, np.ndarray] = {}
        new_faces = []
        for i in idx:
            k = keys[i]
            if k in faces and faces[k][0] != OK:
                continue
            try:
                img = decode_image(mine[i].read_bytes(), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
            except QuorumError as exc:
                new_faces.append((k, str(exc.code), None))
                faces[k] = (str(exc.code), None)
                continue
            decoded[k] = img
            if k not in faces:
                if detector is None:
                    detector = Detector()
                try:
                    _, face = choose_face(detector.detect(img), None, min_face_pixels=s.min_face_pixels)
                    rec = (OK, json.dumps(face.to_dict()))
                except QuorumError as exc:
                    rec = (str(exc.code), None)
                faces[k] = rec
                new_faces.append((k, *rec))
        cache.put_faces(det_id, new_faces)
        for e in engs:
            items = [(keys[i], decoded[keys[i]], Face.from_dict(json.loads(faces[keys[i]][1])))
                     for i in idx if keys[i] not in done[e.name] and keys[i] in decoded and faces[keys[i]][0] == OK]
            failed = [(keys[i], faces[keys[i]][0], None) for i in idx
                      if keys[i] not in done[e.name] and keys[i] in faces and faces[keys[i]][0] != OK]
            rows: list[tuple[str, str, np.ndarray | None]] = list(failed)
            if items:
                try:
                    vecs = e.embed_batch([(img, f) for _, img, f in items])
                    rows += [(k, OK, v) for (k, _, _), v in zip(items, vecs, strict=True)]
                except QuorumError:
                    for k, img, f in items:  # one bad image must not sink the batch
                        try:
                            rows.append((k, OK, e.embed(img, f)))
                        except QuorumError as exc:
                            rows.append((k, str(exc.code), None))
            cache.put_embeddings(e.name, versions[e.name], rows)
            done[e.name].update(r[0] for r in rows)
        stats["computed"] += len(idx)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return stats


def _fill_worker(args: tuple) -> dict:
    paths, engines, cache_dir, shard, shards, progress = args
    return fill_cache(paths, engines, cache_dir, shard=shard, shards=shards, progress=progress,
                      threads=1 if shards > 1 else None)


def fill_cache_parallel(paths: Sequence[Path], engines: Sequence[str], cache_dir: Path | str, *, jobs: int = 1,
                        progress: bool = True) -> None:
    """:func:`fill_cache` over ``jobs`` processes (each takes every ``jobs``-th image)."""
    paths = list(paths)
    if jobs <= 1:
        for engine in engines:
            fill_cache(paths, [engine], cache_dir, progress=progress)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(jobs) as pool:
        # Engine by engine, cheapest first in the caller's order, so that complete results for the
        # fast engines land early; detection is cached by the first pass and reused by the others.
        for engine in engines:
            pool.map(_fill_worker, [(paths, [engine], str(cache_dir), i, jobs, progress) for i in range(jobs)])


# --------------------------------------------------------------------------------------------------
# Metrics (pure functions on arrays; NaN marks "mate not in the list" / "no candidates")
# --------------------------------------------------------------------------------------------------


def cmc(mate_ranks: Sequence[int] | np.ndarray, ranks: Sequence[int] = (1, 10, 250)) -> dict[int, float]:
    """Hit rate at each rank: fraction of mated probes with 1 <= mate rank <= r (0 = not found)."""
    r = np.asarray(mate_ranks, dtype=np.int64)
    if r.size == 0:
        return {k: float("nan") for k in ranks}
    return {k: float(np.mean((r >= 1) & (r <= k))) for k in ranks}


def fpir_at(nonmated_top: np.ndarray, threshold: float) -> float:
    nm = np.asarray(nonmated_top, dtype=np.float64)
    if nm.size == 0:
        return float("nan")
    return float(np.mean(np.nan_to_num(nm, nan=-np.inf) >= threshold))


def fnir_at(mate_scores: np.ndarray, threshold: float) -> float:
    ms = np.asarray(mate_scores, dtype=np.float64)
    if ms.size == 0:
        return float("nan")
    return float(np.mean(~(np.nan_to_num(ms, nan=-np.inf) >= threshold)))


def threshold_for_fpir(nonmated_top: np.ndarray, target: float) -> tuple[float, bool]:
    """The smallest threshold T with FPIR(T) <= target, and whether ``target`` is resolvable
    (at least one false positive is allowed: target * non-mated probes >= 1)."""
    nm = np.asarray(nonmated_top, dtype=np.float64)
    m = nm.size
    v = np.sort(nm[~np.isnan(nm)])[::-1]
    k = int(math.floor(target * m + 1e-9))  # false positives allowed
    if k >= v.size:
        return float("-inf"), m > 0 and target * m >= 1
    return float(np.nextafter(v[k], np.inf)), target * m >= 1


def fnir_at_fpir(mate_scores: np.ndarray, nonmated_top: np.ndarray,
                 targets: Sequence[float] = (0.001, 0.01)) -> list[dict]:
    out = []
    for t in targets:
        thr, ok = threshold_for_fpir(nonmated_top, t)
        out.append({"fpir_target": t, "threshold": thr if math.isfinite(thr) else None,
                    "fnir": fnir_at(mate_scores, thr), "fpir": fpir_at(nonmated_top, thr), "resolvable": ok})
    return out


def det_curve(mate_scores: np.ndarray, nonmated_top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPIR, FNIR, threshold) at every distinct score, thresholds descending."""
    ms = np.asarray(mate_scores, dtype=np.float64)
    nm = np.asarray(nonmated_top, dtype=np.float64)
    ms_v = np.sort(ms[~np.isnan(ms)])
    nm_v = np.sort(nm[~np.isnan(nm)])
    thr = np.unique(np.concatenate([ms_v, nm_v]))[::-1]
    if thr.size == 0 or ms.size == 0 or nm.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    fp = (nm_v.size - np.searchsorted(nm_v, thr, side="left")) / nm.size
    tp = (ms_v.size - np.searchsorted(ms_v, thr, side="left")) / ms.size
    return fp, 1.0 - tp, thr


def system_metrics(mate_ranks: np.ndarray, mate_scores: np.ndarray, nonmated_top: np.ndarray, *,
                   ranks: Sequence[int] = (1, 10, 250), fpir_targets: Sequence[float] = (0.001, 0.01)) -> dict:
    r = np.asarray(mate_ranks)
    return {
        "mated_probes": int(r.size),
        "nonmated_probes": int(np.asarray(nonmated_top).size),
        "cmc": {f"rank{k}": v for k, v in cmc(r, ranks).items()},
        "rank1_misses": int(np.sum(r != 1)),
        "fnir_at_fpir": fnir_at_fpir(mate_scores, nonmated_top, fpir_targets),
    }


# --------------------------------------------------------------------------------------------------
# Demographic differentials
# --------------------------------------------------------------------------------------------------


def read_group_labels(path: Path | str) -> dict[str, str]:
    """``image_or_identity,group`` rows (a header row naming those columns is optional)."""
    import csv

    out: dict[str, str] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: expected image_or_identity,group, got {row}")
            key, group = row[0].strip(), row[1].strip()
            if key == "image_or_identity" and group == "group":
                continue
            out[key] = group
    return out


def group_of(image: Image, labels: Mapping[str, str]) -> str | None:
    """An image's group: by ``identity/file``, then by file name, then by identity."""
    return labels.get(image.rel) or labels.get(image.path.name) or labels.get(image.identity)


def _cluster_sums(errors: np.ndarray, clusters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    _, inv = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    e = np.bincount(inv, weights=np.asarray(errors, dtype=np.float64))
    n = np.bincount(inv).astype(np.float64)
    return e, n


def rates_by_group(errors: np.ndarray, groups: Sequence[str], clusters: Sequence[str], *, n_boot: int = 1000,
                   seed: int = 0, alpha: float = 0.05, counts: np.ndarray | None = None) -> dict:
    """Per group: trials, errors, rate, its bootstrap CI, and the ratio to the best (lowest-rate) group.

    ``errors[i]`` is 1 for an error (or, with ``counts``, the number of errors out of ``counts[i]``
    trials of row i). Bootstrap: clusters (people) are resampled with replacement within each group,
    ``n_boot`` times with ``seed`` (percentile intervals), because one person's images are not
    independent. The ratio's interval comes from the same replicates (the best group is the one with
    the lowest point estimate; its replicate rate is the denominator).
    """
    errors = np.asarray(errors, dtype=np.float64)
    counts = np.ones_like(errors) if counts is None else np.asarray(counts, dtype=np.float64)
    groups = np.asarray(groups, dtype=object).astype(str)
    clusters = np.asarray(clusters, dtype=object).astype(str)
    rng = np.random.default_rng(seed)
    names = sorted(set(groups.tolist()))
    point: dict[str, float] = {}
    reps: dict[str, np.ndarray] = {}
    out: dict[str, dict] = {}
    for g in names:
        sel = groups == g
        _, inv = np.unique(clusters[sel], return_inverse=True)
        e = np.bincount(inv, weights=errors[sel])
        n = np.bincount(inv, weights=counts[sel])
        total_e, total_n = float(e.sum()), float(n.sum())
        point[g] = total_e / total_n if total_n else float("nan")
        idx = rng.integers(0, e.size, size=(n_boot, e.size))
        with np.errstate(invalid="ignore", divide="ignore"):
            reps[g] = e[idx].sum(1) / n[idx].sum(1)
        lo, hi = np.nanquantile(reps[g], [alpha / 2, 1 - alpha / 2]) if n_boot else (float("nan"),) * 2
        out[g] = {"trials": int(round(total_n)), "errors": int(round(total_e)), "clusters": int(e.size),
                  "rate": point[g], "ci": [float(lo), float(hi)]}
    finite = {g: v for g, v in point.items() if not math.isnan(v)}
    best = min(finite, key=lambda g: (finite[g], g)) if finite else None
    for g in names:
        if best is None or point[best] == 0:
            out[g]["ratio_to_best"] = None
            out[g]["ratio_ci"] = None
            continue
        out[g]["ratio_to_best"] = point[g] / point[best]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = reps[g] / reps[best]
        ratio = ratio[np.isfinite(ratio)]
        out[g]["ratio_ci"] = ([float(x) for x in np.quantile(ratio, [alpha / 2, 1 - alpha / 2])]
                              if ratio.size else None)
    return {"best_group": best, "groups": out}


def threshold_for_fmr(impostor: np.ndarray, target: float) -> float:
    """Smallest threshold with FMR(T) = fraction of impostor scores >= T that is <= target."""
    v = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    k = int(math.floor(target * v.size + 1e-9))
    if k >= v.size:
        return float("-inf")
    return float(np.nextafter(v[k], np.inf))


# --------------------------------------------------------------------------------------------------
# Running the searches
# --------------------------------------------------------------------------------------------------


@dataclass
class EngineRun:
    """One engine over the protocol: enrolment, probe embeddings and every probe's top-N list."""

    name: str
    version: str
    gallery_status: list[str]  # per protocol.gallery image: OK or an error code
    probe_status: list[str]  # per probe (mated then non-mated): OK or an error code
    gallery_vecs: np.ndarray  # (gallery, dim); rows of failed images are zero
    probe_vecs: np.ndarray  # (probes, dim)
    hits: list[tuple[np.ndarray, np.ndarray] | None]  # per probe: (subject indices, scores) or None


@dataclass
class Outcome:
    """What one system (an engine or a fusion method) answered, per probe."""

    mate_rank: np.ndarray  # per mated probe: rank of the mate, 0 when absent or the probe failed
    mate_score: np.ndarray  # per mated probe: the mate's score, NaN when absent
    top_score: np.ndarray  # per non-mated probe: the best candidate's score, NaN when none


@dataclass
class Run:
    protocol: Protocol
    subjects: list[str]  # gallery subject ids (identity names), index = subject index
    engines: dict[str, EngineRun]
    top_n: int

    @property
    def probes(self) -> list[Image]:
        return self.protocol.mated + self.protocol.nonmated

    def mate_of(self, i: int) -> int | None:
        """Subject index of probe i's mate (None for a non-mated probe)."""
        if i >= len(self.protocol.mated):
            return None
        return self._subject_index[self.protocol.mated[i].identity]

    def __post_init__(self) -> None:
        self._subject_index = {s: j for j, s in enumerate(self.subjects)}

    def lists_for(self, i: int, engines: Sequence[str] | None = None) -> dict:
        from workers.fusion import Ranked

        out = {}
        for e in engines or self.engines:
            h = self.engines[e].hits[i]
            if h is None:
                continue
            idx, sc = h
            out[e] = [Ranked(self.subjects[j], r + 1, float(s)) for r, (j, s) in enumerate(zip(idx, sc))]
        return out


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="probe", mininterval=2.0, leave=False)


def run_searches(protocol: Protocol, engines: Sequence[str], cache_dir: Path | str, *, top_n: int = 250,
                 jobs: int = 1, progress: bool = True, echo: Callable[[str], None] = lambda m: None) -> Run:
    """Embed (through the cache), enrol the gallery in one ``GalleryIndex`` per engine, search every probe."""
    from quorum.config import settings
    from workers.engines import get_engine
    from workers.gallery import GalleryIndex

    s = settings()
    probes = protocol.mated + protocol.nonmated
    all_images = protocol.gallery + probes
    cache = EmbeddingCache(cache_dir)
    det = detector_id()
    paths = [im.path for im in all_images]
    keys = cache.keys(paths)
    missing = set()
    engs = {e: get_engine(e) for e in engines}
    for e, eng in engs.items():
        done = cache.done(e, _embed_version(eng.version, det))
        missing |= {p for p, k in zip(paths, keys) if k not in done}
    if missing:
        echo(f"embedding {len(missing)} images not in the cache ({cache.root}) ...")
        uniq = sorted(missing)
        fill_cache_parallel(uniq, list(engines), cache.root, jobs=jobs, progress=progress)
    # The searches themselves are cached too (a few minutes for lfw-dev): keyed by everything they
    # depend on, so any change of images, protocol, engine version, detector or index settings misses.
    run_key = hashlib.sha1(json.dumps({
        "gallery": [im.rel for im in protocol.gallery], "mated": [im.rel for im in protocol.mated],
        "nonmated": [im.rel for im in protocol.nonmated], "split": sorted(protocol.split.items()),
        "keys": keys, "versions": {e: _embed_version(eng.version, det) for e, eng in engs.items()},
        "top_n": top_n, "hnsw": [s.hnsw_m, s.hnsw_ef_construction, s.hnsw_ef_search],
    }).encode()).hexdigest()
    run_file = cache.root / "runs" / f"{run_key}.pkl"
    if run_file.exists():
        import pickle

        try:
            with open(run_file, "rb") as fh:
                cached = pickle.load(fh)
            cached.protocol = protocol
            echo(f"searches from the cache: {run_file}")
            return cached
        except Exception:  # a stale or unreadable file: search again
            pass
    subjects = [im.identity for im in protocol.gallery]
    runs: dict[str, EngineRun] = {}
    ng = len(protocol.gallery)
    for e, eng in engs.items():
        emb = cache.embeddings(e, _embed_version(eng.version, det), eng.dim)
        status = [emb[k][0] if k in emb else "MISSING" for k in keys]
        vecs = np.zeros((len(keys), eng.dim), dtype=np.float32)
        for i, k in enumerate(keys):
            if status[i] == OK:
                vecs[i] = emb[k][1]
        index = GalleryIndex(eng.dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction,
                             ef_search=s.hnsw_ef_search, capacity=ng + 16)
        ok = [j for j in range(ng) if status[j] == OK]
        index.add(ok, [subjects[j] for j in ok], vecs[ok])
        sub_idx = {sname: j for j, sname in enumerate(subjects)}
        hits: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i in _progress(range(len(probes)), len(probes), f"search {e}", progress):
            if status[ng + i] != OK:
                hits.append(None)
                continue
            res = index.search(vecs[ng + i], top_n)
            hits.append((np.asarray([sub_idx[h.subject_id] for h in res], dtype=np.int32),
                         np.asarray([h.score for h in res], dtype=np.float32)))
        runs[e] = EngineRun(e, eng.version, status[:ng], status[ng:], vecs[:ng], vecs[ng:], hits)
    result = Run(protocol, subjects, runs, top_n)
    import os
    import pickle

    run_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_file.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        pickle.dump(result, fh, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, run_file)
    return result


def engine_outcome(run: Run, engine: str) -> Outcome:
    er = run.engines[engine]
    nm = len(run.protocol.mated)
    ranks = np.zeros(nm, dtype=np.int64)
    scores = np.full(nm, np.nan)
    top = np.full(len(run.protocol.nonmated), np.nan)
    for i, h in enumerate(er.hits):
        if h is None:
            continue
        idx, sc = h
        if i < nm:
            where = np.nonzero(idx == run.mate_of(i))[0]
            if where.size:
                ranks[i] = int(where[0]) + 1
                scores[i] = float(sc[where[0]])
        elif sc.size:
            top[i - nm] = float(sc[0])
    return Outcome(ranks, scores, top)


def fusion_outcome(run: Run, method: str, calibration=None, *, progress: bool = False,
                   engines: Sequence[str] | None = None) -> Outcome:
    """Each probe's engine lists through ``workers.fusion.fuse`` exactly as production calls it."""
    from workers.fusion import fuse

    engines = list(engines or run.engines)
    versions = {e: run.engines[e].version for e in engines}
    nm = len(run.protocol.mated)
    n = len(run.probes)
    ranks = np.zeros(nm, dtype=np.int64)
    scores = np.full(nm, np.nan)
    top = np.full(n - nm, np.nan)
    for i in _progress(range(n), n, f"fuse {method}", progress):
        lists = run.lists_for(i, engines)
        if not lists:
            continue
        fused = fuse(lists, run.top_n, method, calibration=calibration, versions=versions)
        if i < nm:
            mate = run.subjects[run.mate_of(i)]
            for f in fused:
                if f.subject_id == mate:
                    ranks[i] = f.rank
                    scores[i] = f.fused_score
                    break
        elif fused:
            top[i - nm] = fused[0].fused_score
    return Outcome(ranks, scores, top)


def part_indices(run: Run, part: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(mated indices, non-mated indices) of a split part (None or "all": everything)."""
    p = run.protocol
    if part in (None, "all"):
        return np.arange(len(p.mated)), np.arange(len(p.nonmated))
    return (np.asarray([i for i, im in enumerate(p.mated) if p.split[im.identity] == part], dtype=np.int64),
            np.asarray([i for i, im in enumerate(p.nonmated) if p.split[im.identity] == part], dtype=np.int64))


def outcome_metrics(o: Outcome, mi: np.ndarray, ni: np.ndarray, **kw) -> dict:
    return system_metrics(o.mate_rank[mi], o.mate_score[mi], o.top_score[ni], **kw)


def failures(run: Run, engine: str) -> dict:
    er = run.engines[engine]
    from collections import Counter

    g = Counter(s for s in er.gallery_status if s != OK)
    p = Counter(s for s in er.probe_status if s != OK)
    return {"failure_to_enrol": sum(g.values()), "failure_to_enrol_by_code": dict(sorted(g.items())),
            "gallery_images": len(er.gallery_status),
            "probe_failures": sum(p.values()), "probe_failures_by_code": dict(sorted(p.items())),
            "probes": len(er.probe_status)}


# --------------------------------------------------------------------------------------------------
# Calibration data (fit part)
# --------------------------------------------------------------------------------------------------


def genuine_impostor(run: Run, engine: str, mated_idx: np.ndarray, nonmated_idx: np.ndarray, *,
                     max_impostor: int = 2_000_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All genuine scores (probe vs its mate's template) and (a seeded sample of at most
    ``max_impostor``) impostor scores (probe vs every other enrolled template) of the given probes."""
    er = run.engines[engine]
    nm = len(run.protocol.mated)
    g_ok = np.asarray([s == OK for s in er.gallery_status])
    gal = er.gallery_vecs[g_ok]
    gal_subj = np.nonzero(g_ok)[0]
    rows = [int(i) for i in mated_idx if er.probe_status[int(i)] == OK]
    rows += [nm + int(i) for i in nonmated_idx if er.probe_status[nm + int(i)] == OK]
    gen, imp = [], []
    for start in range(0, len(rows), 512):
        chunk = rows[start:start + 512]
        sc = er.probe_vecs[chunk] @ gal.T
        mask = np.ones_like(sc, dtype=bool)
        for r, i in enumerate(chunk):
            if i < nm:
                hit = np.nonzero(gal_subj == run.mate_of(i))[0]
                if hit.size:
                    gen.append(float(sc[r, hit[0]]))
                    mask[r, hit[0]] = False
        imp.append(sc[mask].astype(np.float32))
    impostor = np.concatenate(imp) if imp else np.zeros(0, dtype=np.float32)
    if impostor.size > max_impostor:
        impostor = np.random.default_rng(seed).choice(impostor, max_impostor, replace=False)
    return np.asarray(gen), impostor


def fit_calibration(run: Run, *, part: str = "fit", default_method: str | None = None, meta: Mapping | None = None):
    """Learn a :class:`workers.fusion.Calibration` from the ``part`` probes of a run."""
    from workers import fusion

    mi, ni = part_indices(run, part)
    scores = {e: genuine_impostor(run, e, mi, ni) for e in run.engines}
    nm = len(run.protocol.mated)
    probes = []
    for i in list(mi) + [nm + int(j) for j in ni]:
        i = int(i)
        mate = run.mate_of(i)
        probes.append(fusion.FitProbe(run.lists_for(i), None if mate is None else run.subjects[mate]))
    versions = {e: r.version for e, r in run.engines.items()}
    return fusion.fit(probes, scores, versions, default_method=default_method or fusion.FALLBACK_METHOD,
                      meta=dict(meta or {}))


# --------------------------------------------------------------------------------------------------
# Demographic differentials on a run
# --------------------------------------------------------------------------------------------------


def demographics(run: Run, outcomes: Mapping[str, Outcome], labels: Mapping[str, str], *, part: str | None = "test",
                 operating_fpir: float = 0.01, operating_fmr: float = 0.001, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """Per group and system: FNIR / FPIR (1:N) at the system's threshold for ``operating_fpir`` over
    all the part's non-mated probes; per engine also FNMR / FMR (1:1, probe vs enrolled template) at
    the engine's threshold for ``operating_fmr`` over all the part's impostor pairs. FMR counts
    within-group impostor pairs (probe and template in the same group), as NISTIR 8280 does."""
    p = run.protocol
    mi, ni = part_indices(run, part)
    mg = [group_of(p.mated[i], labels) for i in mi]
    ng = [group_of(p.nonmated[i], labels) for i in ni]
    m_sel = np.asarray([g is not None for g in mg], dtype=bool)
    n_sel = np.asarray([g is not None for g in ng], dtype=bool)
    m_groups = [g for g in mg if g is not None]
    n_groups = [g for g in ng if g is not None]
    m_clusters = [p.mated[i].identity for i, ok in zip(mi, m_sel) if ok]
    n_clusters = [p.nonmated[i].identity for i, ok in zip(ni, n_sel) if ok]
    report: dict[str, Any] = {
        "part": part or "all",
        "operating_fpir": operating_fpir,
        "operating_fmr": operating_fmr,
        "bootstrap": {"replicates": n_boot, "seed": seed, "interval": "95% percentile, people resampled within group"},
        "labelled": {"mated_probes": int(m_sel.sum()), "nonmated_probes": int(n_sel.sum()),
                     "unlabelled_probes": int((~m_sel).sum() + (~n_sel).sum())},
        "systems": {},
    }
    for name, o in outcomes.items():
        thr, resolvable = threshold_for_fpir(o.top_score[ni], operating_fpir)
        sys_rep: dict[str, Any] = {"threshold_1n": thr if math.isfinite(thr) else None, "resolvable": resolvable}
        ms = np.nan_to_num(o.mate_score[mi], nan=-np.inf)[m_sel]
        ts = np.nan_to_num(o.top_score[ni], nan=-np.inf)[n_sel]
        if len(m_groups):
            sys_rep["fnir"] = rates_by_group((~(ms >= thr)).astype(float), m_groups, m_clusters, n_boot=n_boot, seed=seed)
        if len(n_groups):
            sys_rep["fpir"] = rates_by_group((ts >= thr).astype(float), n_groups, n_clusters, n_boot=n_boot, seed=seed)
        if name in run.engines:
            sys_rep.update(_one_to_one(run, name, mi, ni, labels, operating_fmr, n_boot, seed))
        report["systems"][name] = sys_rep
    return report


def _one_to_one(run: Run, engine: str, mi: np.ndarray, ni: np.ndarray, labels: Mapping[str, str],
                operating_fmr: float, n_boot: int, seed: int) -> dict:
    er = run.engines[engine]
    p = run.protocol
    nm = len(p.mated)
    _, imp = genuine_impostor(run, engine, mi, ni, seed=seed)
    thr = threshold_for_fmr(imp, operating_fmr)
    gal_groups = np.asarray([group_of(im, labels) or "" for im in p.gallery], dtype=object)
    g_ok = np.asarray([s == OK for s in er.gallery_status])
    # FNMR: every labelled mated probe against its mate's template; a failure on either side is an error.
    gen_err, gen_groups, gen_clusters = [], [], []
    imp_err, imp_cnt, imp_groups, imp_clusters = [], [], [], []
    rows = [(int(i), p.mated[int(i)]) for i in mi] + [(nm + int(i), p.nonmated[int(i)]) for i in ni]
    for i, im in rows:
        g = group_of(im, labels)
        if g is None:
            continue
        ok = er.probe_status[i] == OK
        sc = er.gallery_vecs @ er.probe_vecs[i] if ok else None
        mate = run.mate_of(i)
        if mate is not None:
            gen_groups.append(g)
            gen_clusters.append(im.identity)
            gen_err.append(0.0 if ok and g_ok[mate] and sc[mate] >= thr else 1.0)
        if ok:
            same = (gal_groups == g) & g_ok
            if mate is not None:
                same[mate] = False
            if same.any():
                imp_groups.append(g)
                imp_clusters.append(im.identity)
                imp_err.append(float(np.sum(sc[same] >= thr)))
                imp_cnt.append(float(same.sum()))
    out: dict[str, Any] = {"threshold_1to1": thr if math.isfinite(thr) else None}
    if gen_err:
        out["fnmr"] = rates_by_group(np.asarray(gen_err), gen_groups, gen_clusters, n_boot=n_boot, seed=seed)
    if imp_err:
        out["fmr"] = rates_by_group(np.asarray(imp_err), imp_groups, imp_clusters, n_boot=n_boot, seed=seed,
                                    counts=np.asarray(imp_cnt))
    return out


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_cmc(outcomes: Mapping[str, Outcome], mi: np.ndarray, top_n: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ranks = np.arange(1, top_n + 1)
    for name, o in outcomes.items():
        r = o.mate_rank[mi]
        hit = [np.mean((r >= 1) & (r <= k)) if r.size else np.nan for k in ranks]
        ax.plot(ranks, hit, label=name, lw=1.6)
    ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("hit rate (mated probes)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_det(outcomes: Mapping[str, Outcome], mi: np.ndarray, ni: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    floor_x = 1.0 / max(1, ni.size) / 2
    floor_y = 1.0 / max(1, mi.size) / 2
    for name, o in outcomes.items():
        fp, fn, _ = det_curve(o.mate_score[mi], o.top_score[ni])
        if fp.size:
            ax.step(np.maximum(fp, floor_x), np.maximum(fn, floor_y), where="post", label=name, lw=1.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FPIR (non-mated searches with a candidate >= T)")
    ax.set_ylabel("FNIR (mate not returned with score >= T)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Through the queue (a running stack: `quorum up`)
# --------------------------------------------------------------------------------------------------


def queue_outcome(run: Run, *, timeout: float = 24 * 3600.0, progress: bool = True,
                  echo: Callable[[str], None] = lambda m: None) -> tuple[Outcome, dict]:
    """Enrol the protocol's gallery into the running stack and search every probe through the queue.

    Uses the stack's configured fusion (``settings().fusion_method``). The stack's gallery should
    hold nothing else: enrol into a dedicated stack (e.g. ``QUORUM_HOME=/tmp/evalstack quorum up``)."""
    from broker.client import QuorumClient
    from quorum.config import settings
    from quorum.demo import DEMO_AGENCY, DEMO_USER, provision_demo
    from quorum.galleryadmin import enrol
    from quorum.objectstore import open_store
    from schemas.messages import ErrorResult

    s = settings()
    p = run.protocol
    echo(f"enrolling {len(p.gallery)} gallery images through the queue ...")
    rep = enrol(s, open_store(s), [(im.identity, im.path) for im in p.gallery])
    client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, provision_demo(s))
    probes = run.probes
    echo(f"searching {len(probes)} probes through the queue ...")
    rids = [client.submit(im.path, case_number="EVAL-0001", offence_code="DEMO", purpose="demo",
                          candidates=run.top_n) for im in probes]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rids), desc="queue", unit="probe", mininterval=2.0, leave=False)
    last = [0]

    def tick(n: int) -> None:
        if bar is not None:
            bar.update(n - last[0])
            last[0] = n

    results = client.wait_all(rids, timeout=timeout, progress=tick)
    if bar is not None:
        bar.close()
    nm = len(p.mated)
    ranks = np.zeros(nm, dtype=np.int64)
    scores = np.full(nm, np.nan)
    top = np.full(len(p.nonmated), np.nan)
    errors: dict[str, int] = {}
    degraded = 0
    methods: set[str] = set()
    for i, rid in enumerate(rids):
        res = results[rid]
        if isinstance(res, ErrorResult):
            errors[res.code] = errors.get(res.code, 0) + 1
            continue
        degraded += int(res.degraded)
        methods.add(res.fusion_method)
        if i < nm:
            for c in res.candidates:
                if c.subject_id == p.mated[i].identity:
                    ranks[i], scores[i] = c.rank, c.fused_score
                    break
        elif res.candidates:
            top[i - nm] = res.candidates[0].fused_score
    info = {"enrolled": rep.enrolled, "failed_to_enrol": {e: len(f) for e, f in rep.failed.items()},
            "errors": errors, "degraded": degraded, "fusion_methods": sorted(methods)}
    return Outcome(ranks, scores, top), info
