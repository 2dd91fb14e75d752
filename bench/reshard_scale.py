"""Resharding at scale: an engine's gallery of N templates rebuilt from S to S' shards by
``gallery.reshard`` (the code ``quorum gallery reshard`` runs), from snapshots and logs, nothing embedded.

Synthetic 128-d unit vectors (SFace's dimension; random, labelled as such: the layouts and the build are
measured, not accuracy), written through the project's own log (``log_add_entries``), each old shard
snapshotted as the gallery worker would (so the build reads snapshots, as it does in a deployment, plus a
tail of log entries written after them). Real redis-server on loopback, the embedded disk object store,
the deployment's HNSW settings (M 32, ef_construction 200). Reports the time per new shard, the peak RSS
of this process (one old and one new shard in memory at a time), and checks that every template landed in
its subject's new shard with its label.

    PYTHONPATH=. .venv/bin/python bench/reshard_scale.py --templates 200000 --old 2 --new 4
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from quorum.broker import keys
from quorum.broker.redis_errors import connect
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.gallery import reshard
from quorum.workers.replica import GalleryReplica, log_add_entries
from quorum.workers.shards import shard_of
from tests.integration.servers import RedisServer

VERSION = "synthetic-128d"
DIM = 128


def _replica(s, r, store, shard: int, shards: int) -> GalleryReplica:
    return GalleryReplica.for_settings(s, "sface", VERSION, DIM, r, store, shard=shard, shards=shards)


def fill(s, r, n: int, old: int, tail: int) -> float:
    """Write n templates (n - tail before the old shards' snapshots, tail after), one subject each."""
    t0 = time.monotonic()
    rng = np.random.default_rng(0)
    for start in range(0, n, 5000):
        subjects = [f"subject-{i:08d}" for i in range(start, min(n, start + 5000))]
        r.hset(keys.GALLERY_SUBJECTS, mapping=dict.fromkeys(subjects, "{}"))
        vecs = rng.standard_normal((len(subjects), DIM)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        log_add_entries(r, "sface", VERSION, subjects, vecs, [f"g/{sj}" for sj in subjects], shards=old)
        if start + 5000 >= n - tail and not getattr(fill, "snapped", False):
            fill.snapped = True  # type: ignore[attr-defined]
            for i in range(old):
                _replica(s, r, open_store(s), i, old).save_snapshot()
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--templates", type=int, default=200_000)
    ap.add_argument("--old", type=int, default=2)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--tail", type=int, default=5000, help="templates written after the old snapshots")
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.machine()}, {time.strftime('%Y-%m-%d')}; synthetic {DIM}-d vectors")
    with tempfile.TemporaryDirectory() as tmp:
        redis_server = RedisServer(Path(tmp) / "redis").start()
        try:
            s = load_settings(
                env={}, home=tmp, redis_url=redis_server.url, engines=("sface",), shards={"sface": args.old}
            )
            r, store = connect(s.redis_url), open_store(s)
            fill_s = fill(s, r, args.templates, args.old, args.tail)
            print(f"filled {args.templates:,} templates in {args.old} shards (with their snapshots) in {fill_s:.0f} s")
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            reshard.begin(s, "sface", args.new, actor="bench")
            report = reshard.build(s, store, "sface", actor="bench")
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print("| new shard | templates | seconds |")
            print("|---|---|---|")
            for b in report.built:
                print(f"| {b['shard']} of {args.new} | {b['templates']:,} | {b['seconds']:.1f} |")
            total = sum(b["templates"] for b in report.built)
            print(
                f"build {args.old} -> {args.new}: {total:,} templates in {report.seconds:.1f} s "
                f"({total / report.seconds:,.0f} templates/s); peak RSS {rss1:,.0f} MB (before it {rss0:,.0f} MB)"
            )
            for j in range(args.new):  # every template in its subject's new shard
                rep = _replica(s, r, store, j, args.new)
                rep.load_snapshot()
                assert all(shard_of(sj, args.new) == j for sj in rep.index.subject_labels)
            assert total == args.templates, (total, args.templates)
            print("checked: every template in its subject's new shard, none lost")
        finally:
            redis_server.stop()


if __name__ == "__main__":
    main()
