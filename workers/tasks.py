"""Celery tasks: thin wrappers that fetch inputs, call pure functions and publish.

A probe's life: the gateway (``workers.gateway``) validates and stores it, then
``quorum.intake.prepare`` finds the face and fans out one ``quorum.engine.search`` per engine (and a
backstop ``quorum.fusion.fuse`` at ``search_timeout_s``); each engine records its result and, when the
last one is in,
triggers fusion. The first engine to answer starts the fusion deadline: if the others have not
answered ``fusion_deadline_s`` later and have no live worker (engine workers keep a heartbeat key),
fusion merges what arrived and marks the list degraded; a missing engine that is alive but behind
gets more time, up to ``search_timeout_s`` from receipt. Fusion
publishes the candidate list exactly once (``broker.results``).

Every task is idempotent, so late acknowledgement and redelivery after a worker dies are safe: an
engine result is a hash field that a rerun overwrites with the same value, enrolment skips
templates already logged, and publication is guarded by the request's result key.
"""

from __future__ import annotations

import time

import numpy as np
import structlog

from accountability import audit
from broker import keys
from broker.app import (
    FUSION_QUEUE,
    TASK_ENROLL,
    TASK_FUSE,
    TASK_PREPARE,
    TASK_SEARCH,
    TASK_SNAPSHOT,
    app,
    engine_queue,
)
from broker.jobs import load_job, save_job
from broker.results import publish
from core import metrics
from core.errors import Code, InputError, QuorumError, ServiceError
from schemas import CandidateList, EngineCandidate, EngineResult, ErrorResult, FusedCandidate
from schemas.job import Job, SearchedFace
from schemas.messages import MAX_CANDIDATES
from workers import fusion
from workers.runtime import runtime

log = structlog.get_logger()


def _publish_error(job: Job, err: QuorumError, stage: str) -> None:
    s = runtime.settings
    result = ErrorResult(
        request_id=job.request_id,
        agency_id=job.agency_id,
        stream_entry_id=job.stream_entry_id,
        code=err.code.value,
        message=err.message,
        retryable=err.retryable,
        stage=stage,
    )
    if publish(runtime.redis, result, ttl_s=s.result_ttl_s):
        audit.record_result(s, job, result)
        metrics.PROBES_REJECTED.labels(job.agency_id, err.code.value).inc()
        metrics.SEARCHES_COMPLETED.labels(job.agency_id, "error").inc()
        log.info("probe.error", request_id=job.request_id, code=err.code.value, stage=stage)


# ---- intake: decode, detect, choose the face, fan out ------------------------------------------


@app.task(name=TASK_PREPARE, bind=True, max_retries=5)
def prepare(self, request_id: str) -> str:
    r, s = runtime.redis, runtime.settings
    job = load_job(r, request_id)
    if job is None:
        log.warning("intake.job_missing", request_id=request_id)
        return "missing"
    try:
        from workers.detect import choose_face

        image = runtime.load_image(job.image_key)
        faces = runtime.detector.detect(image)
        idx, face = choose_face(faces, job.face_index, min_face_pixels=s.min_face_pixels)
    except InputError as err:
        _publish_error(job, err, "intake")
        return err.code.value
    except ServiceError as err:
        if self.request.retries < self.max_retries:
            raise self.retry(countdown=2**self.request.retries) from err
        _publish_error(job, err, "intake")
        return err.code.value
    except Exception as exc:  # never crash on input: anything unexpected is an error result
        log.exception("intake.unexpected", request_id=request_id)
        _publish_error(job, QuorumError(Code.INTERNAL, f"{type(exc).__name__}"), "intake")
        return Code.INTERNAL.value
    job = job.with_face(
        SearchedFace(
            index=idx,
            faces_found=len(faces),
            box=face.box,
            detector_score=face.score,
            landmarks=face.landmarks,
            chosen_by="request" if job.face_index is not None else "largest",
        )
    )
    save_job(r, job, ttl_s=s.result_ttl_s)
    for engine in job.engines:
        search.apply_async(args=[request_id, engine], queue=engine_queue(engine), task_id=f"{request_id}.{engine}")
    # The backstop: answers even if no engine ever does (every engine worker down).
    fuse.apply_async(
        args=[request_id, True], queue=FUSION_QUEUE, countdown=s.search_timeout_s, task_id=f"{request_id}.timeout"
    )
    return "dispatched"


# ---- engines: embed and search --------------------------------------------------------------------


def engine_list_length(job: Job) -> int:
    # Fusion standardises each engine's scores against the list's bulk, so engines always return a
    # full list even when the agency asked for a few candidates.
    return max(job.candidates, MAX_CANDIDATES)


