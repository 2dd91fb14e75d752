"""The pipeline's stages (workers.stages) with an explicit context: fakeredis (with Lua, for the
publish-once script), a real HNSW gallery index, and a stand-in engine and detector whose outputs the
tests choose. The observers (workers.observers) are checked against what the stages return.

These test the decisions (what is sent next, what is published, when fusion waits, extends or
degrades); real models, real Redis and real worker processes are exercised by tests/integration."""

from __future__ import annotations

import time
import uuid
from typing import Any

import fakeredis
import numpy as np
import pytest

from quorum.broker import keys, liveness
from quorum.broker.app import (
    FUSION_QUEUE,
    INTAKE_QUEUE,
    TASK_ENROL,
    TASK_FUSE,
    TASK_PREPARE,
    TASK_SEARCH,
    engine_queue,
)
from quorum.broker.jobs import load_job, save_job
from quorum.broker.results import fetch
from quorum.core import metrics
from quorum.core.config import Settings
from quorum.core.errors import Code, ServiceError
from quorum.schemas import CandidateList, EngineResult, ErrorResult
from quorum.schemas.job import Job
from quorum.workers import stages
from quorum.workers.faces import Face
from quorum.workers.index import GalleryIndex
from quorum.workers.observers import StageMetrics
from quorum.workers.stages import StageContext

DIM = 8
ENGINES = ("e1", "e2")
FACE = Face(box=(10.0, 10.0, 80.0, 80.0), landmarks=((30, 40), (60, 40), (45, 55), (32, 70), (58, 70)), score=0.9)
IMAGE = np.zeros((100, 100, 3), dtype=np.uint8)


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


class StandInEngine:
    """Embeds every image to a fixed vector the test chooses (the engine interface, no model)."""

    def __init__(self, name: str, vector: np.ndarray | None = None, fail: Exception | None = None) -> None:
        self.name, self.version, self.dim = name, f"{name}-v1", DIM
        self.vector = vector if vector is not None else _unit(np.arange(1, DIM + 1, dtype=np.float32))
        self.fail = fail
        self.calls = 0

    def embed(self, image: np.ndarray, face: Face) -> np.ndarray:
        self.calls += 1
        if self.fail:
            raise self.fail
        return self.vector

    def embed_batch(self, items):
        return np.stack([self.embed(img, f) for img, f in items]) if items else np.zeros((0, DIM), np.float32)


class StandInReplica:
    def __init__(self, index: GalleryIndex) -> None:
        self.index = index
        self.synced = 0

    def sync(self) -> int:
        self.synced += 1
        return 0


def _gallery(n: int = 30, seed: int = 1) -> GalleryIndex:
    """Synthetic gallery (random unit vectors; fine for testing the decisions, not accuracy)."""
    rng = np.random.default_rng(seed)
    idx = GalleryIndex(DIM, capacity=64)
    idx.add(list(range(n)), [f"s{i}" for i in range(n)], np.stack([_unit(rng.normal(size=DIM)) for _ in range(n)]))
    return idx


