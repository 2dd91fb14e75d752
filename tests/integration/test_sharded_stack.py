"""Sharded galleries through the real stack: SFace's gallery in 3 shards, each served by its own worker
process, dlib unsharded beside it; real faces (the ci split), real redis-server and Celery workers.

- every enrolled template lands in exactly its subject's shard log, and the three shard workers
  together hold the whole gallery;
- for every probe, SFace's ranks and scores in the candidate list are exactly those of one index over
  the whole gallery (built here from the shard logs) searched with the same vector: the merge is the
  unsharded list;
- a new replica of a shard started after a snapshot and more enrolment catches up from the snapshot
  plus its log and answers (the list is whole, not partial) after the first replica is stopped;
- with a shard's only worker stopped, searches are still answered, marked degraded, with the shards
  that answered named, and no subject of the missing shard carries an SFace rank.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis as redis_lib

from quorum.accountability import db, registry
from quorum.broker import keys, liveness
from quorum.broker.client import QuorumClient
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList, EngineResult
from quorum.workers.index import GalleryIndex, _vec_from_bytes
from quorum.workers.shards import shard_of
from tests.integration.conftest import _stack

pytestmark = pytest.mark.integration

SHARDS = 3
AGENCY, USER = "shardtest", "shardtest-inv"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, data_dir):
    s, stack, redis_server = _stack(
        tmp_path_factory, "stack-sharded", engines=("sface", "dlib"), shards={"sface": SHARDS}, fusion_deadline_s=6.0
    )
    rows = read_split(data_dir / "ci")
    gallery = [r for r in rows if r.role == "gallery"]
    first = gallery[:90]
    later = gallery[90:] + [r for r in rows if r.role == "distractor_gallery"][:60]
    report = enrol(s, open_store(s), [(r.identity, r.path) for r in first])
    secret = registry.provision(
        db.get_engine(s), AGENCY, users={USER: "investigator"}, offences=("PC211",), purposes=("investigation",)
    )
    client = QuorumClient(s.redis_url, AGENCY, USER, secret)
    enrolled = {r.identity for r in first}
    probes = [r for r in rows if r.role == "probe" and r.identity in enrolled][:12]
    yield s, stack, client, probes, later, report
    stack.down()
    redis_server.stop()


def _version(r, engine: str) -> str:
    """The one engine version the gallery holds (its logs are named after it)."""
    (version,) = r.hkeys(keys.gallery_versions(engine))
    return keys.as_str(version)


def _one_index(s, r) -> GalleryIndex:
    """One index over the whole SFace gallery: every shard log's templates."""
    idx = GalleryIndex(128, m=s.hnsw_m, ef_construction=s.hnsw_ef_construction, ef_search=s.hnsw_ef_search)
    for sh in range(SHARDS):
        entries = r.xrange(keys.gallery_log("sface", _version(r, "sface"), sh, SHARDS))
        adds = [{keys.as_str(k): v for k, v in f.items()} for _, f in entries]
        adds = [f for f in adds if keys.as_str(f["op"]) == "add"]
        if adds:
            idx.add(
                [int(f["label"]) for f in adds],
                [keys.as_str(f["subject"]) for f in adds],
                np.stack([_vec_from_bytes(f["vec"], 128) for f in adds]),
            )
    return idx


def _search(client: QuorumClient, probes) -> dict[str, tuple]:
    """request id -> (probe row, candidate list)."""
    ids = {
        client.submit(p.path, case_number="2026-0042", offence_code="PC211", purpose="investigation"): p for p in probes
    }
    results = client.wait_all(list(ids), timeout=600)
    out = {}
    for rid, res in results.items():
        assert isinstance(res, CandidateList), res
        out[rid] = (ids[rid], res)
    return out


def test_each_template_is_in_its_subjects_shard_and_the_shards_hold_the_gallery(sharded):
    s, *_, report = sharded
    r = redis_lib.Redis.from_url(s.redis_url)
    assert not r.exists(keys.gallery_log("sface", _version(r, "sface")))  # no unsharded log for a sharded engine
    sizes = []
    for sh in range(SHARDS):
        entries = r.xrange(keys.gallery_log("sface", _version(r, "sface"), sh, SHARDS))
        subjects = {keys.as_str(f[b"subject"]) for _, f in entries}
        assert subjects and all(shard_of(sj, SHARDS) == sh for sj in subjects)
        sizes.append(len(entries))
    assert sum(sizes) == report.enrolled["sface"] and min(sizes) > 0.2 * sum(sizes)


