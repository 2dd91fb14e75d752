"""A probe end to end through the queue against a large sharded gallery, latency by stage (issue 12,
benchmark 3).

    .venv/bin/python bench/sharded_e2e.py --synthetic 1000000 --shards 2 --probes 30

The gallery: ``--synthetic`` SYNTHETIC vectors (random unit vectors drawn around cluster centres, as in
bench/index_1m.py: they stand in for templates, they are not faces) split over ``--shards`` shards
of SFace by ``workers.shards.shard_of`` and written as each shard's snapshot, plus the real ci gallery
(120 people, 320 images) enrolled through the pipeline on top, so every real probe has its mate among
a million templates. A local stack runs SFace only (intake, the SFace embed worker, one worker per
shard, fusion); real ci probes are searched one at a time.

Per probe: total latency (gateway receipt to published list, as the list reports it), intake (fetch,
decode, detect), embed, the slowest shard's search, and the rest: queues, scatter/gather, merge,
fusion, audit and publication. Prints medians and the overhead as a share of engine compute
(intake + embed + slowest shard), and whether the mate was rank 1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import redis
from prometheus_client.parser import text_string_to_metric_families

from quorum.accountability.registry import DEMO_AGENCY, DEMO_USER, provision_demo
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList, EngineResult
from quorum.schemas.job import Job
from quorum.workers.index import GalleryIndex
from quorum.workers.replica import GalleryReplica
from quorum.workers.shards import shard_of


def synthetic(n: int, dim: int, seed: int = 11) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 1000), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_shard_snapshots(s, version: str, n: int, shards: int) -> float:
    """Build each shard's index from synthetic vectors and store it as that shard's snapshot."""
    store = open_store(s)
    vecs = synthetic(n, 128)
    ids = [f"synthetic-{i:08d}" for i in range(n)]
    which = np.array([shard_of(i, shards) for i in ids])
    t0 = time.monotonic()
    for sh in range(shards):
        mine = np.flatnonzero(which == sh)
        idx = GalleryIndex(
            128,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            capacity=len(mine) + 10_000,
        )
        idx.add([int(i) + 10_000_000 for i in mine], [ids[i] for i in mine], vecs[mine])
        rep = GalleryReplica(
            "sface",
            version,
            128,
            redis.Redis.from_url(s.redis_url),
            store,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            capacity=16,
            shard=sh,
            shards=shards,
        )
        rep.index = idx
        rep.save_snapshot()
        print(f"  shard {sh}: {len(mine)} synthetic templates, built and stored ({time.monotonic() - t0:.0f}s)")
    return time.monotonic() - t0


def queue_waits(base: int, ports: int) -> dict[str, tuple[float, float, float]]:
    """quorum_task_queue_wait_seconds summed over the stack's processes: task -> (count, mean, p50), the
    p50 interpolated within its histogram bucket as Prometheus's histogram_quantile does."""
    buckets: dict[str, dict[float, float]] = {}
    sums: dict[str, float] = {}
    for port in range(base, base + ports):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            continue
        for fam in text_string_to_metric_families(text):
            if fam.name != "quorum_task_queue_wait_seconds":
                continue
            for smp in fam.samples:
                task = smp.labels["task"]
                if smp.name.endswith("_sum"):
                    sums[task] = sums.get(task, 0.0) + smp.value
                elif smp.name.endswith("_bucket"):
                    b = buckets.setdefault(task, {})
                    le = float(smp.labels["le"])
                    b[le] = b.get(le, 0.0) + smp.value
    out = {}
    for task, b in buckets.items():
        edges = sorted(b)
        n = b[float("inf")]
        if not n:
            continue
        half, lo, prev = n / 2, 0.0, 0.0
        p50 = edges[-2]
        for le in edges:
            if b[le] >= half:
                p50 = lo + (le - lo) * (half - prev) / max(b[le] - prev, 1e-9) if le != float("inf") else lo
                break
            lo, prev = le, b[le]
        out[task] = (n, sums.get(task, 0.0) / n, p50)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--synthetic", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--port", type=int, default=6398)
    ap.add_argument("--metrics-base", type=int, default=9640, help="first /metrics port of the stack's processes")
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="quorum-bench-e2e-")
    s = load_settings(
        home=home,
        redis_url=f"redis://127.0.0.1:{args.port}/0",
        engines="sface",
        shards={"sface": args.shards},
        gallery_capacity=16,
    )
    print(
        f"# sharded e2e bench: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"{args.synthetic} synthetic + ci gallery, sface in {args.shards} shards, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    from quorum.workers.engines import get_engine

    version = get_engine("sface", device="cpu").version
    stack = Stack(s)
    stack.start_redis()
    s = stack.s  # logged in as the admin user of the Redis the stack started (core.local_redis)
    build_s = write_shard_snapshots(s, version, args.synthetic, args.shards)
    t0 = time.monotonic()
    stack.up(timeout=1800, metrics_base=args.metrics_base)
    print(f"snapshots built in {build_s:.0f}s; stack up (shards loaded) in {time.monotonic() - t0:.0f}s")
    try:
        rows = read_split(args.data / "ci")
        gallery = [(r.identity, r.path) for r in rows if r.role in {"gallery", "distractor_gallery"}]
        rep = enrol(s, open_store(s), gallery)
        print(f"real gallery enrolled through the pipeline: {rep.enrolled} in {rep.seconds:.0f}s")
        client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, provision_demo(s))
        r = redis.Redis.from_url(s.redis_url)
        probes = [p for p in rows if p.role == "probe"][: args.probes]
        rows_out = []
        for p in probes:
            rid = client.submit(p.path, case_number="BENCH-1", offence_code="DEMO", purpose="demo")
            res = client.wait(rid, timeout=600)
            assert isinstance(res, CandidateList), res
            job = Job.model_validate_json(r.get(keys.job_key(rid)))
            er = EngineResult.model_validate_json(r.hget(keys.job_results_key(rid), "sface"))
            compute = (job.intake_ms or 0) + er.embed_ms + er.search_ms
            rows_out.append(
                {
                    "total": res.duration_ms,
                    "intake": job.intake_ms or 0,
                    "embed": er.embed_ms,
                    "shard_search": er.search_ms,
                    "overhead": res.duration_ms - compute,
                    "compute": compute,
                    "rank1": res.candidates[0].subject_id == p.identity,
                    "gallery": er.gallery_size,
                    "partial": bool(res.engines_partial),
                }
            )
        med = {
            k: statistics.median(x[k] for x in rows_out)
            for k in ("total", "intake", "embed", "shard_search", "overhead", "compute")
        }
        print(
            f"probes {len(rows_out)}; gallery subjects searched {rows_out[0]['gallery']}; "
            f"partial lists {sum(x['partial'] for x in rows_out)}; "
            f"rank-1 {sum(x['rank1'] for x in rows_out)}/{len(rows_out)}"
        )
        print("median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
        shares = [x["overhead"] / x["compute"] for x in rows_out]
        print(f"overhead / engine compute: median {statistics.median(shares):.2f} (per-probe ratio; target <= 0.15)")
        print("queue wait per hop (message sent -> task started), from every process's /metrics:")
        for task, (n, mean, p50) in sorted(queue_waits(args.metrics_base, 16 + args.shards).items()):
            print(f"  {task:<28} n {n:>4.0f}  mean {mean * 1000:7.1f} ms  p50 ~{p50 * 1000:6.1f} ms")
        info = r.info("memory")
        print(
            f"redis used_memory {info['used_memory'] / 2**20:.1f} MB; shard logs "
            + json.dumps({i: r.xlen(keys.gallery_log("sface", version, i, args.shards)) for i in range(args.shards)})
        )
    finally:
        stack.down()


if __name__ == "__main__":
    main()