class World:
    def __init__(self, **settings: Any) -> None:
        self.redis = fakeredis.FakeRedis()
        self.settings = Settings(
            search_timeout_s=60, fusion_deadline_s=5, result_ttl_s=600, min_face_pixels=20, **settings
        )
        self.faces: list[Face] = [FACE]
        self.image_error: Exception | None = None
        self.engines = {e: StandInEngine(e) for e in ENGINES}
        self.replicas = {e: StandInReplica(_gallery()) for e in ENGINES}
        self.clock = time.time()
        self.audited: list[tuple[str, str]] = []  # (request id, answer type), in the order written
        self.audit_down = False

    def record_result(self, job: Job, result: Any, engines: dict | None) -> bool:
        if self.audit_down:
            raise ServiceError(Code.AUDIT_UNAVAILABLE, "audit database unavailable")
        # The answer must not be out yet when its audit record is written.
        assert fetch(self.redis, job.agency_id, job.request_id) is None
        self.audited.append((job.request_id, result.type))
        return True

    def load_image(self, key: str) -> np.ndarray:
        if self.image_error:
            raise self.image_error
        return IMAGE

    def ctx(self) -> StageContext:
        return StageContext(
            redis=self.redis,
            settings=self.settings,
            load_image=self.load_image,
            detect=lambda image: list(self.faces),
            engine=lambda name: self.engines[name],
            replica=lambda name: self.replicas[name],
            now=lambda: self.clock,
            record_result=self.record_result,
        )

    def job(self, **kw: Any) -> Job:
        kw.setdefault("engines", ENGINES)
        job = Job(
            request_id=uuid.uuid4().hex,
            agency_id="agency-a",
            user_id="inv",
            case_number="2026-1",
            offence_code="PC211",
            purpose="criminal-investigation",
            image_key="probes/x.jpg",
            probe_sha256="0" * 64,
            candidates=10,
            received_at=self.clock,
            stream_entry_id="1-1",
            **kw,
        )
        save_job(self.redis, job, ttl_s=600)
        return job

    def prepared(self) -> Job:
        job = self.job()
        stages.prepare(self.ctx(), request_id=job.request_id)
        loaded = load_job(self.redis, job.request_id)
        assert loaded is not None and loaded.face is not None
        return loaded


@pytest.fixture
def w() -> World:
    return World()


# ---- intake ------------------------------------------------------------------------------------------


def test_prepare_chooses_the_face_and_fans_out_by_name_with_a_backstop(w):
    job = w.job()
    res = stages.prepare(w.ctx(), request_id=job.request_id)
    assert res.status == "dispatched" and res.published is None
    saved = load_job(w.redis, job.request_id)
    assert saved is not None and saved.face is not None
    assert saved.face.box == FACE.box and saved.face.chosen_by == "largest" and saved.face.faces_found == 1
    searches = [m for m in res.send if m.task == TASK_SEARCH]
    assert [(m.kwargs, m.queue, m.task_id) for m in searches] == [
        ({"request_id": job.request_id, "engine": e}, engine_queue(e), f"{job.request_id}.{e}") for e in ENGINES
    ]
    (backstop,) = [m for m in res.send if m.task == TASK_FUSE]
    assert backstop.kwargs == {"request_id": job.request_id, "final": True}
    assert backstop.queue == FUSION_QUEUE and backstop.countdown == w.settings.search_timeout_s


def test_prepare_answers_a_probe_without_a_face_with_its_code_and_sends_nothing(w):
    w.faces = []
    job = w.job()
    res = stages.prepare(w.ctx(), request_id=job.request_id)
    assert res.status == stages.Outcome.FAILED and res.code == Code.NO_FACE.value and res.send == ()
    assert isinstance(res.published, ErrorResult) and res.published.code == Code.NO_FACE.value
    answer = fetch(w.redis, job.agency_id, job.request_id)
    assert isinstance(answer, ErrorResult) and answer.stage == "intake"
    assert w.redis.xlen(keys.results_stream(job.agency_id)) == 1
    # Asked again (a redelivery), it publishes nothing more.
    again = stages.prepare(w.ctx(), request_id=job.request_id)
    assert again.published is None and w.redis.xlen(keys.results_stream(job.agency_id)) == 1


def test_prepare_raises_a_dependency_failure_to_be_retried_and_answers_it_on_the_last_attempt(w):
    w.image_error = ServiceError(Code.STORE_UNAVAILABLE, "store down")
    job = w.job()
    with pytest.raises(ServiceError):
        stages.prepare(w.ctx(), request_id=job.request_id, last_attempt=False)
    assert fetch(w.redis, job.agency_id, job.request_id) is None
    res = stages.prepare(w.ctx(), request_id=job.request_id, last_attempt=True)
    assert isinstance(res.published, ErrorResult)
    assert res.published.code == Code.STORE_UNAVAILABLE.value and res.published.retryable


