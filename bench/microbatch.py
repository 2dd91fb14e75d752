"""Micro-batching of embeds (issue 12): one engine worker draining a backlog of real probes with shared
model calls (``embed_batch`` tasks at once, workers.batching) against one at a time (``embed_batch=1``,
the solo pool), side by side in one run; and a lone probe's latency in both modes.

    .venv/bin/python bench/microbatch.py --engine sface --probes 120 --rounds 3 --batch 1 8

Starts its own stack running one engine (so engines do not fight over the cores), enrols the ci gallery
and distractors, then for each round and each batch setting (alternating, so drift on a shared machine
hits both alike): stops the engine worker, submits ``--probes`` real probes (ci probe images) and waits
until intake has queued every one for the engine, starts the engine worker with that setting and times
the backlog from the first published answer to the last (answers/s: the engine's throughput when it has
work queued). The worker's /metrics give the mean faces per model call. After each backlog, ``--lone``
probes one after another to the worker it warmed (nothing else in flight): median submission-to-answer
latency, where micro-batching must add no wait. Prints medians over rounds and the ratio of the batched
setting to ``embed_batch=1``.
"""

from __future__ import annotations

import argparse
import platform
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from quorum.accountability.registry import DEMO_AGENCY, DEMO_USER, provision_demo
from quorum.broker.app import engine_queue
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol


def _metric(port: int, name: str) -> float:
    """A sample (e.g. ``quorum_embed_batch_faces_count``) summed over its label sets, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        families = text_string_to_metric_families(resp.read().decode())
        return sum(smp.value for fam in families for smp in fam.samples if smp.name == name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--engine", default="sface")
    ap.add_argument("--probes", type=int, default=120, help="probes in each backlog")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="embed_batch settings compared")
    ap.add_argument("--lone", type=int, default=15, help="probes sent one at a time per setting")
    ap.add_argument("--port", type=int, default=6396)
    ap.add_argument("--metrics-port", type=int, default=9570)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out

    home = tempfile.mkdtemp(prefix="quorum-bench-mb-")
    base = {"home": home, "redis_url": f"redis://127.0.0.1:{args.port}/0", "engines": args.engine}
    s = load_settings(**base)
    stack = Stack(s)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(
        f"# microbatch bench: {platform.machine()}, python {platform.python_version()}, engine {args.engine}, "
        f"{args.probes} probes x {args.rounds} rounds, settings {args.batch}, {when}"
    )
    stack.up(supervise=False)
    s = stack.s  # logged in as the admin user of the Redis the stack started (core.local_redis)
    try:
        secret = provision_demo(s)
        rows = read_split(args.data / "ci")
        gallery = [(r.identity, r.path) for r in rows if r.role in {"gallery", "distractor_gallery"}]
        rep = enrol(s, open_store(s), gallery)
        print(f"enrolled {rep.images} images in {rep.seconds:.1f}s")
        probes = [r.path for r in rows if r.role == "probe"]
        client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, secret)
        r = redis.Redis.from_url(s.redis_url)
        queue = engine_queue(args.engine)

        def switch(batch: int) -> None:
            nonlocal stack
            stack.stop_process(args.engine)
            stack = Stack(load_settings(**base, embed_batch=batch))
            stack.start_process(args.engine, metrics_port=args.metrics_port)

        def backlog(batch: int) -> tuple[float, float]:
            stack.stop_process(args.engine)
            rids = [
                client.submit(probes[i % len(probes)], case_number="BENCH-MB-1", offence_code="DEMO", purpose="demo")
                for i in range(args.probes)
            ]
            deadline = time.monotonic() + 300
            while r.llen(queue) < args.probes:  # intake has prepared every probe and queued its search
                if time.monotonic() > deadline:
                    raise RuntimeError(f"intake queued {r.llen(queue)} of {args.probes} searches in 300 s")
                time.sleep(0.05)
            switch(batch)
            done: dict[str, float] = {}
            deadline = time.monotonic() + 600
            while len(done) < len(rids):
                for rid in rids:
                    if rid not in done and client.result(rid) is not None:
                        done[rid] = time.monotonic()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(done)} of {len(rids)} answered in 600 s")
                time.sleep(0.002)
            t = sorted(done.values())
            calls = _metric(args.metrics_port, "quorum_embed_batch_faces_count")
            faces = _metric(args.metrics_port, "quorum_embed_batch_faces_sum")
            return (len(t) - 1) / (t[-1] - t[0]), (faces / calls if calls else 1.0)

        def lone() -> float:  # the worker the backlog just warmed, with nothing else in flight
            lat = []
            for p in probes[: args.lone]:
                t0 = time.monotonic()
                rid = client.submit(p, case_number="BENCH-MB-1", offence_code="DEMO", purpose="demo")
                while client.result(rid) is None:
                    time.sleep(0.002)
                lat.append(time.monotonic() - t0)
            return statistics.median(lat)

        rate: dict[int, list[float]] = {b: [] for b in args.batch}
        mean_batch: dict[int, list[float]] = {b: [] for b in args.batch}
        lone_lat: dict[int, list[float]] = {b: [] for b in args.batch}
        print(f"{'round':>5} {'embed_batch':>11} {'answers/s':>9} {'faces/call':>10} {'lone_p50_ms':>11}", flush=True)
        for rnd in range(args.rounds):
            for b in args.batch:
                rps, fpc = backlog(b)
                rate[b].append(rps)
                mean_batch[b].append(fpc)
                lone_lat[b].append(lone())
                print(f"{rnd:>5} {b:>11} {rps:>9.2f} {fpc:>10.2f} {lone_lat[b][-1] * 1000:>11.1f}", flush=True)
        ref = args.batch[0]
        print("\nsummary (medians over rounds)")
        print(f"{'embed_batch':>11} {'answers/s':>9} {'ratio':>6} {'faces/call':>10} {'lone_p50_ms':>11}")
        for b in args.batch:
            med = statistics.median(rate[b])
            print(
                f"{b:>11} {med:>9.2f} {med / statistics.median(rate[ref]):>6.2f} "
                f"{statistics.median(mean_batch[b]):>10.2f} {statistics.median(lone_lat[b]) * 1000:>11.1f}"
            )
    finally:
        stack.down()


if __name__ == "__main__":
    main()