def test_the_merged_sface_list_is_one_index_over_the_whole_gallery(sharded):
    s, _, client, probes, _, _ = sharded
    r = redis_lib.Redis.from_url(s.redis_url)
    one = _one_index(s, r)
    hits_at_1 = 0
    for rid, (probe, cl) in _search(client, probes).items():
        assert not cl.degraded and cl.engines_partial == {} and cl.engines_contributed == ["dlib", "sface"]
        merged = EngineResult.model_validate_json(r.hget(keys.job_results_key(rid), "sface"))
        assert merged.shards == SHARDS and merged.shards_answered == [0, 1, 2]
        # The vector the embed step scattered to the shards, searched in one index over all of them.
        vec = np.frombuffer(r.hget(keys.job_vector_key(rid, "sface"), "vec"), dtype="<f4")
        whole = one.search(vec, 250)
        assert [c.subject_id for c in merged.candidates] == [h.subject_id for h in whole]
        assert [c.score for c in merged.candidates] == pytest.approx([h.score for h in whole], abs=1e-6)
        # ... and the candidate list carries those ranks.
        for c in cl.candidates:
            if "sface" in c.engines:
                assert (
                    c.engines["sface"].rank == whole.index(next(h for h in whole if h.subject_id == c.subject_id)) + 1
                )
        hits_at_1 += cl.candidates[0].subject_id == probe.identity
    assert hits_at_1 >= len(probes) - 1


def test_a_new_shard_replica_catches_up_from_snapshot_and_log(sharded):
    s, stack, client, probes, later, _ = sharded
    from celery.result import AsyncResult

    from quorum.broker.app import TASK_SNAPSHOT, make_app

    app = make_app(s.redis_url)
    out = app.send_task(TASK_SNAPSHOT, kwargs={"engines": ["sface"]}, queue="gallery").get(timeout=300)
    assert out["snapshots"] == [] and len(out["sent"]) == SHARDS  # each shard snapshots itself
    shards = [AsyncResult(t, app=app).get(timeout=300)["snapshots"][0] for t in out["sent"]]
    assert sorted((p["shard"], p["shards"]) for p in shards) == [(i, SHARDS) for i in range(SHARDS)]
    enrol(s, open_store(s), [(r.identity, r.path) for r in later])  # after the snapshot: only in the log
    stack.start_process("sface.1of3", 1)  # a second replica of shard 1
    r = redis_lib.Redis.from_url(s.redis_url)
    deadline = time.monotonic() + 240
    while liveness.live(r, keys.shard_alive("sface", 1, SHARDS)) < 2:
        assert time.monotonic() < deadline, "the second replica of shard 1 never beat"
        time.sleep(1)
    log_file = stack.log_dir / "sface.1of3-1.log"
    while "gallery.replica_ready" not in log_file.read_text(errors="replace"):  # beats before it has loaded
        assert time.monotonic() < deadline, "the second replica of shard 1 never loaded its shard"
        time.sleep(1)
    stack.stop_process("sface.1of3", 0)  # the first replica goes: the new one alone serves shard 1
    deadline = time.monotonic() + 60
    while liveness.live(r, keys.shard_alive("sface", 1, SHARDS)) > 1:
        assert time.monotonic() < deadline
        time.sleep(1)
    one = _one_index(s, r)
    later_subjects = {x.identity for x in later}
    assert any(shard_of(sj, SHARDS) == 1 for sj in later_subjects)
    for rid, (_, cl) in _search(client, probes[:4]).items():
        assert not cl.degraded and cl.engines_partial == {}, cl
        merged = EngineResult.model_validate_json(r.hget(keys.job_results_key(rid), "sface"))
        vec = np.frombuffer(r.hget(keys.job_vector_key(rid, "sface"), "vec"), dtype="<f4")
        # Shard 1 answered from the new replica: what was enrolled after the snapshot is in the list.
        assert [c.subject_id for c in merged.candidates] == [h.subject_id for h in one.search(vec, 250)]
    log_text = log_file.read_text(errors="replace")
    assert "gallery.snapshot_loaded" in log_text
    assert sum(1 for sj in one.subject_labels if shard_of(sj, SHARDS) == 1 and sj in later_subjects) > 0