def test_prepare_turns_an_unexpected_exception_into_an_internal_error_result(w):
    w.image_error = ZeroDivisionError("boom")
    job = w.job()
    res = stages.prepare(w.ctx(), request_id=job.request_id)
    assert isinstance(res.published, ErrorResult) and res.published.code == Code.INTERNAL.value
    assert "ZeroDivisionError" in res.published.message


def test_prepare_of_an_unknown_job_is_missing(w):
    assert stages.prepare(w.ctx(), request_id="nope").status == "missing"


# ---- engines ---------------------------------------------------------------------------------------------


def test_first_engine_in_starts_the_deadline_and_the_last_asks_for_fusion(w):
    job = w.prepared()
    first = stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    assert first.engine_result is not None and first.engine_result.status == "ok"
    assert len(first.engine_result.candidates) == 30  # the whole (small) gallery: engines return full lists
    assert first.gallery_templates == 30
    (deadline,) = first.send
    assert deadline.kwargs == {"request_id": job.request_id, "final": True}
    assert deadline.countdown == w.settings.fusion_deadline_s and deadline.task_id == f"{job.request_id}.deadline"
    last = stages.search(w.ctx(), request_id=job.request_id, engine="e2")
    assert [(m.task, m.kwargs, m.countdown) for m in last.send] == [
        (TASK_FUSE, {"request_id": job.request_id, "final": False}, None)
    ]


