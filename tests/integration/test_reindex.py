"""An engine upgrade through the real stack (its own redis-server and Celery worker processes, SFace on
real ci faces): ``quorum gallery reindex`` builds the new version's gallery from the stored images while
the old version goes on answering searches, then the search worker is switched to the new version.

The "new version" is the same SFace model under another version string (``QUORUM_ENGINE_VERSION_SUFFIX``,
a setting for tests only): real embeddings, so the new version must answer every probe with exactly the
subjects the old one did.

- searches during the reindex are answered by version A, never degraded;
- a reindex interrupted after 8 images and run again (through the CLI) writes every image once;
- an expunge between the two runs removes the subject from both versions, and the rerun does not write
  back the subject (nor one expunged before the reindex reached it);
- ``quorum gallery status`` shows both versions, their templates and their workers;
- a version-B search worker started afterwards answers the same probes with the same subjects and
  scores as A (less the expunged subject), and A's state is then dropped;
- with the engine in 2 shards, the new version's templates land in its own shard logs and each shard
  is snapshotted by the reindex worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib

from quorum.accountability import audit, db, registry
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack, settings_env
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol
from quorum.gallery.expunge import expunge
from quorum.gallery.reindex import reindex
from quorum.gallery.versions import GalleryRefused, drop_version, live_versions
from quorum.schemas import CandidateList, EngineResult
from quorum.workers.replica import snapshot_prefix
from tests.integration.conftest import _stack

pytestmark = pytest.mark.integration

AGENCY, USER = "reindextest", "reindextest-inv"
SUFFIX = "reindex-test-b"


class Interrupted(Exception):
    pass


def _wait(what: str, check, timeout: float = 180.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = check()
        if out:
            return out
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _engine_results(r, rids) -> dict[str, EngineResult]:
    return {rid: EngineResult.model_validate_json(r.hget(keys.job_results_key(rid), "sface")) for rid in rids}


def _search(client: QuorumClient, probes) -> dict[str, tuple]:
    """request id -> (probe row, candidate list)."""
    ids = {
        client.submit(p.path, case_number="2026-0099", offence_code="PC211", purpose="investigation"): p for p in probes
    }
    out = {}
    for rid, res in client.wait_all(list(ids), timeout=600).items():
        assert isinstance(res, CandidateList), res
        out[rid] = (ids[rid], res)
    return out


def _adds(r, version: str) -> list[tuple[str, str]]:
    entries = r.xrange(keys.gallery_log("sface", version))
    return [(keys.as_str(f[b"subject"]), keys.as_str(f[b"image"])) for _, f in entries if f[b"op"] == b"add"]


def _removes(r, version: str) -> list[str]:
    return [
        keys.as_str(f[b"subject"]) for _, f in r.xrange(keys.gallery_log("sface", version)) if f[b"op"] == b"remove"
    ]


def test_reindex_builds_the_new_version_while_the_old_one_searches(tmp_path_factory, data_dir):
    s, stack, redis_server = _stack(tmp_path_factory, "stack-reindex", engines=("sface",), fusion_deadline_s=6.0)
    try:
        _run(s, stack, data_dir)
    finally:
        stack.down()
        redis_server.stop()


def _run(s, stack: Stack, data_dir) -> None:
    r = redis_lib.Redis.from_url(s.redis_url)
    store = open_store(s)
    rows = read_split(data_dir / "ci")
    gallery = [x for x in rows if x.role == "gallery"][:20] + [x for x in rows if x.role == "distractor_gallery"][:6]
    first = enrol(s, store, [(x.identity, x.path) for x in gallery])
    assert first.enrolled == {"sface": len(gallery)}
    (version_a,) = {keys.as_str(v) for v in r.hkeys(keys.gallery_versions("sface"))}
    version_b = f"{version_a}+{SUFFIX}"
    secret = registry.provision(
        db.get_engine(s), AGENCY, users={USER: "investigator"}, offences=("PC211",), purposes=("investigation",)
    )
    client = QuorumClient(s.redis_url, AGENCY, USER, secret)
    enrolled = {x.identity for x in gallery}
    probes = [x for x in rows if x.role == "probe" and x.identity in enrolled][:8]
    assert len(probes) == 8

    # No reindex worker yet: refused, saying what to start.
    refused = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "gallery", "reindex", "sface"],
        env=settings_env(s),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "quorum worker sface --reindex" in refused.stderr, refused.stderr

    # Version B's reindex worker: the same stack's settings, the engine under another version.
    s_b = s.model_copy(update={"engine_version_suffix": SUFFIX})
    stack_b = Stack(s_b)
    stack_b.start_process("sface.reindex")
    _wait("the reindex worker", lambda: version_b in live_versions(r, "reindex", "sface").values())

    # Searches run on version A throughout the reindex.
    searched: dict[str, tuple] = {}
    errors: list[BaseException] = []
    reindexed = threading.Event()

    def keep_searching() -> None:
        try:
            while True:  # at least one round, and rounds until the reindex is done
                searched.update(_search(client, probes))
                if reindexed.is_set():
                    return
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    searcher = threading.Thread(target=keep_searching)
    searcher.start()

    # 1. A reindex interrupted after its first 8 images (batches of 4, one in flight).
    def stop_after_8(done: int, total: int) -> None:
        if done >= 8:
            raise Interrupted

    with pytest.raises(Interrupted):
        reindex(s, "sface", batch=4, window=1, progress=stop_after_8, actor="reindex-test")
    done_b = {(sj, k) for sj, k in _adds(r, version_b)}
    assert len(done_b) == 8

    # 2. An expunge in the middle: one subject version B holds already, one it does not hold yet.
    held = sorted({sj for sj, _ in done_b}, key=lambda sj: (sj not in {p.identity for p in probes}, sj))[0]
    not_yet = sorted(enrolled - {sj for sj, _ in done_b})[-1]
    for subject in (held, not_yet):
        expunge(s, store, subject, reason="court order (test)", actor="reindex-test")
    assert held in _removes(r, version_a) and held in _removes(r, version_b)

    # 3. The rerun, through the CLI, with the searches still running.
    out = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "gallery", "reindex", "sface", "--batch", "4", "--actor", "reindex-test"],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=600,
    )
    reindexed.set()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "images/s" in out.stdout and f"reindexed to {version_b}" in out.stdout, out.stdout
    print(out.stdout)  # the throughput, for BENCHMARKS.md (pytest -s)
    # The gallery changed since the first run (the expunges): another job, whose bitmap is empty; what B
    # held already was not sent again.
    assert f"{len({a for a in done_b if a[0] != held})} held already" in out.stdout, out.stdout
    searcher.join(timeout=600)
    assert not errors, errors

    # Every search during the reindex was answered by version A, whole.
    during = _engine_results(r, searched)
    assert {res.engine_version for res in during.values()} == {version_a}
    assert all(not cl.degraded for _, cl in searched.values())

    # Every image once in B's log, the expunged subjects' templates never written back.
    adds_b = _adds(r, version_b)
    assert len(adds_b) == len(set(adds_b))
    assert {sj for sj, _ in adds_b} == enrolled - {not_yet}
    assert [sj for sj, _ in adds_b].count(held) == 1 and adds_b.index(next(a for a in adds_b if a[0] == held)) < 8
    assert not_yet not in {sj for sj, _ in adds_b}
    counts = {keys.as_str(v): int(n) for v, n in r.hgetall(keys.gallery_versions("sface")).items()}
    assert counts == {version_a: len(gallery) - 2, version_b: len(gallery) - 2}
    pointer_b = store.get(snapshot_prefix("sface", version_b) + "/latest.json")
    assert b'"templates": %d' % (len(gallery) - 2) in pointer_b
    assert store.size(snapshot_prefix("sface", version_a) + "/latest.json") is None  # A never snapshotted
    # A rerun over the same gallery is the same job: its bitmap skips every image.
    again = reindex(s, "sface", batch=4, actor="reindex-test")
    assert (again.skipped, again.enrolled, again.held) == (len(gallery) - 2, 0, 0)
    actions = [
        (e["outcome"], json.loads(e["details"])["version"])
        for e in audit.query(db.get_engine(s), action=audit.GALLERY_REINDEX)
    ]
    assert actions == [("started", version_b)] * 2 + [("ok", version_b), ("started", version_b), ("ok", version_b)]

    # 4. The operator's view: both versions, their templates, their workers.
    status = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "gallery", "status"], env=settings_env(s), capture_output=True, text=True
    )
    assert status.returncode == 0, status.stderr
    lines = {ln.split(": ", 1)[0].strip(): ln for ln in status.stdout.splitlines()}
    assert f"{len(gallery) - 2} templates" in lines[version_a] and "1 searching" in lines[version_a]
    assert f"{len(gallery) - 2} templates" in lines[version_b] and "1 reindex" in lines[version_b]
    overall = subprocess.run(
        [sys.executable, "-m", "quorum.cli", "status"], env=settings_env(s), capture_output=True, text=True
    )
    assert overall.returncode == 0 and lines[version_a] in overall.stdout and lines[version_b] in overall.stdout

    with pytest.raises(GalleryRefused, match="live workers"):  # A still answers searches
        drop_version(s, store, "sface", version_a, actor="reindex-test")

    # 5. Switch the search worker to version B: the same subjects, in the same order, with the same scores.
    stack.stop_process("sface")
    stack_b.start_process("sface", 1)
    _wait("a version-B search worker", lambda: version_b in live_versions(r, "engine", "sface").values())
    after = _search(client, probes)
    results_b = _engine_results(r, after)
    assert {res.engine_version for res in results_b.values()} == {version_b}
    before_by_probe = {str(p.path): during[rid] for rid, (p, _) in searched.items()}
    for rid, (probe, cl) in after.items():
        assert not cl.degraded
        a = [c for c in before_by_probe[str(probe.path)].candidates if c.subject_id not in (held, not_yet)]
        b = results_b[rid].candidates
        assert [c.subject_id for c in b] == [c.subject_id for c in a]
        assert [c.score for c in b] == pytest.approx([c.score for c in a], abs=1e-5)
        assert held not in {c.subject_id for c in cl.candidates}

    # 6. Version A's state dropped once no worker runs it (its heartbeat expires within 12 s).
    stack_b.stop_process("sface.reindex")
    _wait("A's heartbeat to expire", lambda: version_a not in live_versions(r, "engine", "sface").values(), 30)
    dropped = drop_version(s, store, "sface", version_a, actor="reindex-test")
    assert dropped["logs_deleted"] == 1
    assert not r.exists(keys.gallery_log("sface", version_a))
    assert [keys.as_str(v) for v in r.hkeys(keys.gallery_versions("sface"))] == [version_b]
    assert all(keys.as_str(m).endswith(f"|{version_b}") for m in r.smembers(keys.gallery_enrolled("sface")))
    assert all(isinstance(res, CandidateList) for _, res in _search(client, probes[:2]).values())


def test_a_sharded_engine_is_reindexed_shard_by_shard(tmp_path_factory, data_dir):
    """SFace in 2 shards: the new version's templates land in its own shard logs, each shard snapshotted
    by the reindex worker, and a replica of each new-version shard loads exactly its subjects."""
    from quorum.workers.replica import GalleryReplica
    from quorum.workers.shards import shard_of

    s, stack, redis_server = _stack(
        tmp_path_factory, "stack-reindex-sharded", engines=("sface",), shards={"sface": 2}, fusion_deadline_s=6.0
    )
    try:
        r = redis_lib.Redis.from_url(s.redis_url)
        store = open_store(s)
        rows = read_split(data_dir / "ci")
        gallery = [x for x in rows if x.role == "distractor_gallery"][6:18]
        enrol(s, store, [(x.identity, x.path) for x in gallery])
        (version_a,) = {keys.as_str(v) for v in r.hkeys(keys.gallery_versions("sface"))}
        version_b = f"{version_a}+{SUFFIX}"
        Stack(s.model_copy(update={"engine_version_suffix": SUFFIX})).start_process("sface.reindex")
        _wait("the reindex worker", lambda: version_b in live_versions(r, "reindex", "sface").values())
        report = reindex(s, "sface", batch=4, actor="reindex-test")
        assert report.enrolled == len(gallery) and not report.failed
        assert sorted((p["shard"], p["shards"], p["templates"]) for p in report.snapshots) == [
            (i, 2, sum(shard_of(x.identity, 2) == i for x in gallery)) for i in range(2)
        ]
        for i in range(2):
            want = {x.identity for x in gallery if shard_of(x.identity, 2) == i}
            for version in (version_a, version_b):
                assert {sj for sj, _ in _shard_adds(r, version, i)} == want
            rep = GalleryReplica(
                "sface",
                version_b,
                128,
                r,
                store,
                m=16,
                ef_construction=100,
                ef_search=100,
                capacity=64,
                shard=i,
                shards=2,
            )
            assert rep.load_snapshot() and set(rep.index.subject_labels) == want
    finally:
        stack.down()
        redis_server.stop()


def _shard_adds(r, version: str, shard: int) -> list[tuple[str, str]]:
    entries = r.xrange(keys.gallery_log("sface", version, shard, 2))
    return [(keys.as_str(f[b"subject"]), keys.as_str(f[b"image"])) for _, f in entries if f[b"op"] == b"add"]
