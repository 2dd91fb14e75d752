"""Resharding an engine's gallery (``gallery.reshard``) on fakeredis (with Lua) and the disk store, with
real HNSW replicas over synthetic unit vectors (the layouts, the writes to both of them and the build are
under test here, not accuracy):

- while a reshard runs, every add and every expunge of its version is written to both layouts' logs,
  counted once; an add whose writer looked before the reshard began is refused by the script and
  written again to both;
- each new shard is built from the old shards' snapshots and logs, holds exactly its subjects' templates
  (same labels, same vectors), and takes in what was enrolled and expunged after the reshard began, so
  nothing done during the reshard is lost; a subject expunged whose removal reached only the old layout
  is not copied.
"""

from __future__ import annotations

from types import SimpleNamespace

import fakeredis
import numpy as np
import pytest

from quorum.broker import keys
from quorum.core.objectstore import DiskStore
from quorum.gallery import reshard
from quorum.workers import replica as replica_mod
from quorum.workers.replica import GalleryReplica, log_add_entries, log_remove
from quorum.workers.shards import shard_of

DIM = 32
V = "eng-v1"


def _vecs(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def r():
    return fakeredis.FakeRedis()


@pytest.fixture
def store(tmp_path):
    return DiskStore(tmp_path / "objects")


def _enrol(r, subjects: list[str], vecs: np.ndarray, shards: int) -> list[int]:
    r.hset(keys.GALLERY_SUBJECTS, mapping={sj: "{}" for sj in subjects})
    return log_add_entries(r, "eng", V, subjects, vecs, [f"g/{sj}" for sj in subjects], shards=shards)


def _begin(r, old: int, new: int) -> None:
    r.hset(keys.gallery_reshard("eng"), mapping={"layout": f"{old}:{new}", "version": V})


def _ops(r, shard: int, shards: int, op: bytes) -> list[str]:
    entries = r.xrange(keys.gallery_log("eng", V, shard, shards))
    return [keys.as_str(f[b"subject"]) for _, f in entries if f[b"op"] == op]


def _replica(r, store, shard: int, shards: int) -> GalleryReplica:
    rep = GalleryReplica(
        "eng", V, DIM, r, store, m=16, ef_construction=100, ef_search=200, capacity=64, shard=shard, shards=shards
    )
    rep.load_snapshot()
    rep.sync()
    return rep


def test_writes_during_a_reshard_go_to_both_layouts_and_are_counted_once(r):
    _begin(r, 2, 4)
    subjects = [f"p{i}" for i in range(30)]
    _enrol(r, subjects, _vecs(30, 1), shards=2)
    for count in (2, 4):
        seen = [sj for i in range(count) for sj in _ops(r, i, count, b"add")]
        assert sorted(seen) == sorted(subjects)
        assert all(shard_of(sj, count) == i for i in range(count) for sj in _ops(r, i, count, b"add"))
    assert int(r.hget(keys.gallery_versions("eng"), V)) == 30
    r.hdel(keys.GALLERY_SUBJECTS, "p3")
    assert log_remove(r, "eng", "p3", "court order", shards=2) == 1
    assert _ops(r, shard_of("p3", 2), 2, b"remove") == ["p3"] and _ops(r, shard_of("p3", 4), 4, b"remove") == ["p3"]
    assert int(r.hget(keys.gallery_versions("eng"), V)) == 29
    # Another version (a reindex's) is not doubled.
    r.hset(keys.GALLERY_SUBJECTS, "q2", "{}")
    log_add_entries(r, "eng", "eng-v2", ["q2"], _vecs(1, 3), ["g/q2"], shards=2)
    assert not r.exists(keys.gallery_log("eng", "eng-v2", shard_of("q2", 4), 4))


def test_a_writer_that_looked_before_the_reshard_began_writes_again_to_both(r, monkeypatch):
    real = replica_mod.reshard_layouts
    looks = []

    def stale_first(*a, **kw):
        looks.append(1)
        return ("", (2,)) if len(looks) == 1 else real(*a, **kw)  # the first look predates the reshard

    _begin(r, 2, 4)
    monkeypatch.setattr(replica_mod, "reshard_layouts", stale_first)
    _enrol(r, ["a", "b", "c"], _vecs(3, 4), shards=2)
    assert len(looks) == 2  # refused by the script (RESHARD_CHANGED), then written with the fresh look
    assert sorted(sj for i in range(4) for sj in _ops(r, i, 4, b"add")) == ["a", "b", "c"]
    assert sorted(sj for i in range(2) for sj in _ops(r, i, 2, b"add")) == ["a", "b", "c"]


def test_new_shards_hold_their_subjects_and_what_was_done_during_the_reshard(r, store):
    s = SimpleNamespace(hnsw_m=16, hnsw_ef_construction=100, hnsw_ef_search=200, gallery_capacity=64)
    subjects = [f"p{i}" for i in range(40)]
    vecs = _vecs(40, 5)
    labels = dict(zip(subjects, _enrol(r, subjects, vecs, shards=2), strict=True))
    _replica(r, store, 0, 2).save_snapshot()  # shard 0 from its snapshot (and log), shard 1 from its log only
    _enrol(r, ["late0"], _vecs(1, 6), shards=2)  # before the reshard, after the snapshot
    # An expunge that looked before the reshard began: its removal reached the old layout only.
    r.hdel(keys.GALLERY_SUBJECTS, "p7")
    gone_before = subjects.index("p7")
    _begin(r, 2, 4)
    r.xadd(keys.gallery_log("eng", V, shard_of("p7", 2), 2), {"op": "remove", "subject": "p7", "reason": "x"})
    # An expunge caught between deleting the record and writing its removal (which will reach the old
    # layout only): the build must not copy the subject.
    r.hdel(keys.GALLERY_SUBJECTS, "p9")
    # During the reshard: an enrolment and an expunge (written to both layouts).
    new_vec = _vecs(1, 7)
    _enrol(r, ["during"], new_vec, shards=2)
    r.hdel(keys.GALLERY_SUBJECTS, "p11")
    log_remove(r, "eng", "p11", "court order", shards=2)
    report = reshard.ReshardReport("eng", V, 2, 4)
    built = [reshard._build_shard(s, store, r, report, j) for j in range(4)]
    # After the build, before the switch: still written to both, applied by the new shards' replicas.
    _enrol(r, ["after"], _vecs(1, 8), shards=2)
    new = [_replica(r, store, j, 4) for j in range(4)]
    want = (set(subjects) - {"p7", "p9", "p11"}) | {"late0", "during", "after"}
    held = [set(rep.index.subject_labels) for rep in new]
    assert set().union(*held) == want and sum(len(h) for h in held) == len(want)
    assert all(shard_of(sj, 4) == j for j, h in enumerate(held) for sj in h)
    assert sum(b["templates"] for b in built) == len(want) - 1  # "after" came after the snapshots
    # Same labels and vectors: each template is found by its own vector with score 1.
    for sj in ("p0", "p20", "during"):
        rep = new[shard_of(sj, 4)]
        vec = new_vec[0] if sj == "during" else vecs[subjects.index(sj)]
        hit = rep.index.search(vec, 1)[0]
        assert hit.subject_id == sj and hit.score == pytest.approx(1.0, abs=1e-5)
        if sj != "during":
            assert labels[sj] in rep.index.subject_labels[sj]
    assert gone_before == 7 and report.dropped_no_record == 1  # p9 (p7's removal was applied: not seen)


def test_refusals_change_nothing(r, monkeypatch, tmp_path):
    s = SimpleNamespace(engines=("eng",), shards_of=lambda e: 2, redis_url="redis://fake", audit_database_url=None)
    monkeypatch.setattr(reshard, "connect", lambda url: r)
    _enrol(r, ["a"], _vecs(1, 9), shards=2)
    for engine, shards, why in (
        ("eng", 0, "at least 1 shard"),
        ("eng", 2, r"has 2 shard\(s\) already"),
        ("nosuch", 4, "not a configured engine"),
    ):
        with pytest.raises(reshard.GalleryRefused, match=why):
            reshard.begin(s, engine, shards)
        assert not r.exists(keys.gallery_reshard("eng"))
    # A reindex in progress: live reindex workers, or two versions held.
    r.hset(keys.gallery_versions("eng"), "eng-v2", 3)
    with pytest.raises(reshard.GalleryRefused, match="templates of 2 versions"):
        reshard.begin(s, "eng", 4)
    assert not r.exists(keys.gallery_reshard("eng"))
    r.hdel(keys.gallery_versions("eng"), "eng-v2")
    from quorum.broker import liveness

    liveness.heartbeat(r, keys.reindex_alive("eng"), "node-r", ttl_s=30, version="eng-v2")
    with pytest.raises(reshard.GalleryRefused, match="being reindexed"):
        reshard.begin(s, "eng", 4)
    assert not r.exists(keys.gallery_reshard("eng"))
    # Another reshard of the engine in progress, to another count.
    liveness.leave(r, keys.reindex_alive("eng"), "node-r")
    _begin(r, 2, 8)
    with pytest.raises(reshard.GalleryRefused, match="2 -> 8 is in progress"):
        reshard.begin(s, "eng", 4)
    assert keys.as_str(r.hget(keys.gallery_reshard("eng"), "layout")) == "2:8"