def test_a_redelivered_search_does_not_recompute(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    again = stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    assert w.engines["e1"].calls == 1 and again.engine_result is None and again.send == ()


def test_engine_failures_become_coded_engine_results(w):
    job = w.prepared()
    w.engines["e1"].fail = RuntimeError("cuda fell over")
    w.replicas["e2"] = StandInReplica(GalleryIndex(DIM))
    r1 = stages.search(w.ctx(), request_id=job.request_id, engine="e1").engine_result
    r2 = stages.search(w.ctx(), request_id=job.request_id, engine="e2").engine_result
    assert r1 is not None and (r1.status, r1.error_code) == ("error", Code.ENGINE_FAILED.value)
    assert r2 is not None and (r2.status, r2.error_code) == ("error", Code.GALLERY_EMPTY.value)


def test_search_after_publication_is_gone(w):
    job = w.prepared()
    w.redis.set(keys.job_published_key(job.request_id), 1)
    res = stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    assert res.status == "gone" and w.engines["e1"].calls == 0


# ---- fusion ------------------------------------------------------------------------------------------------


def _both_engines(w: World, job: Job) -> None:
    for e in ENGINES:
        stages.search(w.ctx(), request_id=job.request_id, engine=e)


def test_fusion_waits_for_every_engine_unless_final(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    assert stages.fuse(w.ctx(), request_id=job.request_id, final=False).status == "waiting"


def test_fusion_publishes_the_list_once(w):
    job = w.prepared()
    _both_engines(w, job)
    res = stages.fuse(w.ctx(), request_id=job.request_id)
    assert res.status == "published" and isinstance(res.published, CandidateList)
    cl = res.published
    assert len(cl.candidates) == job.candidates and not cl.degraded and cl.engines_contributed == list(ENGINES)
    assert [c.rank for c in cl.candidates] == list(range(1, job.candidates + 1))
    # Both engines embed to the same vector over the same gallery: fusion keeps their common order.
    e1 = EngineResult.model_validate_json(w.redis.hget(keys.job_results_key(job.request_id), "e1"))
    assert [c.subject_id for c in cl.candidates] == [c.subject_id for c in e1.candidates[: job.candidates]]
    assert set(res.engine_results) == set(ENGINES)
    again = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert again.status == "gone" and again.published is None
    assert w.redis.xlen(keys.results_stream(job.agency_id)) == 1


def test_liveness_is_a_heartbeat_that_still_holds_by_the_redis_clock(w):
    key = keys.engine_alive("e2")
    assert liveness.live(w.redis, key) == 0
    now = liveness.server_time(w.redis)
    w.redis.zadd(key, {"dead-node": now - 1})  # its last beat ran out a second ago
    assert liveness.live(w.redis, key) == 0
    liveness.heartbeat(w.redis, key, "node-1", ttl_s=12)
    liveness.heartbeat(w.redis, key, "node-2", ttl_s=12)
    assert liveness.live(w.redis, key) == 2 and w.redis.zscore(key, "dead-node") is None  # dropped on a beat
    liveness.leave(w.redis, key, "node-1")
    assert liveness.live(w.redis, key) == 1
    # The version each live worker runs is kept beside the set; a node that left takes its version along.
    liveness.heartbeat(w.redis, key, "node-2", ttl_s=12, version="sface-v2")
    liveness.heartbeat(w.redis, key, "node-3", ttl_s=12, version="sface-v3")
    assert liveness.members(w.redis, key) == {"node-2": "sface-v2", "node-3": "sface-v3"}
    liveness.leave(w.redis, key, "node-3")
    assert liveness.members(w.redis, key) == {"node-2": "sface-v2"}
    w.redis.zadd(key, {"node-2": liveness.server_time(w.redis) - 1})  # node-2's beat runs out
    liveness.heartbeat(w.redis, key, "node-4", ttl_s=12)
    assert liveness.members(w.redis, key) == {"node-4": ""}
    assert w.redis.hkeys("quorum:alive:versions:engine:e2") == []  # node-2's version went with it


def test_a_missing_engine_with_a_live_worker_gets_another_deadline(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    liveness.heartbeat(w.redis, keys.engine_alive("e2"), "node-1", ttl_s=12)
    w.redis.rpush(engine_queue("e2"), b"a search of another probe")  # e2 is busy: its queue is not empty
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert res.status == "extended" and res.detail == {"waiting_for": ["e2"], "redriven": []}
    assert [(m.task, m.kwargs, m.countdown) for m in res.send] == [
        (TASK_FUSE, {"request_id": job.request_id, "final": True}, w.settings.fusion_deadline_s)
    ]
    # e2's queue is empty and its search has not answered: the message was lost, send it again.
    w.redis.delete(engine_queue("e2"))
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert res.detail == {"waiting_for": ["e2"], "redriven": ["e2"]}
    assert [(m.task, m.kwargs, m.queue, m.task_id) for m in res.send[:1]] == [
        (TASK_SEARCH, {"request_id": job.request_id, "engine": "e2"}, engine_queue("e2"), f"{job.request_id}.e2")
    ]
    # Past the search timeout, it waits no more: the list goes out degraded.
    w.clock += w.settings.search_timeout_s + 1
    late = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert isinstance(late.published, CandidateList) and late.published.degraded
    assert late.published.engines_failed == {"e2": Code.ENGINE_TIMEOUT.value}


def test_a_missing_engine_without_a_live_worker_is_left_out_at_the_deadline(w):
    job = w.prepared()
    stages.search(w.ctx(), request_id=job.request_id, engine="e1")
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True)
    assert isinstance(res.published, CandidateList)
    assert res.published.degraded and res.published.engines_contributed == ["e1"]
    assert res.published.engines_failed == {"e2": Code.ENGINE_TIMEOUT.value}


def test_no_engine_result_is_an_error_and_an_empty_gallery_says_so(w):
    job = w.prepared()
    for e in ENGINES:
        w.replicas[e] = StandInReplica(GalleryIndex(DIM))
    _both_engines(w, job)
    res = stages.fuse(w.ctx(), request_id=job.request_id)
    assert isinstance(res.published, ErrorResult) and res.published.code == Code.GALLERY_EMPTY.value
    assert res.published.stage == "fusion"

    job2 = w.prepared()
    w.engines["e1"].fail = RuntimeError("x")
    _both_engines(w, job2)
    res2 = stages.fuse(w.ctx(), request_id=job2.request_id)
    assert isinstance(res2.published, ErrorResult) and res2.published.code == Code.NO_ENGINE_RESULT.value

    job3 = w.prepared()  # the probe's image out of reach for every engine (the store away): said so
    for e in ENGINES:
        w.engines[e].fail = ServiceError(Code.STORE_UNAVAILABLE, "store away")
    _both_engines(w, job3)
    res3 = stages.fuse(w.ctx(), request_id=job3.request_id)
    assert isinstance(res3.published, ErrorResult) and res3.published.code == Code.STORE_UNAVAILABLE.value
    assert res3.published.retryable


def test_the_intake_watchdog_sends_prepare_again_only_when_intake_has_nothing_queued(w):
    job = w.job()  # admitted, but its prepare message never reached a worker
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert res.status == "intake_pending" and res.detail == {"redriven": True}
    assert [(m.task, m.kwargs, m.queue, m.countdown) for m in res.send] == [
        (TASK_PREPARE, {"request_id": job.request_id}, INTAKE_QUEUE, None),
        (TASK_FUSE, {"request_id": job.request_id, "final": True, "watchdog": True}, FUSION_QUEUE, 5.0),
    ]
    w.redis.rpush(INTAKE_QUEUE, b"other probes waiting")  # a backlog, not a loss: just look again later
    busy = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert busy.detail == {"redriven": False} and [m.task for m in busy.send] == [TASK_FUSE]
    # Past the search timeout the probe is answered, retryable.
    w.clock += w.settings.search_timeout_s
    late = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert isinstance(late.published, ErrorResult) and late.published.code == Code.SEARCH_TIMEOUT.value
    assert late.published.retryable and late.send == ()


def test_after_intake_the_watchdog_sends_lost_searches_and_a_lost_fuse_again(w):
    """A Redis failover can drop what the old primary had not replicated: an engine's search, the last
    engine's fuse. The watchdog (a timer replicated before the entry was acknowledged) keeps coming back
    until the request is answered."""
    job = w.prepared()
    watch = (TASK_FUSE, {"request_id": job.request_id, "final": True, "watchdog": True}, FUSION_QUEUE, 5.0)
    res = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert res.status == "watching" and res.published is None  # no engine alive: nothing to send again
    assert [(m.task, m.kwargs, m.queue, m.countdown) for m in res.send] == [watch]
    liveness.heartbeat(w.redis, keys.engine_alive("e1"), "node-1", ttl_s=30)  # alive, its queue empty: lost
    lost = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert lost.detail == {"missing": ["e1", "e2"], "redriven": ["e1"]}
    assert [(m.task, m.kwargs, m.queue) for m in lost.send[:1]] == [
        (TASK_SEARCH, {"request_id": job.request_id, "engine": "e1"}, engine_queue("e1"))
    ]
    w.redis.rpush(engine_queue("e1"), b"a backlog, not a loss")
    busy = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert busy.detail["redriven"] == [] and [m.task for m in busy.send] == [TASK_FUSE]
    _both_engines(w, job)  # every engine in, and the fuse the last one sent lost: the watchdog sends it
    done = stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True)
    assert done.status == "intake_done" and [(m.task, m.kwargs) for m in done.send] == [
        (TASK_FUSE, {"request_id": job.request_id, "final": False})
    ]
    assert isinstance(stages.fuse(w.ctx(), request_id=job.request_id, final=False).published, CandidateList)
    assert stages.fuse(w.ctx(), request_id=job.request_id, final=True, watchdog=True).status == "gone"
    fresh = w.job()  # a deadline (not the watchdog) for a probe without a face yet: nothing to do
    assert stages.fuse(w.ctx(), request_id=fresh.request_id, final=True).status == "gone"


# ---- enrolment --------------------------------------------------------------------------------------------


def _record(w, *subjects: str) -> None:
    """Subjects' records, as bulk enrolment writes them before their images reach the engines."""
    for sj in subjects:
        w.redis.hset(keys.GALLERY_SUBJECTS, sj, "{}")


def _logged(w, engine: str) -> list[tuple[str, str]]:
    """(subject, image) of every add in the engine's (unsharded) log."""
    entries = w.redis.xrange(keys.gallery_log(engine, f"{engine}-v1"))
    return [(keys.as_str(f[b"subject"]), keys.as_str(f[b"image"])) for _, f in entries if f[b"op"] == b"add"]


def test_enrolment_logs_templates_once_and_reports_failures_by_code(w):
    items = [{"subject_id": "p1", "image_key": "g/1.jpg"}, {"subject_id": "p2", "image_key": "g/2.jpg"}]
    _record(w, "p1", "p2")
    res = stages.enrol(w.ctx(), engine="e1", items=items)
    assert res.detail == {
        "engine": "e1",
        "version": "e1-v1",
        "enrolled": 2,
        "expunged_meanwhile": 0,
        "skipped": 0,
        "failed": [],
        "detected_here": 2,
    }
    assert _logged(w, "e1") == [("p1", "g/1.jpg"), ("p2", "g/2.jpg")]
    again = stages.enrol(w.ctx(), engine="e1", items=items)
    assert again.detail["enrolled"] == 0 and again.detail["skipped"] == 2
    assert len(_logged(w, "e1")) == 2
    w.faces = []
    bad = stages.enrol(w.ctx(), engine="e1", items=[{"subject_id": "p3", "image_key": "g/3.jpg"}])
    assert bad.detail["failed"] == [{"subject_id": "p3", "image_key": "g/3.jpg", "code": Code.NO_FACE.value}]


def test_bulk_enrolment_detects_each_face_once_for_every_engine(w):
    _record(w, "p1", "p2", "p3")
    detections: list[int] = []
    w_detect = w.ctx().detect
    ctx = StageContext(**{**w.ctx().__dict__, "detect": lambda image: detections.append(1) or w_detect(image)})
    items = [{"subject_id": "p1", "image_key": "g/1.jpg"}, {"subject_id": "p2", "image_key": "g/2.jpg"}]
    ids = {e: f"task-{e}" for e in ENGINES}
    found = stages.enrol_detect(ctx, items=items, engines=list(ENGINES), task_ids=ids)
    assert len(detections) == 2 and found.detail == {"faces": 2, "failed": 0}
    assert [(m.task, m.queue, m.task_id) for m in found.send] == [
        (TASK_ENROL, engine_queue(e), f"task-{e}") for e in ENGINES
    ]
    for m in found.send:
        out = stages.enrol(ctx, **m.kwargs)
        assert out.detail["enrolled"] == 2 and out.detail["detected_here"] == 0
    assert len(detections) == 2  # the engines used the faces found once
    assert all(_logged(w, e) == [("p1", "g/1.jpg"), ("p2", "g/2.jpg")] for e in ENGINES)
    # An image without a face is reported by every engine with its code, and embedded by none.
    w.faces = []
    none = stages.enrol_detect(ctx, items=[{"subject_id": "p3", "image_key": "g/3.jpg"}], engines=["e1"], task_ids=ids)
    (m,) = none.send
    out = stages.enrol(ctx, **m.kwargs)
    assert out.detail["enrolled"] == 0
    assert out.detail["failed"] == [{"subject_id": "p3", "image_key": "g/3.jpg", "code": Code.NO_FACE.value}]


# ---- observers -------------------------------------------------------------------------------------------------


def _sample(counter: Any, *labels: str) -> float:
    return counter.labels(*labels)._value.get()


def test_every_answer_is_audited_before_it_is_published_and_once(w):
    w.faces = []
    bad = w.job()
    stages.prepare(w.ctx(), request_id=bad.request_id)
    w.faces = [FACE]
    good = w.prepared()
    _both_engines(w, good)
    stages.fuse(w.ctx(), request_id=good.request_id)
    stages.fuse(w.ctx(), request_id=good.request_id, final=True)  # the deadline, late: nothing more
    assert w.audited == [(bad.request_id, "error"), (good.request_id, "candidate_list")]


def test_an_answer_is_held_while_the_audit_database_is_away_then_published(w):
    job = w.prepared()
    _both_engines(w, job)
    w.audit_down = True
    held = stages.fuse(w.ctx(), request_id=job.request_id)
    assert held.status == "audit_pending" and held.published is None
    assert fetch(w.redis, job.agency_id, job.request_id) is None  # nothing reached the agency
    (again,) = held.send
    assert again.kwargs == {"request_id": job.request_id, "final": True} and again.countdown == stages.AUDIT_RETRY_S
    w.audit_down = False
    res = stages.fuse(w.ctx(), **again.kwargs)
    assert isinstance(res.published, CandidateList) and w.audited == [(job.request_id, "candidate_list")]
    # The same in intake: a bad probe's refusal waits for the audit trail too (the task retries).
    w.audit_down = True
    w.faces = []
    bad = w.job()
    with pytest.raises(ServiceError):
        stages.prepare(w.ctx(), request_id=bad.request_id)
    assert fetch(w.redis, bad.agency_id, bad.request_id) is None


def test_a_second_fusion_while_one_is_answering_asks_again_later(w):
    job = w.prepared()
    _both_engines(w, job)
    w.redis.set(keys.answer_lock(job.request_id), 1)
    res = stages.fuse(w.ctx(), request_id=job.request_id)
    assert res.status == "held" and res.published is None and not w.audited
    assert [m.countdown for m in res.send] == [stages.AUDIT_RETRY_S]


def test_observers_count_each_published_answer_once(w):
    w.faces = []
    bad = w.job()
    bad_res = stages.prepare(w.ctx(), request_id=bad.request_id)
    before = _sample(metrics.PROBES_REJECTED, bad.agency_id, Code.NO_FACE.value)
    StageMetrics().stage_finished(bad_res)
    assert _sample(metrics.PROBES_REJECTED, bad.agency_id, Code.NO_FACE.value) == before + 1

    w.faces = [FACE]
    good = w.prepared()
    for e in ENGINES:
        StageMetrics().stage_finished(stages.search(w.ctx(), request_id=good.request_id, engine=e))
    ok_before = _sample(metrics.SEARCHES_COMPLETED, good.agency_id, "ok")
    latency_sum = metrics.SEARCH_DURATION.labels(good.agency_id, "ok")._sum.get()
    w.clock += 2.5  # the answer is published 2.5 s after receipt
    StageMetrics().stage_finished(stages.fuse(w.ctx(), request_id=good.request_id))
    assert metrics.SEARCH_DURATION.labels(good.agency_id, "ok")._sum.get() == pytest.approx(latency_sum + 2.5)
    StageMetrics().stage_finished(stages.fuse(w.ctx(), request_id=good.request_id, final=True))  # gone: nothing
    assert _sample(metrics.SEARCHES_COMPLETED, good.agency_id, "ok") == ok_before + 1


def test_observers_count_engine_failures_by_engine_and_code(w):
    job = w.prepared()
    w.engines["e1"].fail = RuntimeError("x")
    before = _sample(metrics.ENGINE_FAILURES, "e1", Code.ENGINE_FAILED.value)
    StageMetrics().stage_finished(stages.search(w.ctx(), request_id=job.request_id, engine="e1"))
    assert _sample(metrics.ENGINE_FAILURES, "e1", Code.ENGINE_FAILED.value) == before + 1
