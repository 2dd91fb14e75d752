"""Gallery replicas on a real redis-server and both stores (disk, and S3 on radosgw): the log keeps
replicas in step, snapshots load at start and the log resumes from the snapshot's position, removals
(expunge) reach every replica. Vectors are seeded synthetic unit vectors (an index test, not a face test)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import redis

from quorum.broker import keys
from quorum.core.objectstore import DiskStore, S3Store
from quorum.workers.replica import GalleryReplica, log_add_entries, log_remove
from tests.integration.servers import RedisServer

pytestmark = pytest.mark.integration
DIM = 64


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("replica-redis")).start()
    yield server.url
    server.stop()


@pytest.fixture(params=["disk", "s3"])
def store(request, tmp_path):
    if request.param == "disk":
        return DiskStore(tmp_path / "objects")
    e = request.getfixturevalue("s3_server").env
    return S3Store(e["S3_ENDPOINT"], e["S3_ACCESS_KEY"], e["S3_SECRET_KEY"], f"replica-{uuid.uuid4().hex[:12]}")


def _vecs(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _add(r, engine, version, subjects, vectors, images):
    """Templates logged as enrolment logs them: only for subjects with a record (an expunge deletes it)."""
    r.hset(keys.GALLERY_SUBJECTS, mapping={sj: "{}" for sj in subjects})
    return log_add_entries(r, engine, version, subjects, vectors, images)


def _replica(r, store, engine, version="v1"):
    return GalleryReplica(engine, version, DIM, r, store, m=16, ef_construction=100, ef_search=300, capacity=64)


def test_replicas_snapshots_and_log(redis_url, store, request):
    r = redis.Redis.from_url(redis_url)
    engine = f"eng-{request.node.callspec.id}"
    v = _vecs(600, 1)
    subjects = [f"p{i // 2}" for i in range(500)]  # 250 people, two templates each
    _add(r, engine, "v1", subjects, v[:500], [f"gallery/{i}" for i in range(500)])

    a = _replica(r, store, engine)
    assert a.sync() == 500 and len(a.index) == 500 and a.index.subjects == 250
    for p in ("p3", "p10", "p77"):
        log_remove(r, engine, p, reason="test expunge")
    a.sync()
    assert len(a.index) == 494 and "p3" not in a.index

    pointer = a.save_snapshot()
    assert pointer["templates"] == 494 and pointer["log_id"] == a.applied_id

    # After the snapshot: more adds, one more removal, and an entry of another engine version (in its own log).
    _add(r, engine, "v1", [f"q{i}" for i in range(100)], v[500:], [f"gallery/q{i}" for i in range(100)])
    log_remove(r, engine, "p20", reason="test expunge")
    _add(r, engine, "v0-old", ["old"], v[:1], ["gallery/old"])

    b = _replica(r, store, engine)
    assert b.load_snapshot() and len(b.index) == 494  # the snapshot alone
    assert b.sync() == 101  # only what came after the snapshot: 100 adds, 1 removal
    a.sync()
    for rep in (a, b):
        assert len(rep.index) == 592 and rep.index.subjects == 250 - 4 + 100
        assert "p20" not in rep.index and "old" not in rep.index and "q99" in rep.index
    assert b.skipped_other_version == 0 and r.xlen(keys.gallery_log(engine, "v0-old")) == 1
    for q in _vecs(20, 9):
        assert [h.subject_id for h in a.index.search(q, 25)] == [h.subject_id for h in b.index.search(q, 25)]
    # A removed person never comes back from any replica's search, even searched with their own face.
    for rep in (a, b):
        for i in (6, 7, 20, 21, 40, 41):  # p3, p10, p20 templates
            assert {"p3", "p10", "p20"}.isdisjoint({h.subject_id for h in rep.index.search(v[i], 50)})

    # A replica of another engine version has its own snapshots (none yet) and log (empty).
    c = _replica(r, store, engine, version="v2")
    assert not c.load_snapshot()
    assert c.sync() == 0 and len(c.index) == 0


def test_log_trimmed_after_snapshots_and_stale_replicas_recover(redis_url, store, request):
    r = redis.Redis.from_url(redis_url)
    engine = f"trim-{request.node.callspec.id}"
    v = _vecs(300, 11)
    _add(r, engine, "v1", [f"a{i}" for i in range(100)], v[:100], [f"gallery/a{i}" for i in range(100)])
    stale = _replica(r, store, engine)
    stale.sync()  # then falls asleep at 100 entries
    writer = _replica(r, store, engine)
    writer.save_snapshot()  # first snapshot: nothing to trim yet
    assert r.xlen(keys.gallery_log(engine, "v1")) == 100
    _add(r, engine, "v1", [f"b{i}" for i in range(100)], v[100:200], [f"gallery/b{i}" for i in range(100)])
    log_remove(r, engine, "a5", reason="expunge")
    writer.save_snapshot()  # second: the log before the first snapshot's position goes
    assert r.xlen(keys.gallery_log(engine, "v1")) == 1 + 101  # the position entry itself stays
    _add(r, engine, "v1", [f"c{i}" for i in range(50)], v[200:250], [f"gallery/c{i}" for i in range(50)])
    writer.save_snapshot()  # third: everything before the second's position goes
    assert r.xlen(keys.gallery_log(engine, "v1")) == 1 + 50
    log_remove(r, engine, "b7", reason="expunge")

    fresh = _replica(r, store, engine)
    fresh.load_snapshot()
    fresh.sync()
    stale.sync()  # missed trimmed entries: must reload from the snapshot, not silently skip them
    writer.sync()
    for rep in (fresh, stale, writer):
        assert len(rep.index) == 248 and "a5" not in rep.index and "b7" not in rep.index and "c49" in rep.index
