"""End-to-end throughput and latency through the real queue (redis-server, gateway, Celery workers,
three engines), on real faces from ``<data>/ci``.

    .venv/bin/python bench/pipeline.py --concurrency 1 4 --probes 40

Starts its own stack (embedded disk store, its own redis-server port, state in a temp dir), enrols the
ci gallery and distractors (320 images), then for each concurrency level keeps that many searches in
flight and prints: searches/s, median and p95 latency (submission to published list), and each
engine's median embed and search time as the engines report them. Stops the stack at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import redis

from quorum.accountability.registry import DEMO_AGENCY, DEMO_USER, provision_demo
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--probes", type=int, default=40, help="searches per concurrency level")
    ap.add_argument("--port", type=int, default=6395)
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="quorum-bench-")
    s = load_settings(home=home, redis_url=f"redis://127.0.0.1:{args.port}/0")
    stack = Stack(s)
    print(f"# pipeline bench: {platform.machine()}, {platform.python_version()}, store={s.store_kind}, home={home}")
    t0 = time.monotonic()
    stack.up()
    s = stack.s  # logged in as the admin user of the Redis the stack started (core.local_redis)
    print(f"stack up in {time.monotonic() - t0:.1f}s")
    try:
        secret = provision_demo(s)
        rows = read_split(args.data / "ci")
        gallery = [(r.identity, r.path) for r in rows if r.role in {"gallery", "distractor_gallery"}]
        rep = enrol(s, open_store(s), gallery)
        print(
            f"enrolled {rep.images} images x {len(s.engines)} engines in {rep.seconds:.1f}s "
            f"({rep.images * len(s.engines) / rep.seconds:.1f} templates/s)"
        )
        probes = [r.path for r in rows if r.role == "probe"]
        client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, secret)
        r = redis.Redis.from_url(s.redis_url)
        print(
            f"{'conc':>4} {'n':>4} {'searches/s':>10} {'lat_med_s':>9} {'lat_p95_s':>9}"
            "  engine medians (embed/search ms)"
        )
        for conc in args.concurrency:
            todo = list(probes[: args.probes])
            inflight: dict[str, float] = {}
            lat: list[float] = []
            rids: list[str] = []
            start = time.monotonic()
            while todo or inflight:
                while todo and len(inflight) < conc:
                    rid = client.submit(todo.pop(), case_number="BENCH-1", offence_code="DEMO", purpose="demo")
                    inflight[rid] = time.monotonic()
                    rids.append(rid)
                for rid in list(inflight):
                    if client.result(rid) is not None:
                        lat.append(time.monotonic() - inflight.pop(rid))
                time.sleep(0.01)
            wall = time.monotonic() - start
            per_engine: dict[str, dict[str, list[float]]] = {}
            for rid in rids:
                for e, raw in r.hgetall(keys.job_results_key(rid)).items():
                    res = json.loads(raw)
                    d = per_engine.setdefault(e.decode(), {"embed": [], "search": []})
                    d["embed"].append(res["embed_ms"])
                    d["search"].append(res["search_ms"])
            eng = "  ".join(
                f"{e} {statistics.median(v['embed']):.0f}/{statistics.median(v['search']):.1f}"
                for e, v in sorted(per_engine.items())
            )
            print(
                f"{conc:>4} {len(lat):>4} {len(lat) / wall:>10.2f} {statistics.median(lat):>9.2f} "
                f"{_pct(lat, 95):>9.2f}  {eng}",
                flush=True,
            )
    finally:
        stack.down()


if __name__ == "__main__":
    main()
