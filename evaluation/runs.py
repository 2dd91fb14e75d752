"""Running the searches in process, and what each system answered.

:func:`run_searches` embeds through the cache, enrols the gallery in one production
``workers.index.GalleryIndex`` per engine and searches every probe (the whole :class:`Run` is
cached too). :func:`engine_outcome` and :func:`fusion_outcome` (through ``workers.fusion.fuse``,
exactly as production calls it) reduce a run to an :class:`Outcome` per system;
:func:`outcome_metrics` scores one on a split part (:func:`part_indices`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .cache import OK, EmbeddingCache, _embed_version, detector_id
from .embed import fill_cache_parallel
from .metrics import system_metrics

if TYPE_CHECKING:
    from .protocol import Image, SplitProtocol


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
    protocol: SplitProtocol
    subjects: list[str]  # gallery subject ids (identity names), index = subject index
    engines: dict[str, EngineRun]
    top_n: int
    # per probe: ``workers.fusion.probe_quality`` of the face the detector chose (None: unknown); set by
    # :func:`run_searches` from the face cache (not part of the cached searches)
    quality: list[dict[str, float] | None] | None = None

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
        from ..workers.fusion import Ranked

        out = {}
        for e in engines or self.engines:
            h = self.engines[e].hits[i]
            if h is None:
                continue
            idx, sc = h
            out[e] = [Ranked(self.subjects[j], r + 1, float(s)) for r, (j, s) in enumerate(zip(idx, sc, strict=False))]
        return out


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, unit="probe", mininterval=2.0, leave=False)


def run_searches(
    protocol: SplitProtocol,
    engines: Sequence[str],
    cache_dir: Path | str,
    *,
    top_n: int = 250,
    jobs: int = 1,
    progress: bool = True,
    echo: Callable[[str], None] = lambda m: None,
) -> Run:
    """Embed (through the cache), enrol the gallery in one ``GalleryIndex`` per engine, search every probe."""
    from ..core.config import settings
    from ..workers.engines import get_engine
    from ..workers.index import GalleryIndex

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
        missing |= {p for p, k in zip(paths, keys, strict=False) if k not in done}
    if missing:
        echo(f"embedding {len(missing)} images not in the cache ({cache.root}) ...")
        uniq = sorted(missing)
        fill_cache_parallel(uniq, list(engines), cache.root, jobs=jobs, progress=progress)
    # The searches themselves are cached too (a few minutes for lfw-dev): keyed by everything they
    # depend on, so any change of images, protocol, engine version, detector or index settings misses.
    run_key = hashlib.sha1(
        json.dumps(
            {
                "gallery": [im.rel for im in protocol.gallery],
                "mated": [im.rel for im in protocol.mated],
                "nonmated": [im.rel for im in protocol.nonmated],
                "split": sorted(protocol.split.items()),
                "keys": keys,
                "versions": {e: _embed_version(eng.version, det) for e, eng in engs.items()},
                "top_n": top_n,
                "hnsw": [s.hnsw_m, s.hnsw_ef_construction, s.hnsw_ef_search],
            }
        ).encode()
    ).hexdigest()
    run_file = cache.root / "runs" / f"{run_key}.pkl"
    if run_file.exists():
        import pickle

        try:
            with open(run_file, "rb") as fh:
                cached = pickle.load(fh)
            cached.protocol = protocol
            cached.quality = probe_qualities(cache, det, keys[len(protocol.gallery) :])
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
        index = GalleryIndex(
            eng.dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=s.hnsw_ef_search, capacity=ng + 16
        )
        ok = [j for j in range(ng) if status[j] == OK]
        index.add(ok, [subjects[j] for j in ok], vecs[ok])
        sub_idx = {sname: j for j, sname in enumerate(subjects)}
        hits: list[tuple[np.ndarray, np.ndarray] | None] = []
        for i in _progress(range(len(probes)), len(probes), f"search {e}", progress):
            if status[ng + i] != OK:
                hits.append(None)
                continue
            res = index.search(vecs[ng + i], top_n)
            hits.append(
                (
                    np.asarray([sub_idx[h.subject_id] for h in res], dtype=np.int32),
                    np.asarray([h.score for h in res], dtype=np.float32),
                )
            )
        runs[e] = EngineRun(e, eng.version, status[:ng], status[ng:], vecs[:ng], vecs[ng:], hits)
    result = Run(protocol, subjects, runs, top_n)
    import pickle

    from ..core.files import atomic_write

    run_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    result.quality = probe_qualities(cache, det, keys[ng:])
    return result


def probe_qualities(cache: EmbeddingCache, det: str, keys: Sequence[str]) -> list[dict[str, float] | None]:
    """Per image key: ``workers.fusion.probe_quality`` of its cached face (None: no face cached)."""
    from ..workers.fusion import probe_quality

    faces = cache.faces(det, keys)
    out: list[dict[str, float] | None] = []
    for k in keys:
        row = faces.get(k)
        if row is None or row[0] != OK or not row[1]:
            out.append(None)
            continue
        face = json.loads(row[1])
        out.append(probe_quality(face.get("box"), face.get("score")))
    return out


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


def fusion_outcome(
    run: Run, method: str, calibration=None, *, progress: bool = False, engines: Sequence[str] | None = None
) -> Outcome:
    """Each probe's engine lists through ``workers.fusion.fuse`` exactly as production calls it."""
    from ..workers.fusion import fuse

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
        quality = run.quality[i] if run.quality is not None else None
        fused = fuse(lists, run.top_n, method, calibration=calibration, versions=versions, quality=quality)
        mate_index = run.mate_of(i)
        if i < nm and mate_index is not None:
            mate = run.subjects[mate_index]
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
    return (
        np.asarray([i for i, im in enumerate(p.mated) if p.split[im.identity] == part], dtype=np.int64),
        np.asarray([i for i, im in enumerate(p.nonmated) if p.split[im.identity] == part], dtype=np.int64),
    )


def outcome_metrics(o: Outcome, mi: np.ndarray, ni: np.ndarray, **kw) -> dict:
    return system_metrics(o.mate_rank[mi], o.mate_score[mi], o.top_score[ni], **kw)


def failures(run: Run, engine: str) -> dict:
    er = run.engines[engine]
    from collections import Counter

    g = Counter(s for s in er.gallery_status if s != OK)
    p = Counter(s for s in er.probe_status if s != OK)
    return {
        "failure_to_enrol": sum(g.values()),
        "failure_to_enrol_by_code": dict(sorted(g.items())),
        "gallery_images": len(er.gallery_status),
        "probe_failures": sum(p.values()),
        "probe_failures_by_code": dict(sorted(p.items())),
        "probes": len(er.probe_status),
    }
