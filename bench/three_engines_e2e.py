"""Three engines searched together through the queue, each against a large sharded gallery (issue 18,
item 5).

    PYTHONPATH=. .venv/bin/python bench/three_engines_e2e.py --sface 1000000 --facenet 250000 --arcface 250000

The galleries: per engine, SYNTHETIC templates sampled from a Gaussian model fitted to that engine's real
templates of the ci faces (bench/fit_templates.py -> bench/results/fitted-templates.npz; they stand in for
booking photos, they are not faces), one synthetic person each, the same person ids in every engine, split
by ``shard_of`` over ``--shards`` shards and written as each shard's snapshot in the project's own format
(shards built in parallel worker processes, HNSW M 32 / ef_construction 200 as deployed); then the real ci
gallery enrolled through the pipeline on top, so real probes have real mates. A local stack runs SFace,
FaceNet and ArcFace, each sharded (an embed worker and one worker per shard: the shard workers never load
the model), and real ci probes are searched one at a time.

Reports: per probe latency (median, p95) in total and by hop (intake; each engine's embed and slowest
shard; the rest), queue wait per hop; each shard snapshot's load time (measured here, one at a time) and
the RSS of every worker process; Redis memory; and rank-1 of the real probes, fused and per engine, against
the same probes' vectors searched offline in the ci gallery alone (the cost of the distractors).
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import redis

from bench.index_1m import FITTED, FittedModel
from bench.sharded_e2e import queue_waits
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
from quorum.workers.engines import engine_identity
from quorum.workers.fusion import Ranked, fuse, load_calibration, resolve_method
from quorum.workers.index import GalleryIndex, _vec_from_bytes
from quorum.workers.replica import GalleryReplica
from quorum.workers.shards import shard_of

ENGINES = ("sface", "facenet", "arcface")
# Each engine's Gaussian model of its real ci templates (bench/fit_templates.py).
MODELS = {"sface": FITTED, "arcface": FITTED, "facenet": FITTED.with_name("fitted-templates-facenet.npz")}
LABEL_BASE = 10_000_000  # synthetic labels, clear of the enrolment counter's


def _shard_ids(n: int, shards: int, shard: int) -> np.ndarray:
    return np.array([i for i in range(n) if shard_of(f"synthetic-{i:08d}", shards) == shard], dtype=np.int64)


def build_shard(task: tuple) -> dict:
    """One engine's shard: its synthetic people's templates, built and stored as the shard's snapshot."""
    settings_json, engine, n, shards, shard, seed = task
    s = load_settings(env={}, **json.loads(settings_json))
    model = FittedModel.load(MODELS[engine], engine)
    rng = np.random.default_rng(seed)
    mine = _shard_ids(n, shards, shard)
    t0 = time.monotonic()
    vecs = np.empty((len(mine), model.dim), dtype=np.float32)
    people_rng = np.random.default_rng(seed + 1)
    for start in range(0, n, 100_000):  # every person drawn in order, so the ids mean the same in each shard
        people = model.photos(model.identities(min(100_000, n - start), people_rng), rng)
        sel = mine[(mine >= start) & (mine < start + len(people))]
        vecs[np.searchsorted(mine, sel)] = people[sel - start]
    idx = GalleryIndex(
        model.dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=s.hnsw_ef_search, capacity=len(mine)
    )
    idx.add([LABEL_BASE + int(i) for i in mine], [f"synthetic-{i:08d}" for i in mine], vecs)
    version, dim = engine_identity(engine, s)
    rep = GalleryReplica(
        engine,
        version,
        dim,
        redis.Redis.from_url(s.redis_url),
        open_store(s),
        m=s.hnsw_m,
        ef_construction=s.hnsw_ef_construction,
        ef_search=s.hnsw_ef_search,
        capacity=16,
        shard=shard,
        shards=shards,
    )
    rep.index = idx
    pointer = rep.save_snapshot()
    return {
        "engine": engine,
        "shard": shard,
        "templates": len(mine),
        "build_s": round(time.monotonic() - t0, 1),
        "index_key": pointer["index_key"],
        "meta_key": pointer["meta_key"],
    }


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ci_indexes(s, r, shards: int) -> dict[str, GalleryIndex]:
    """Per engine, an index of the real ci templates only (the adds in the shard logs, after the snapshots)."""
    out = {}
    for engine in ENGINES:
        version, dim = engine_identity(engine, s)
        idx = GalleryIndex(dim, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=s.hnsw_ef_search)
        for sh in range(shards):
            adds = [f for _, f in r.xrange(keys.gallery_log(engine, version, sh, shards)) if f[b"op"] == b"add"]
            if adds:
                idx.add(
                    [int(f[b"label"]) for f in adds],
                    [f[b"subject"].decode() for f in adds],
                    np.stack([_vec_from_bytes(f[b"vec"], dim) for f in adds]),
                )
        out[engine] = idx
    return out


