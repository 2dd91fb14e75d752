"""Two versions of one engine's gallery side by side (an engine upgrade, ``quorum gallery reindex``), on
fakeredis (with Lua) and the disk store, with real HNSW replicas over synthetic unit vectors (the keys,
trimming and the expunge rules are under test here, not accuracy):

- each version has its own log (one per shard) and its own snapshot pointer, so snapshots and trimming
  of one version never drop the other's entries;
- an add is written only while the subject's record exists, so an expunge (record deleted, then a
  removal in every version present) is never undone by an enrolment or reindex that was under way;
- the resumable batch loop shared by bulk enrolment and reindex skips, on a rerun, what a run that was
  interrupted finished.
"""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest

from quorum.broker import keys
from quorum.core.objectstore import DiskStore
from quorum.gallery.batches import run_batches
from quorum.workers.replica import GalleryReplica, enrolled_member, log_add_entries, log_remove, snapshot_prefix
from quorum.workers.shards import shard_of

DIM = 32
A, B = "eng-2021/align-x/flip0", "eng-2021/align-x/flip0+upgrade"


def _vecs(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def r():
    return fakeredis.FakeRedis()


@pytest.fixture
def store(tmp_path):
    return DiskStore(tmp_path / "objects")


def _record(r, *subjects: str) -> None:
    r.hset(keys.GALLERY_SUBJECTS, mapping={sj: "{}" for sj in subjects})


def _replica(r, store, version: str, shard: int = 0, shards: int = 1) -> GalleryReplica:
    return GalleryReplica(
        "eng", version, DIM, r, store, m=16, ef_construction=100, ef_search=200, capacity=64, shard=shard, shards=shards
    )


def _adds(r, key: str) -> list[str]:
    return [keys.as_str(f[b"subject"]) for _, f in r.xrange(key) if f[b"op"] == b"add"]


def test_each_version_has_its_own_logs_per_shard_and_snapshot_place():
    assert keys.gallery_log("eng", A) != keys.gallery_log("eng", B)
    assert keys.gallery_log("eng", A, 1, 3).startswith(keys.gallery_log("eng", A) + ":")
    assert keys.gallery_log("eng", A, 1, 3).endswith(":1of3")
    # Key- and path-safe, and distinct even where the safe characters agree.
    assert "/" not in keys.version_slug(A) and "+" not in keys.version_slug(B)
    assert keys.version_slug("a/b") != keys.version_slug("a_b")
    assert snapshot_prefix("eng", A) != snapshot_prefix("eng", B)
    assert snapshot_prefix("eng", A, 2, 4) == snapshot_prefix("eng", A) + "/shard-2of4"


def test_sharded_adds_land_in_their_versions_shard_logs_and_are_counted_per_version(r):
    subjects = [f"p{i}" for i in range(40)]
    _record(r, *subjects)
    v = _vecs(40, 1)
    log_add_entries(r, "eng", A, subjects, v, [f"g/{s}" for s in subjects], shards=3)
    log_add_entries(r, "eng", B, subjects[:10], v[:10], [f"g/{s}" for s in subjects[:10]], shards=3)
    for version, want in ((A, subjects), (B, subjects[:10])):
        seen = []
        for sh in range(3):
            got = _adds(r, keys.gallery_log("eng", version, sh, 3))
            assert all(shard_of(sj, 3) == sh for sj in got)
            seen += got
        assert sorted(seen) == sorted(want)
    assert {keys.as_str(k): int(n) for k, n in r.hgetall(keys.gallery_versions("eng")).items()} == {A: 40, B: 10}
    assert r.sismember(keys.gallery_enrolled("eng"), enrolled_member("p3", "g/p3", B))
    assert not r.sismember(keys.gallery_enrolled("eng"), enrolled_member("p30", "g/p30", B))


def test_snapshots_and_trimming_of_one_version_never_drop_the_others_entries(r, store):
    v = _vecs(300, 2)
    a_subjects = [f"a{i}" for i in range(300)]
    _record(r, *a_subjects)
    log_add_entries(r, "eng", A, a_subjects[:100], v[:100], a_subjects[:100])
    # The reindex writes version B's first 50 templates while version A goes on (more enrolment).
    log_add_entries(r, "eng", B, a_subjects[:50], v[:50], a_subjects[:50])
    writer_a = _replica(r, store, A)
    writer_a.save_snapshot()
    log_add_entries(r, "eng", A, a_subjects[100:200], v[100:200], a_subjects[100:200])
    writer_a.save_snapshot()  # trims A's log to the first snapshot's position
    log_add_entries(r, "eng", A, a_subjects[200:], v[200:], a_subjects[200:])
    writer_a.save_snapshot()
    assert r.xlen(keys.gallery_log("eng", A)) == 1 + 100  # A's log trimmed ...
    assert r.xlen(keys.gallery_log("eng", B)) == 50  # ... B's untouched
    b = _replica(r, store, B)
    assert not b.load_snapshot()  # A's snapshot is not B's
    assert b.sync() == 50 and len(b.index) == 50

    # B snapshots and trims its own log; A's replicas (fresh or running) are unaffected.
    log_add_entries(r, "eng", B, a_subjects[50:], v[50:], a_subjects[50:])
    b.save_snapshot()
    b.save_snapshot()
    assert r.xlen(keys.gallery_log("eng", B)) == 1  # trimmed to the first B snapshot's position
    assert r.xlen(keys.gallery_log("eng", A)) == 1 + 100
    fresh_a, fresh_b = _replica(r, store, A), _replica(r, store, B)
    assert fresh_a.load_snapshot() and fresh_b.load_snapshot()
    fresh_a.sync(), fresh_b.sync(), writer_a.sync()
    for rep in (fresh_a, fresh_b, writer_a):
        assert len(rep.index) == 300
    q = _vecs(5, 9)
    for vec in q:
        assert [h.subject_id for h in fresh_a.index.search(vec, 10)] == [
            h.subject_id for h in fresh_b.index.search(vec, 10)
        ]


def test_an_expunge_removes_the_subject_from_every_version_and_nothing_writes_it_back(r, store):
    v = _vecs(10, 3)
    subjects = [f"p{i}" for i in range(10)]
    _record(r, *subjects)
    log_add_entries(r, "eng", A, subjects, v, [f"g/{s}" for s in subjects], shards=2)
    log_add_entries(r, "eng", B, subjects[:5], v[:5], [f"g/{s}" for s in subjects[:5]], shards=2)
    # The expunge, as gallery.expunge.expunge does it: the record first, then the removals.
    r.hdel(keys.GALLERY_SUBJECTS, "p2", "p7")
    assert log_remove(r, "eng", "p2", "court order", shards=2) == 2  # one template in A, one in B
    assert log_remove(r, "eng", "p7", "court order", shards=2) == 1  # only A had it yet
    # The reindex had embedded p2 and p7 before the expunge and writes now: nothing is written.
    written = log_add_entries(r, "eng", B, ["p7", "p2", "p8"], v[[7, 2, 8]], ["g/p7", "g/p2", "g/p8"], shards=2)
    assert len(written) == 1  # p8 only
    members = {keys.as_str(m) for m in r.smembers(keys.gallery_enrolled("eng"))}
    assert not {m for m in members if m.startswith(("p2|", "p7|"))}
    assert {keys.as_str(k): int(n) for k, n in r.hgetall(keys.gallery_versions("eng")).items()} == {A: 8, B: 5}
    for version in (A, B):
        for sh in range(2):
            rep = _replica(r, store, version, sh, 2)
            rep.sync()
            assert "p2" not in rep.index and "p7" not in rep.index
    # p7's removal went to B's log too (B was present), though B never held p7.
    removes = [
        keys.as_str(f[b"subject"])
        for _, f in r.xrange(keys.gallery_log("eng", B, shard_of("p7", 2), 2))
        if f[b"op"] == b"remove"
    ]
    assert "p7" in removes
    # Enrolled again later (a new record): the same image may be enrolled anew.
    _record(r, "p7")
    assert len(log_add_entries(r, "eng", A, ["p7"], v[[7]], ["g/p7"], shards=2)) == 1


class _Done:
    def __init__(self, out: dict) -> None:
        self.out = out

    def get(self, timeout: float, propagate: bool) -> dict:
        return self.out

    def forget(self) -> None:
        pass


def test_the_batch_loop_resumes_after_an_interruption_without_sending_anything_twice(r):
    items = [f"item{i}" for i in range(20)]
    sent: list[str] = []

    def dispatch(chunk):
        sent.extend(it for _, it in chunk)
        return {"e": _Done({"n": len(chunk)})}

    class Stop(Exception):
        pass

    def stop_at_8(done: int, total: int) -> None:
        if done >= 8:
            raise Stop

    kw = {"absorb": lambda name, out: None, "batch": 4, "window": 1, "deadline": 1e12}
    with pytest.raises(Stop):
        run_batches(r, "job1", items, dispatch=dispatch, progress=stop_at_8, **kw)
    assert r.bitcount(keys.enrol_job_done("job1")) == 8
    skipped, finished = run_batches(r, "job1", items, dispatch=dispatch, **kw)
    assert (skipped, finished) == (8, 12)
    assert sorted(sent) == sorted(items) and len(sent) == len(set(sent))
    snaps: list[int] = []
    assert run_batches(r, "job1", items, dispatch=dispatch, snapshot=lambda: snaps.append(1), **kw) == (20, 0)
    assert snaps == []  # nothing finished: no snapshot
    run_batches(r, "job2", items, dispatch=dispatch, snapshot=lambda: snaps.append(1), snapshot_every=8, **kw)
    assert len(snaps) == 3  # after 8 and 16, and at the end


def test_a_gallery_written_before_versions_moves_to_its_versions_names_once(r, store):
    from quorum.workers.replica import migrate_unversioned

    subjects = [f"p{i}" for i in range(30)]
    _record(r, *subjects)
    v = _vecs(30, 5)
    log_add_entries(r, "eng", A, subjects[:20], v[:20], subjects[:20], shards=2)
    for sh in range(2):
        _replica(r, store, A, sh, 2).save_snapshot()
    log_add_entries(r, "eng", A, subjects[20:], v[20:], subjects[20:], shards=2)
    # ... left under the names the previous release used: no version in them, no counts.
    for sh in range(2):
        r.rename(keys.gallery_log("eng", A, sh, 2), f"quorum:gallery:log:eng:{sh}of2")
        pointer = snapshot_prefix("eng", A, sh, 2) + "/latest.json"
        store.put(f"gallery/eng/shard-{sh}of2/latest.json", store.get(pointer))
        store.delete(pointer)
    r.delete(keys.gallery_versions("eng"))

    moved = migrate_unversioned(r, store, "eng", 2)
    assert moved["logs"] == {f"quorum:gallery:log:eng:{sh}of2": keys.gallery_log("eng", A, sh, 2) for sh in range(2)}
    assert len(moved["pointers"]) == 2 and moved["counts"] == {A: 30}
    for sh in range(2):
        rep = _replica(r, store, A, sh, 2)
        assert rep.load_snapshot()  # the snapshot, then the log after it
        rep.sync()
        assert sorted(rep.index.subject_labels) == sorted(sj for sj in subjects if shard_of(sj, 2) == sh)
    again = migrate_unversioned(r, store, "eng", 2)
    assert again["logs"] == {} and again["pointers"] == {} and again["counts"] == {}


def test_a_dropped_version_is_not_snapshotted_by_a_worker_left_running_until_it_is_enrolled_again(r, store):
    v = _vecs(4, 6)
    _record(r, "p0", "p1")
    left_running = _replica(r, store, A)
    log_add_entries(r, "eng", A, ["p0"], v[:1], ["g/p0"])
    left_running.sync()
    r.sadd(keys.gallery_dropped("eng"), A)  # what drop-version leaves
    with pytest.raises(RuntimeError, match="dropped"):
        left_running.save_snapshot()
    assert store.size(snapshot_prefix("eng", A) + "/latest.json") is None
    log_add_entries(r, "eng", A, ["p1"], v[1:2], ["g/p1"])  # the version is enrolled into again (a rollback)
    assert not r.sismember(keys.gallery_dropped("eng"), A)
    assert left_running.save_snapshot()["templates"] == 2