def run_engine(job: Job, engine_name: str) -> EngineResult:
    """Embed the probe's chosen face with one engine and search that engine's gallery."""
    from workers.detect import Face

    engine = runtime.engine(engine_name)
    try:
        replica = runtime.replica(engine_name)
        t0 = time.perf_counter()
        image = runtime.load_image(job.image_key)
        if job.face is None:
            raise QuorumError(Code.INTERNAL, "the job has no face (intake did not run)")
        vec = engine.embed(image, Face(box=job.face.box, landmarks=job.face.landmarks, score=job.face.detector_score))
        t1 = time.perf_counter()
        replica.sync()
        metrics.GALLERY_TEMPLATES.labels(engine_name).set(len(replica.index))
        if len(replica.index) == 0:
            raise ServiceError(Code.GALLERY_EMPTY, f"the {engine_name} gallery is empty")
        hits = replica.index.search(vec, engine_list_length(job))
        t2 = time.perf_counter()
    except QuorumError as err:
        metrics.ENGINE_FAILURES.labels(engine_name, err.code.value).inc()
        return EngineResult(
            request_id=job.request_id,
            engine=engine_name,
            engine_version=engine.version,
            status="error",
            error_code=err.code.value,
            error_message=err.message,
        )
    except Exception as exc:
        log.exception("engine.unexpected", engine=engine_name, request_id=job.request_id)
        metrics.ENGINE_FAILURES.labels(engine_name, Code.ENGINE_FAILED.value).inc()
        return EngineResult(
            request_id=job.request_id,
            engine=engine_name,
            engine_version=engine.version,
            status="error",
            error_code=Code.ENGINE_FAILED.value,
            error_message=type(exc).__name__,
        )
    metrics.ENGINE_DURATION.labels(engine_name, "embed").observe(t1 - t0)
    metrics.ENGINE_DURATION.labels(engine_name, "search").observe(t2 - t1)
    return EngineResult(
        request_id=job.request_id,
        engine=engine_name,
        engine_version=engine.version,
        status="ok",
        candidates=[
            EngineCandidate(subject_id=h.subject_id, rank=i + 1, score=round(h.score, 6)) for i, h in enumerate(hits)
        ],
        gallery_size=replica.index.subjects,
        embed_ms=round((t1 - t0) * 1000, 2),
        search_ms=round((t2 - t1) * 1000, 2),
    )


@app.task(name=TASK_SEARCH)
def search(request_id: str, engine_name: str) -> str:
    r, s = runtime.redis, runtime.settings
    job = load_job(r, request_id)
    if job is None or r.exists(keys.job_published_key(request_id)):
        return "gone"
    answered = r.hlen(keys.job_results_key(request_id))
    if not r.hexists(keys.job_results_key(request_id), engine_name):  # a redelivery does not recompute
        result = run_engine(job, engine_name)
        pipe = r.pipeline(transaction=True)  # atomic: exactly one engine sees itself as the first
        pipe.hset(keys.job_results_key(request_id), engine_name, result.model_dump_json())
        pipe.hlen(keys.job_results_key(request_id))
        pipe.expire(keys.job_results_key(request_id), s.result_ttl_s)
        _, answered, _ = pipe.execute()
        if answered == 1 and len(job.engines) > 1:
            # First answer in: the others get fusion_deadline_s more, then fusion goes without them.
            fuse.apply_async(
                args=[request_id, True],
                queue=FUSION_QUEUE,
                countdown=s.fusion_deadline_s,
                task_id=f"{request_id}.deadline",
            )
    if answered >= len(job.engines):
        fuse.apply_async(args=[request_id, False], queue=FUSION_QUEUE)
    return "done"


@app.task(name=TASK_ENROLL)
def enroll(engine_name: str, items: list[dict]) -> dict:
    """Embed gallery images and append them to the engine's gallery log.

    ``items``: ``[{"subject_id": ..., "image_key": ...}]``. Returns counts and, per image that could
    not be enrolled, its stable error code (failure to enrol is data, not an exception).
    """
    from workers.detect import choose_face
    from workers.gallery import log_add_entries

    r, s = runtime.redis, runtime.settings
    engine = runtime.engine(engine_name)
    done_key = keys.gallery_enrolled(engine_name)
    failed: list[dict] = []
    todo: list[tuple[str, str, np.ndarray, object]] = []
    for item in items:
        subject, key = item["subject_id"], item["image_key"]
        if r.sismember(done_key, f"{subject}|{key}|{engine.version}"):
            continue
        try:
            image = runtime.load_image(key)
            _, face = choose_face(runtime.detector.detect(image), None, min_face_pixels=s.min_face_pixels)
            todo.append((subject, key, image, face))
        except QuorumError as err:
            failed.append({"subject_id": subject, "image_key": key, "code": err.code.value})
    vectors = engine.embed_batch([(img, face) for _, _, img, face in todo]) if todo else np.empty((0, engine.dim))
    subjects = [t[0] for t in todo]
    images = [t[1] for t in todo]
    log_add_entries(r, engine_name, engine.version, subjects, vectors, images)
    if todo:
        r.sadd(done_key, *[f"{sj}|{k}|{engine.version}" for sj, k in zip(subjects, images, strict=True)])
    return {
        "engine": engine_name,
        "enrolled": len(todo),
        "skipped": len(items) - len(todo) - len(failed),
        "failed": failed,
    }