def _run_probes(s, client, r, probes) -> list[dict]:
    rows = []
    for p in probes:
        rid = client.submit(p.path, case_number="BENCH-3", offence_code="DEMO", purpose="demo")
        res = client.wait(rid, timeout=900)
        assert isinstance(res, CandidateList), res
        job = Job.model_validate_json(r.get(keys.job_key(rid)))
        per = {e: EngineResult.model_validate_json(r.hget(keys.job_results_key(rid), e)) for e in ENGINES}
        vectors = {e: np.frombuffer(r.hget(keys.job_vector_key(rid, e), "vec"), dtype="<f4").copy() for e in ENGINES}
        rank1 = {e: bool(per[e].candidates) and per[e].candidates[0].subject_id == p.identity for e in ENGINES}
        compute = (job.intake_ms or 0) + max(per[e].embed_ms + per[e].search_ms for e in ENGINES)
        rows.append(
            {
                "identity": p.identity,
                "total": res.duration_ms,
                "intake": job.intake_ms or 0,
                **{f"{e}_embed": per[e].embed_ms for e in ENGINES},
                **{f"{e}_shard": per[e].search_ms for e in ENGINES},
                "rest": res.duration_ms - compute,
                "fused_rank1": res.candidates[0].subject_id == p.identity,
                **{f"{e}_rank1": rank1[e] for e in ENGINES},
                "partial": bool(res.engines_partial) or res.degraded,
                "gallery": {e: per[e].gallery_size for e in ENGINES},
                "vectors": vectors,
                "versions": {e: per[e].engine_version for e in ENGINES},
            }
        )
    return rows


def _ci_only(s, rows: list[dict], indexes: dict[str, GalleryIndex]) -> dict[str, float]:
    """Rank-1 of the same probe vectors in the ci gallery alone, per engine and fused the way the stack does."""
    calibration = load_calibration()
    method = resolve_method(s.fusion_method, calibration)
    hits = {e: 0 for e in ENGINES} | {"fused": 0}
    for row in rows:
        lists = {}
        for e in ENGINES:
            found = indexes[e].search(row["vectors"][e], 250)
            hits[e] += bool(found) and found[0].subject_id == row["identity"]
            lists[e] = [Ranked(h.subject_id, i + 1, h.score) for i, h in enumerate(found)]
        fused = fuse(lists, 250, method, calibration=calibration, versions=row["versions"])
        hits["fused"] += bool(fused) and fused[0].subject_id == row["identity"]
    return {k: v / len(rows) for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    for e, n in (("sface", 1_000_000), ("facenet", 250_000), ("arcface", 250_000)):
        ap.add_argument(f"--{e}", type=int, default=n, help=f"synthetic templates in {e}'s gallery")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--probes", type=int, default=30)
    ap.add_argument("--build-processes", type=int, default=2)
    ap.add_argument("--port", type=int, default=6399)
    ap.add_argument("--metrics-base", type=int, default=9680)
    args = ap.parse_args()
    sizes = {e: getattr(args, e) for e in ENGINES}
    home = tempfile.mkdtemp(prefix="quorum-bench-3e-")
    shards = {e: args.shards for e in ENGINES}
    s = load_settings(
        home=home,
        redis_url=f"redis://127.0.0.1:{args.port}/0",
        engines=",".join(ENGINES),
        shards=shards,
        gallery_capacity=16,
    )
    print(
        f"# three engines e2e: {platform.machine()}, {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"SYNTHETIC fitted templates {sizes} + the ci gallery, {args.shards} shards each"
    )
    stack = Stack(s)
    stack.start_redis()
    s = stack.s
    settings_json = json.dumps({"home": home, "redis_url": s.redis_url, "engines": ",".join(ENGINES), "shards": shards})
    tasks = [
        (settings_json, e, sizes[e], args.shards, sh, 100 + i)
        for i, e in enumerate(ENGINES)
        for sh in range(args.shards)
    ]
    t0 = time.monotonic()
    built = []
    with ProcessPoolExecutor(args.build_processes) as pool:
        for out in pool.map(build_shard, tasks):
            built.append(out)
            print(
                f"  built {out['engine']} shard {out['shard']}: {out['templates']:,} templates in {out['build_s']} s",
                flush=True,
            )
    print(f"all shards built in {time.monotonic() - t0:.0f} s with {args.build_processes} processes")
    store = open_store(s)
    for b in built:  # load time of each snapshot, one at a time, as a starting shard worker loads it
        t1 = time.monotonic()
        GalleryIndex.from_bytes(store.get(b["index_key"]), json.loads(store.get(b["meta_key"])))
        b["load_s"] = round(time.monotonic() - t1, 1)
    t0 = time.monotonic()
    stack.up(timeout=3600, metrics_base=args.metrics_base)
    print(f"stack up, every shard loaded, in {time.monotonic() - t0:.0f} s")
    try:
        rows_ci = read_split(args.data / "ci")
        gallery = [(r.identity, r.path) for r in rows_ci if r.role in {"gallery", "distractor_gallery"}]
        rep = enrol(s, store, gallery)
        print(f"real ci gallery enrolled through the pipeline: {rep.enrolled} in {rep.seconds:.0f} s")
        client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, provision_demo(s))
        r = redis.Redis.from_url(s.redis_url)
        probes = [p for p in rows_ci if p.role == "probe"][: args.probes]
        rows = _run_probes(s, client, r, probes)
        _report(s, stack, r, rows, built, args)
    finally:
        stack.down()