def test_bulk_enrolment_from_a_manifest_resumes_and_finds_each_face_once(sharded, data_dir, tmp_path):
    """A booking system's manifest (files, objects it stored itself, one missing object, booking dates),
    interrupted after two batches and run again: nothing enrolled twice, each face found once for both
    engines, the missing object reported with its code."""
    s, *_ = sharded
    from quorum.core.objectstore import put_content
    from quorum.gallery.items import enrol_job_id, manifest_items

    store = open_store(s)
    r = redis_lib.Redis.from_url(s.redis_url)
    rows = [x for x in read_split(data_dir / "ci") if x.role == "distractor_gallery"][60:100]
    lines = ["subject_id,image,booking_date,booking_number"]
    for i, row in enumerate(rows):
        if i % 4 == 0:  # the booking system stored this one itself
            key = put_content(store, "booking", row.path.read_bytes())
            lines.append(f"{row.identity},key:{key},2024-0{1 + i % 9}-1{i % 10},BK-{i:05d}")
        else:
            lines.append(f"{row.identity},{row.path},,")
    lines.append("bk-missing,key:booking/0000-not-there,2024-01-01,")
    lines.append(f"bk-nofile,{tmp_path / 'not-there.jpg'},,")
    manifest = tmp_path / "bookings.csv"
    manifest.write_text("\n".join(lines) + "\n")
    items = manifest_items(manifest)
    assert len(items) == 42

    class Interrupted(Exception):
        pass

    def stop_after_two_batches(done: int, total: int) -> None:
        if done >= 16:
            raise Interrupted

    with pytest.raises(Interrupted):
        enrol(s, store, items, batch=8, window=1, progress=stop_after_two_batches)
    job = enrol_job_id(items, s.engines)
    assert r.bitcount(keys.enrol_job_done(job)) == 16

    report = enrol(s, store, items, batch=8, window=2)
    assert report.job_id == job and report.skipped == 16
    assert report.detected_in_engine == 0  # every face was found once, by the enrolment's detection step
    for engine in ("sface", "dlib"):
        codes = {f["image_key"]: f["code"] for f in report.failed.get(engine, [])}
        assert codes.get("booking/0000-not-there") == "IMAGE_MISSING"
        assert codes.get(str(tmp_path / "not-there.jpg")) == "IMAGE_MISSING"
    # No template twice: one log entry per (subject, image) of the manifest, over all of sface's shards.
    wanted = {x.subject_id for x in items}
    for engine, logs in (
        ("sface", [keys.gallery_log("sface", _version(r, "sface"), i, SHARDS) for i in range(SHARDS)]),
        ("dlib", [keys.gallery_log("dlib", _version(r, "dlib"))]),
    ):
        pairs = [
            (keys.as_str(f[b"subject"]), keys.as_str(f[b"image"]))
            for lk in logs
            for _, f in r.xrange(lk)
            if keys.as_str(f[b"op"]) == "add" and keys.as_str(f[b"subject"]) in wanted
        ]
        assert len(pairs) == len(set(pairs)) >= 36, engine
    # A rerun of a finished job skips everything.
    again = enrol(s, store, items, batch=8)
    assert again.skipped == 42 and sum(again.enrolled.values()) == 0
    import json

    rec = json.loads(r.hget(keys.GALLERY_SUBJECTS, rows[0].identity))
    assert list(rec["booking_dates"].values()) == ["2024-01-10"]
    assert list(rec["booking_numbers"].values()) == ["BK-00000"]


def test_a_shard_without_a_worker_leaves_a_partial_list_that_says_so(sharded):
    s, stack, client, probes, _, _ = sharded
    stack.stop_process("sface.2of3", 0)
    r = redis_lib.Redis.from_url(s.redis_url)
    deadline = time.monotonic() + 60
    while liveness.live(r, keys.shard_alive("sface", 2, SHARDS)):
        assert time.monotonic() < deadline, "shard 2's heartbeat never expired"
        time.sleep(1)
    for _, cl in _search(client, probes[:3]).values():
        assert cl.degraded and cl.engines_partial == {"sface": [0, 1]} and cl.engines_failed == {}
        assert "sface" in cl.engines_contributed
        for c in cl.candidates:
            if "sface" in c.engines:
                assert shard_of(c.subject_id, SHARDS) != 2
        assert any(shard_of(c.subject_id, SHARDS) == 2 for c in cl.candidates)  # dlib still finds them
