"""Enrolment throughput through the pipeline against the raw model, and one embed worker against two
(issue 12, benchmarks 4 and 5), on real faces.

    .venv/bin/python bench/enrol_throughput.py --engine sface --images 600 --workers 1 2

Raw: this process decodes, detects (YuNet) and embeds (the engine's ``embed_batch``, batches of 16)
every image, one thread, as a worker process does. Pipeline: for each worker count W, a fresh local
stack running only that engine, with W intake workers (detection) and W engine workers (embedding),
enrols the same images with ``quorum enroll``'s code path (upload, detect once, embed, append to the
gallery log); images/s from the enrolment's own clock. Also prints Redis memory after each enrolment
and the gallery log's length. One engine alone, so engines do not fight over the cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the stack's worker processes run

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from quorum.broker import keys
from quorum.cli.stack import Stack
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.gallery.items import IMAGE_SUFFIXES


def _images(data: Path, n: int) -> list[tuple[str, Path]]:
    """The first ``n`` images of lfw-dev (or ci) as (subject, path), subjects in name order."""
    root = data / "lfw-dev" / "faces" if (data / "lfw-dev" / "faces").is_dir() else data / "ci" / "faces"
    out: list[tuple[str, Path]] = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        for img in sorted(d.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                out.append((d.name, img))
                if len(out) == n:
                    return out
    return out


def raw(engine_name: str, items: list[tuple[str, Path]], batch: int = 16) -> float:
    from quorum.workers.detect import Detector, choose_face
    from quorum.workers.engines import get_engine
    from quorum.workers.images import decode_image

    det = Detector()
    eng = get_engine(engine_name, device="cpu")
    eng.embed_batch([])  # loaded
    t0 = time.perf_counter()
    done = 0
    for i in range(0, len(items), batch):
        faced = []
        for _, path in items[i : i + batch]:
            img = decode_image(path.read_bytes(), max_bytes=15 << 20, max_pixels=40_000_000)
            try:
                faced.append((img, choose_face(det.detect(img), None, min_face_pixels=20)[1]))
            except Exception:
                continue
        if faced:
            vecs = eng.embed_batch(faced)
            assert np.isfinite(vecs).all()
            done += len(faced)
    return len(items) / (time.perf_counter() - t0)


def pipeline(engine: str, items: list[tuple[str, Path]], workers: int, port: int) -> tuple[float, dict]:
    home = tempfile.mkdtemp(prefix="quorum-bench-enrol-")
    s = load_settings(home=home, redis_url=f"redis://127.0.0.1:{port}/0", engines=engine)
    stack = Stack(s)
    stack.up()
    s = stack.s  # logged in as the admin user of the Redis the stack started (core.local_redis)
    try:
        for i in range(1, workers):
            stack.start_process("intake", i)
            stack.start_process(engine, i)
        _wait_workers(s.redis_url, {"intake": workers, engine: workers})
        rep = enrol(s, open_store(s), items, batch=16, window=8 * workers)
        r = redis.Redis.from_url(s.redis_url)
        info = r.info("memory")
        extra = {
            "enrolled": rep.enrolled.get(engine, 0),
            "failed": len(rep.failed.get(engine, [])),
            "seconds": rep.seconds,
            "redis_used_mb": info["used_memory"] / 2**20,
            "log_entries": sum(
                r.xlen(keys.gallery_log(engine, keys.as_str(v))) for v in r.hkeys(keys.gallery_versions(engine))
            ),
        }
        return (rep.images / rep.seconds), extra
    finally:
        stack.down()


def _wait_workers(url: str, want: dict[str, int], timeout: float = 300) -> None:
    """Until Celery ping answers from ``want[role]`` workers of each role (their models loaded)."""
    from quorum.broker.app import make_app

    app = make_app(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        nodes = [next(iter(rep)) for rep in app.control.ping(timeout=1.0) or []]
        if all(sum(n.startswith(f"{role}@") for n in nodes) >= k for role, k in want.items()):
            return
        time.sleep(1)
    raise RuntimeError(f"workers not ready: {want}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--engine", default="sface")
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--port", type=int, default=6397)
    args = ap.parse_args()
    items = _images(args.data, args.images)
    print(
        f"# enrolment bench: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"engine={args.engine}, images={len(items)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    raw_rate = raw(args.engine, items)
    print(f"raw (decode + detect + embed_batch, one process): {raw_rate:.1f} images/s")
    rates = {}
    for w in args.workers:
        rate, extra = pipeline(args.engine, items, w, args.port + w)  # a fresh redis-server each
        rates[w] = rate
        print(
            f"pipeline, {w} intake + {w} {args.engine} worker(s): {rate:.1f} images/s "
            f"({rate / raw_rate:.2f}x raw); enrolled {extra['enrolled']}, failed {extra['failed']}, "
            f"{extra['seconds']:.1f}s; redis {extra['redis_used_mb']:.1f} MB, log {extra['log_entries']} entries"
        )
    if 1 in rates and 2 in rates:
        print(f"two workers against one: {rates[2] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
