"""What an engine costs: wall-clock embed time per face, measured on faces of the evaluated data.

:func:`embed_ms_per_face` decodes ``n`` images, takes their faces from the embedding cache (the
production detector already found them), and times each engine's ``embed_batch`` on the same faces in
batches of ``batch`` (production micro-batches up to 8). It reports the best of ``repeats`` passes per
engine (the minimum is the least disturbed by other jobs on a shared machine), in milliseconds per
face, twice: CPU time of the process (all its threads: the compute an engine costs, and what the
table's cost column uses; on a machine shared with other jobs it is far steadier than wall time) and
wall-clock time. Detection (YuNet) is shared by all engines and not included. Engines are timed one after the
other, interleaved pass by pass, so that a burst of load on the machine hits all of them alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .cache import OK, EmbeddingCache, detector_id


def embed_ms_per_face(
    paths: Sequence[Path],
    engines: Sequence[str],
    cache_dir: Path | str,
    *,
    n: int = 32,
    batch: int = 8,
    repeats: int = 3,
) -> dict[str, dict]:
    """Engine -> {"ms_per_face" (CPU), "wall_ms_per_face", the passes, "faces", "batch"} on the first ``n`` images of
    ``paths`` whose face is in the cache (call after the cache is filled)."""
    from ..core.config import settings
    from ..workers.engines import get_engine
    from ..workers.faces import Face
    from ..workers.images import decode_image

    s = settings()
    cache = EmbeddingCache(cache_dir)
    keys = cache.keys(list(paths))
    faces = cache.faces(detector_id(), keys)
    items: list[tuple[np.ndarray, Face]] = []
    for p, k in zip(paths, keys, strict=True):
        if len(items) >= n:
            break
        rec = faces.get(k)
        if rec is None or rec[0] != OK or rec[1] is None:
            continue
        img = decode_image(p.read_bytes(), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        items.append((img, Face.from_dict(json.loads(rec[1]))))
    if not items:
        raise ValueError("no cached faces to time: fill the embedding cache first")
    engs = {e: get_engine(e) for e in engines}
    for eng in engs.values():  # warm-up: sessions, first-call allocations
        eng.embed_batch(items[:batch])
    cpu: dict[str, list[float]] = {e: [] for e in engs}
    wall: dict[str, list[float]] = {e: [] for e in engs}
    for _ in range(repeats):
        for e, eng in engs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for start in range(0, len(items), batch):
                eng.embed_batch(items[start : start + batch])
            cpu[e].append(1000.0 * (time.process_time() - c0) / len(items))
            wall[e].append(1000.0 * (time.perf_counter() - t0) / len(items))
    return {
        e: {
            "ms_per_face": round(min(cpu[e]), 2),
            "cpu_ms_per_face_passes": [round(x, 2) for x in cpu[e]],
            "wall_ms_per_face": round(min(wall[e]), 2),
            "wall_ms_per_face_passes": [round(x, 2) for x in wall[e]],
            "faces": len(items),
            "batch": batch,
        }
        for e in engs
    }