def _report(s, stack, r, rows, built, args) -> None:
    def med(k):
        return statistics.median(x[k] for x in rows)

    def p95(k):
        return float(np.percentile([x[k] for x in rows], 95))

    print(
        f"probes {len(rows)}; gallery subjects per engine {rows[0]['gallery']}; "
        f"partial/degraded {sum(x['partial'] for x in rows)}"
    )
    print("| per probe (ms) | median | p95 |")
    print("|---|---:|---:|")
    for k in ["total", "intake", *(f"{e}_{w}" for e in ENGINES for w in ("embed", "shard")), "rest"]:
        print(f"| {k} | {med(k):.1f} | {p95(k):.1f} |")
    print("queue wait per hop (message sent -> task started):")
    for task, (n, mean, p50) in sorted(queue_waits(args.metrics_base, 40).items()):
        print(f"  {task:<28} n {n:>4.0f}  mean {mean * 1000:7.1f} ms  p50 ~{p50 * 1000:6.1f} ms")
    print("| shard | templates | build (s) | snapshot load (s) | worker RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for b in built:
        role = f"{b['engine']}.{b['shard']}of{args.shards}"
        pid = stack._alive(stack._pidfile(role))
        print(f"| {role} | {b['templates']:,} | {b['build_s']} | {b['load_s']} | {_rss_mb(pid) if pid else 0:.0f} |")
    for role in ("gateway", "intake", *ENGINES, "fusion", "gallery"):
        pid = stack._alive(stack._pidfile(role))
        print(f"  {role}: RSS {_rss_mb(pid) if pid else 0:.0f} MB")
    info = r.info("memory")
    print(f"redis used_memory {info['used_memory'] / 2**20:.1f} MB (peak {info['used_memory_peak'] / 2**20:.1f} MB)")
    live = {k: sum(x[f"{k}_rank1"] for x in rows) / len(rows) for k in ("fused", *ENGINES)}
    alone = _ci_only(s, rows, _ci_indexes(s, r, args.shards))
    print("| rank-1 of the real probes | with the synthetic distractors | ci gallery alone |")
    print("|---|---:|---:|")
    for k in ("fused", *ENGINES):
        print(f"| {k} | {live[k]:.3f} | {alone[k]:.3f} |")


if __name__ == "__main__":
    main()
