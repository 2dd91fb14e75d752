"""Filling the embedding cache: decode, detect (the configured detector, largest face) and embed every image.

:func:`fill_cache` does one shard in process (resumable); :func:`fill_cache_parallel` spreads the
shards over spawned processes, engine by engine. The detector and the engines are imported lazily.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cache import OK, EmbeddingCache, _embed_version, detector_id


def fill_cache(
    paths: Sequence[Path],
    engines: Sequence[str],
    cache_dir: Path | str,
    *,
    shard: int = 0,
    shards: int = 1,
    batch: int = 16,
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Detect and embed every image of ``paths[shard::shards]`` not yet in the cache (resumable)."""
    import cv2

    from ..core.config import settings
    from ..core.errors import QuorumError
    from ..workers.detect import choose_face, make_detector
    from ..workers.engines import get_engine
    from ..workers.faces import Face
    from ..workers.images import decode_image

    if threads:
        cv2.setNumThreads(threads)
    s = settings()
    cache = EmbeddingCache(cache_dir)
    det_id = detector_id()
    mine = list(paths)[shard::shards]
    keys = cache.keys(mine)
    faces: dict[str, tuple[str, str | None]] = cache.faces(det_id)
    engs = [get_engine(e) for e in engines]
    versions = {e.name: _embed_version(e.version, det_id) for e in engs}
    done = {e.name: cache.done(e.name, versions[e.name]) for e in engs}
    todo = [i for i, k in enumerate(keys) if k not in faces or any(k not in done[e.name] for e in engs)]
    detector = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(mine),
            initial=len(mine) - len(todo),
            desc=f"{'+'.join(engines)} {shard + 1}/{shards}",
            unit="img",
            position=shard,
            leave=True,
            mininterval=2.0,
            smoothing=0.05,
        )
    stats = {"images": len(mine), "computed": 0}
    for start in range(0, len(todo), batch):
        idx = todo[start : start + batch]
        decoded: dict[str, np.ndarray] = {}
        new_faces: list[tuple[str, str, str | None]] = []
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
                    detector = make_detector(s.detector, s.device)
                try:
                    _, face = choose_face(detector.detect(img), None, min_face_pixels=s.min_face_pixels)
                    rec: tuple[str, str | None] = (OK, json.dumps(face.to_dict()))
                except QuorumError as exc:
                    rec = (str(exc.code), None)
                faces[k] = rec
                new_faces.append((k, *rec))
        cache.put_faces(det_id, new_faces)
        for e in engs:
            items = [
                (keys[i], decoded[keys[i]], Face.from_dict(json.loads(faces[keys[i]][1] or "{}")))
                for i in idx
                if keys[i] not in done[e.name] and keys[i] in decoded and faces[keys[i]][0] == OK
            ]
            failed = [
                (keys[i], faces[keys[i]][0], None)
                for i in idx
                if keys[i] not in done[e.name] and keys[i] in faces and faces[keys[i]][0] != OK
            ]
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
    return fill_cache(
        paths, engines, cache_dir, shard=shard, shards=shards, progress=progress, threads=1 if shards > 1 else None
    )


def fill_cache_parallel(
    paths: Sequence[Path], engines: Sequence[str], cache_dir: Path | str, *, jobs: int = 1, progress: bool = True
) -> None:
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