# ---- fusion -------------------------------------------------------------------------------------------


@app.task(name=TASK_FUSE)
def fuse(request_id: str, final: bool = False) -> str:
    r, s = runtime.redis, runtime.settings
    job = load_job(r, request_id)
    if job is None or job.face is None or r.exists(keys.result_key(job.agency_id, request_id)):
        return "gone"
    raw = r.hgetall(keys.job_results_key(request_id))
    results = {k.decode(): EngineResult.model_validate_json(v) for k, v in raw.items()}
    if not final and len(results) < len(job.engines):
        return "waiting"
    missing = [e for e in job.engines if e not in results]
    if missing and time.time() - job.received_at < s.search_timeout_s:
        # The deadline passed. An engine whose workers are alive is busy, not down (a backlog, one
        # slow engine): give it another deadline rather than degrade; the search timeout still bounds
        # the wait. An engine with no live worker is left out now.
        alive = [e for e in missing if any(True for _ in r.scan_iter(keys.engine_alive_pattern(e), count=100))]
        if alive:
            fuse.apply_async(args=[request_id, True], queue=FUSION_QUEUE, countdown=s.fusion_deadline_s)
            log.info("fusion.deadline_extended", request_id=request_id, waiting_for=alive)
            return "extended"
    ok = {e: res for e, res in results.items() if res.status == "ok"}
    failed = {e: res.error_code or Code.ENGINE_FAILED.value for e, res in results.items() if res.status != "ok"}
    for e in job.engines:
        if e not in results:
            failed[e] = Code.ENGINE_TIMEOUT.value
    if not ok:
        codes = set(failed.values())
        code = Code.GALLERY_EMPTY if codes == {Code.GALLERY_EMPTY.value} else Code.NO_ENGINE_RESULT
        _publish_error(job, ServiceError(code, f"no engine answered: {failed}"), "fusion")
        r.set(keys.job_published_key(request_id), 1, ex=s.result_ttl_s)
        return code.value
    lists = {e: [fusion.Ranked(c.subject_id, c.rank, c.score) for c in res.candidates] for e, res in ok.items()}
    versions = {e: res.engine_version for e, res in ok.items()}
    cal = runtime.calibration
    method = fusion.effective_method(
        fusion.resolve_method(s.fusion_method, cal), [e for e, lst in lists.items() if lst], cal, versions
    )
    fused = fusion.fuse(lists, job.candidates, method=method, calibration=cal, versions=versions)
    duration = time.time() - job.received_at
    result = CandidateList(
        request_id=request_id,
        agency_id=job.agency_id,
        case_number=job.case_number,
        probe_sha256=job.probe_sha256,
        face=job.face.info(),
        candidates=[
            FusedCandidate(
                rank=f.rank,
                subject_id=f.subject_id,
                fused_score=f.fused_score,
                engines={e: {"rank": rk, "score": sc} for e, (rk, sc) in f.engines.items()},
            )
            for f in fused
        ],
        fusion_method=method,
        engines_contributed=sorted(ok),
        engines_failed=failed,
        degraded=bool(failed),
        duration_ms=round(duration * 1000, 1),
    )
    if publish(r, result, ttl_s=s.result_ttl_s):
        audit.record_result(
            s,
            job,
            result,
            engines={
                e: {"status": res.status, "embed_ms": res.embed_ms, "search_ms": res.search_ms}
                for e, res in results.items()
            },
        )
        outcome = "degraded" if failed else "ok"
        metrics.SEARCHES_COMPLETED.labels(job.agency_id, outcome).inc()
        metrics.SEARCH_DURATION.labels(outcome).observe(duration)
        log.info(
            "search.published",
            request_id=request_id,
            outcome=outcome,
            candidates=len(fused),
            duration_ms=result.duration_ms,
        )
    r.set(keys.job_published_key(request_id), 1, ex=s.result_ttl_s)
    return "published"


# ---- gallery maintenance ---------------------------------------------------------------------------------


@app.task(name=TASK_SNAPSHOT)
def snapshot(engines: list[str] | None = None) -> list[dict]:
    names = engines or list(runtime.settings.engines)
    return [runtime.replica(e).save_snapshot() for e in names]
