"""The pipeline's stages as plain functions: intake, engine search, fusion, enrolment, snapshot.

Each stage takes an explicit :class:`StageContext` (Redis, settings and the process's lazily loaded
parts) and named arguments, does its work against Redis and the object store, and returns a
:class:`StageResult`: a status, the messages to send next (:class:`Send`, by task name), and what it
produced (an answer it published, an engine's result). It sends nothing through Celery and records
no metric or audit itself: the Celery tasks (``workers.tasks``) are few-line adapters that run a
stage, hand its result to the hooks (``workers.hooks``: audit of answers, metrics, logs) and send its
messages. The stages are therefore unit-tested with a context built from fakes
(``tests/unit/test_stages.py``); integration tests run them through real workers.

A probe's life: the gateway admits it and sends ``prepare``; :func:`prepare` finds the face and asks
for one ``search`` per engine plus a backstop ``fuse`` at ``search_timeout_s``; :func:`search`
records one engine's result and, when it is the first in, asks for a ``fuse`` at
``fusion_deadline_s``, and when it is the last, for a ``fuse`` now; :func:`fuse` publishes the
candidate list exactly once (``broker.results``). If the deadline passes with engines missing,
an engine whose workers are alive (their heartbeat key exists) is busy, not down: fusion waits
another deadline for it, up to ``search_timeout_s`` from receipt; one with no live worker is left
out and the list is marked degraded.

Every stage is idempotent, so late acknowledgement and redelivery after a worker dies are safe: an
engine result is a hash field that a rerun does not recompute, enrolment skips templates already
logged, and publication is guarded by the request's result key.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from ..broker import deadlines, keys, liveness
from ..broker.app import (
    FUSION_QUEUE,
    INTAKE_QUEUE,
    TASK_ENROLL,
    TASK_FUSE,
    TASK_PREPARE,
    TASK_SEARCH,
    TASK_SHARD_SEARCH,
    TASK_SNAPSHOT,
    engine_queue,
    shard_queue,
)
from ..broker.jobs import load_job, save_job
from ..broker.results import publish
from ..core.config import Settings
from ..core.errors import Code, InputError, QuorumError, ServiceError
from ..schemas import CandidateList, EngineCandidate, EngineResult, ErrorResult, FusedCandidate
from ..schemas.job import Job, SearchedFace
from ..schemas.messages import MAX_CANDIDATES
from . import fusion, watchdog
from .detect import choose_face
from .faces import Face
from .index import Hit
from .shards import merge

log = structlog.get_logger()


@dataclass(frozen=True)
class StageContext:
    """What a stage may use. ``workers.runtime.Runtime.context()`` builds the production one, whose
    callables load the detector, engines and gallery replicas once per process on first use."""

    redis: Any
    settings: Settings
    load_image: Callable[[str], np.ndarray]  # object-store key -> decoded BGR image, under size limits
    detect: Callable[[np.ndarray], list[Face]]
    engine: Callable[[str], Any]  # name -> workers.engines.Engine
    # (name) -> the engine's workers.replica.GalleryReplica; (name, shard) -> one shard's (synced on use)
    replica: Callable[..., Any]
    # Writes a request's answer to the audit trail before it is published (once per request; raises
    # ServiceError(AUDIT_UNAVAILABLE) if it cannot): accountability.audit.record_result in production.
    record_result: Callable[[Job, Any, dict | None], bool]
    calibration: Callable[[], Any] = lambda: None  # fusion calibration (None: uncalibrated methods only)
    # (engine name, [(image, face), ...]) -> (n, dim) templates. In an engine worker the call is shared
    # with the other tasks it runs at once (workers.batching); None: the engine's embed_batch directly.
    embed: Callable[[str, Sequence[tuple[np.ndarray, Face]]], np.ndarray] | None = None
    now: Callable[[], float] = time.time


@dataclass(frozen=True)
class Send:
    """A message a stage asks to be sent: a task by name, its named arguments, where and when."""

    task: str
    kwargs: dict[str, Any]
    queue: str
    task_id: str | None = None
    countdown: float | None = None


@dataclass(frozen=True)
class StageResult:
    stage: str  # intake, engine, fusion, enrolment
    status: str  # what happened, e.g. dispatched, error, missing, done, gone, waiting, extended, published
    job: Job | None = None
    send: tuple[Send, ...] = ()
    published: CandidateList | ErrorResult | None = None  # the request's answer, if this stage published it
    engine_results: dict[str, EngineResult] = field(default_factory=dict)  # fusion: what each engine said
    engine_result: EngineResult | None = None  # search: this engine's result, if computed now
    gallery_templates: int | None = None  # search: the replica's size when it searched
    detail: dict[str, Any] = field(default_factory=dict)


class AnswerHeld(Exception):
    """Another process is auditing and publishing this request's answer right now."""


def _answer(
    ctx: StageContext, job: Job, result: CandidateList | ErrorResult, engines: dict | None = None
) -> CandidateList | ErrorResult | None:
    """Audit, then publish, the request's answer, once. Returns it if this call published it.

    No answer reaches an agency without its audit record: ``ctx.record_result`` (the audit write,
    idempotent per request) comes first and raises ``AUDIT_UNAVAILABLE`` if the database is away, and
    then nothing is published. A per-request lock keeps two fusion calls from auditing one request
    twice; the loser raises :class:`AnswerHeld`.
    """
    r, s = ctx.redis, ctx.settings
    if r.exists(keys.result_key(job.agency_id, job.request_id)):
        return None
    lock = keys.answer_lock(job.request_id)
    if not r.set(lock, 1, nx=True, ex=60):
        raise AnswerHeld(job.request_id)
    try:
        ctx.record_result(job, result, engines)
        published = result if publish(r, result, ttl_s=s.result_ttl_s) else None
        r.set(keys.job_published_key(job.request_id), 1, ex=s.result_ttl_s)
        return published
    finally:
        r.delete(lock)


def _error(job: Job, err: QuorumError, stage: str) -> ErrorResult:
    return ErrorResult(
        request_id=job.request_id,
        agency_id=job.agency_id,
        stream_entry_id=job.stream_entry_id,
        code=err.code.value,
        message=err.message,
        retryable=err.retryable,
        stage=stage,
    )


def fuse_message(request_id: str, *, final: bool, countdown: float | None = None, task_id: str | None = None) -> Send:
    return Send(TASK_FUSE, {"request_id": request_id, "final": final}, FUSION_QUEUE, task_id, countdown)


def watchdog_message(request_id: str, countdown: float) -> Send:
    """The intake watchdog (scheduled at admission, see :func:`fuse`): a fusion call that checks intake ran."""
    t = deadlines.intake_watchdog(request_id)
    return Send(t.task, t.kwargs, t.queue, t.timer_id, countdown)


def search_message(request_id: str, engine: str) -> Send:
    return Send(
        TASK_SEARCH, {"request_id": request_id, "engine": engine}, engine_queue(engine), f"{request_id}.{engine}"
    )


def shard_search_message(request_id: str, engine: str, shard: int, shards: int) -> Send:
    return Send(
        TASK_SHARD_SEARCH,
        {"request_id": request_id, "engine": engine, "shard": shard, "shards": shards},
        shard_queue(engine, shard, shards),
        f"{request_id}.{engine}.{shard}of{shards}",
    )


def prepare_message(request_id: str) -> Send:
    return Send(TASK_PREPARE, {"request_id": request_id}, INTAKE_QUEUE, f"{request_id}.prepare")


# ---- intake: decode, detect, choose the face, fan out ------------------------------------------------


def prepare(ctx: StageContext, *, request_id: str, last_attempt: bool = True) -> StageResult:
    """Find the face to search and fan the job out to its engines.

    A bad probe (not decodable, no face, ambiguous face choice...) is answered with its error code.
    A failing dependency (``ServiceError``) is raised for the caller to retry, unless this is the
    last attempt, when it too is answered as an error.
    """
    s = ctx.settings
    job = load_job(ctx.redis, request_id)
    if job is None:
        log.warning("intake.job_missing", request_id=request_id)
        return StageResult("intake", "missing")
    failure: QuorumError | None = None
    t0 = time.perf_counter()
    try:
        image = ctx.load_image(job.image_key)
        faces = ctx.detect(image)
        idx, face = choose_face(faces, job.face_index, min_face_pixels=s.min_face_pixels)
    except InputError as err:
        failure = err
    except ServiceError as err:
        if not last_attempt:
            raise
        failure = err
    except Exception as exc:  # never crash on input: anything unexpected is an error result
        log.exception("intake.unexpected", request_id=request_id)
        failure = QuorumError(Code.INTERNAL, f"{type(exc).__name__}")
    if failure is not None:
        # An audit database that is away raises here (AUDIT_UNAVAILABLE): the task retries, and the
        # intake watchdog sends prepare again after that; nothing is answered unaudited.
        try:
            published = _answer(ctx, job, _error(job, failure, "intake"))
        except AnswerHeld:
            published = None
        return StageResult("intake", failure.code.value, job, published=published)
    job = job.with_face(
        SearchedFace(
            index=idx,
            faces_found=len(faces),
            box=face.box,
            detector_score=face.score,
            landmarks=face.landmarks,
            chosen_by="request" if job.face_index is not None else "largest",
        )
    ).model_copy(update={"intake_ms": round((time.perf_counter() - t0) * 1000, 2)})
    save_job(ctx.redis, job, ttl_s=s.result_ttl_s)
    send = [search_message(request_id, e) for e in job.engines]
    # The backstop: answers even if no engine ever does (every engine worker down).
    send.append(fuse_message(request_id, final=True, countdown=s.search_timeout_s, task_id=f"{request_id}.timeout"))
    return StageResult("intake", "dispatched", job, send=tuple(send))


# ---- engines: embed and search ------------------------------------------------------------------------


def engine_list_length(job: Job) -> int:
    # Fusion standardises each engine's scores against the list's bulk, so engines always return a
    # full list even when the agency asked for a few candidates.
    return max(job.candidates, MAX_CANDIDATES)


def _coded(err: Exception, event: str, **context: Any) -> tuple[str, str]:
    """(code, message) of an engine-side failure: a QuorumError's own, ENGINE_FAILED (logged as
    ``event``) for anything else."""
    if isinstance(err, QuorumError):
        return err.code.value, err.message
    log.error(event, error=repr(err), **context)
    return Code.ENGINE_FAILED.value, type(err).__name__


def _engine_error(job: Job, engine: str, version: str, err: Exception, **extra: Any) -> EngineResult:
    """An engine's error result: a stable code for a QuorumError, ENGINE_FAILED for anything else."""
    code, message = _coded(err, "engine.unexpected", engine=engine, request_id=job.request_id)
    return EngineResult(
        request_id=job.request_id,
        engine=engine,
        engine_version=version,
        status="error",
        error_code=code,
        error_message=message,
        **extra,
    )


def embed_faces(ctx: StageContext, engine: str, items: Sequence[tuple[np.ndarray, Face]]) -> np.ndarray:
    """Templates of ``items`` by one engine: through the worker's micro-batcher when it has one."""
    if not items:
        return np.empty((0, ctx.engine(engine).dim), dtype=np.float32)
    if ctx.embed is not None:
        return ctx.embed(engine, items)
    return ctx.engine(engine).embed_batch(items)


def _embed(ctx: StageContext, job: Job, engine: str) -> np.ndarray:
    """The probe's chosen face embedded by one engine."""
    image = ctx.load_image(job.image_key)
    if job.face is None:
        raise QuorumError(Code.INTERNAL, "the job has no face (intake did not run)")
    f = job.face
    return embed_faces(ctx, engine, [(image, Face(box=f.box, landmarks=f.landmarks, score=f.detector_score))])[0]


def run_engine(ctx: StageContext, job: Job, engine_name: str) -> tuple[EngineResult, int | None]:
    """Embed the probe's chosen face with one engine and search that engine's gallery.

    Returns the engine's result (an error result on any failure: an engine never raises) and the
    number of templates its gallery replica held when it searched (None if it never got that far).
    """
    templates: int | None = None
    version = "unknown"
    try:
        engine = ctx.engine(engine_name)
        version = engine.version
        replica = ctx.replica(engine_name)
        t0 = time.perf_counter()
        vec = _embed(ctx, job, engine_name)
        t1 = time.perf_counter()
        replica.sync()
        templates = len(replica.index)
        if templates == 0:
            raise ServiceError(Code.GALLERY_EMPTY, f"the {engine_name} gallery is empty")
        hits = replica.index.search(vec, engine_list_length(job))
        t2 = time.perf_counter()
    except Exception as err:
        return _engine_error(job, engine_name, version, err), templates
    return EngineResult(
        request_id=job.request_id,
        engine=engine_name,
        engine_version=version,
        status="ok",
        candidates=_ranked(hits),
        gallery_size=replica.index.subjects,
        embed_ms=round((t1 - t0) * 1000, 2),
        search_ms=round((t2 - t1) * 1000, 2),
    ), templates


def _ranked(hits: Sequence[Hit]) -> list[EngineCandidate]:
    return [EngineCandidate(subject_id=h.subject_id, rank=i + 1, score=round(h.score, 6)) for i, h in enumerate(hits)]


def _record(ctx: StageContext, job: Job, engine: str, result: EngineResult | None) -> list[Send]:
    """Record an engine's result for a job (the first one recorded stands: redelivery and a late shard
    change nothing) and say what fusion needs: a deadline when it is the first engine in, a fusion
    now when it is the last."""
    r, s = ctx.redis, ctx.settings
    results_key = keys.job_results_key(job.request_id)
    first = False
    if result is None:
        answered = r.hlen(results_key)
    else:
        pipe = r.pipeline(transaction=True)  # atomic: exactly one engine sees itself as the first
        pipe.hsetnx(results_key, engine, result.model_dump_json())
        pipe.hlen(results_key)
        pipe.expire(results_key, s.result_ttl_s)
        added, answered, _ = pipe.execute()
        first = bool(added) and answered == 1
    send: list[Send] = []
    if first and len(job.engines) > 1:
        # First answer in: the others get fusion_deadline_s more, then fusion goes without them.
        send.append(
            fuse_message(
                job.request_id, final=True, countdown=s.fusion_deadline_s, task_id=f"{job.request_id}.deadline"
            )
        )
    if answered >= len(job.engines):
        send.append(fuse_message(job.request_id, final=False))
    return send


def _gave_up(ctx: StageContext, job: Job, engine: str, shard: int | None = None) -> EngineResult | None:
    """ENGINE_TIMEOUT for an engine (or shard) search of this probe that already ran past the task time
    limit ``task_overrun_max`` times (``workers.watchdog``): it is not run again."""
    task = TASK_SEARCH if shard is None else TASK_SHARD_SEARCH
    n = watchdog.overruns(ctx.redis, job.request_id, keys.overrun_part(task, engine, shard))
    if n < ctx.settings.task_overrun_max:
        return None
    where = engine if shard is None else f"{engine} shard {shard}"
    err = ServiceError(
        Code.ENGINE_TIMEOUT,
        f"the {where} search of this probe ran past the task time limit ({ctx.settings.task_time_limit:g}s) "
        f"{n} times; it is not run again",
    )
    return _engine_error(job, engine, "unknown", err)


def search(ctx: StageContext, *, request_id: str, engine: str) -> StageResult:
    """Record one engine's result for a job (once), and ask for fusion when the job needs it.

    For a sharded engine (``settings.shards``) this embeds the face once and scatters the vector to
    every shard (:func:`scatter`); the shards' answers are merged by :func:`shard_search`."""
    r = ctx.redis
    job = load_job(r, request_id)
    if job is None or r.exists(keys.job_published_key(request_id)):
        return StageResult("engine", "gone", job)
    answered = r.hexists(keys.job_results_key(request_id), engine)  # a redelivery does not recompute
    if not answered and (gave_up := _gave_up(ctx, job, engine)):
        send = tuple(_record(ctx, job, engine, gave_up))
        return StageResult("engine", "gave_up", job, send=send, engine_result=gave_up)
    if ctx.settings.shards_of(engine) > 1:
        return scatter(ctx, job, engine)
    result: EngineResult | None = None
    templates: int | None = None
    if not answered:
        result, templates = run_engine(ctx, job, engine)
    send = _record(ctx, job, engine, result)
    return StageResult("engine", "done", job, send=tuple(send), engine_result=result, gallery_templates=templates)


# ---- sharded engines: embed once, search every shard, merge -------------------------------------------


def scatter(ctx: StageContext, job: Job, engine: str) -> StageResult:
    """Embed the probe once with a sharded engine, keep the vector in Redis for the shards (with the
    job's lifetime) and ask every shard that has not answered yet to search it."""
    r, s = ctx.redis, ctx.settings
    shards = s.shards_of(engine)
    if r.hexists(keys.job_results_key(job.request_id), engine):  # merged already (or failed): a redelivery
        return StageResult("engine", "done", job, send=tuple(_record(ctx, job, engine, None)))
    vkey = keys.job_vector_key(job.request_id, engine)
    if not r.exists(vkey):
        version = "unknown"
        try:
            eng = ctx.engine(engine)
            version = eng.version
            t0 = time.perf_counter()
            vec = np.asarray(_embed(ctx, job, engine), dtype="<f4")
            embed_ms = round((time.perf_counter() - t0) * 1000, 2)
        except Exception as err:
            result = _engine_error(job, engine, version, err, shards=shards)
            return StageResult(
                "engine", "done", job, send=tuple(_record(ctx, job, engine, result)), engine_result=result
            )
        pipe = r.pipeline(transaction=True)
        pipe.hset(vkey, mapping={"vec": vec.tobytes(), "version": version, "embed_ms": embed_ms})
        pipe.expire(vkey, s.result_ttl_s)
        pipe.execute()
    answered = {int(k) for k in r.hkeys(keys.job_shards_key(job.request_id, engine))}
    send = tuple(shard_search_message(job.request_id, engine, i, shards) for i in range(shards) if i not in answered)
    return StageResult("engine", "scattered", job, send=send, detail={"engine": engine, "shards": shards})


def _run_shard(ctx: StageContext, job: Job, engine: str, shard: int, shards: int) -> dict[str, Any]:
    """Search one shard with the vector the engine's embed step left; a JSON-able answer, never raises."""
    r = ctx.redis
    try:
        raw = {keys.as_str(k): v for k, v in r.hgetall(keys.job_vector_key(job.request_id, engine)).items()}
        if not raw:
            raise ServiceError(Code.ENGINE_FAILED, "the probe's vector is gone (the search expired)")
        if ctx.settings.shards_of(engine) != shards:
            raise ServiceError(
                Code.ENGINE_FAILED, f"{engine} is configured with {ctx.settings.shards_of(engine)} shards, not {shards}"
            )
        replica = ctx.replica(engine, shard)
        if keys.as_str(raw["version"]) != replica.engine_version:
            raise ServiceError(
                Code.ENGINE_FAILED,
                f"the probe was embedded by {keys.as_str(raw['version'])}, the shard holds {replica.engine_version}",
            )
        vec = np.frombuffer(raw["vec"], dtype="<f4")
        t0 = time.perf_counter()
        replica.sync()
        hits = replica.index.search(vec, engine_list_length(job))
        search_ms = round((time.perf_counter() - t0) * 1000, 2)
    except Exception as err:
        code, message = _coded(err, "shard.unexpected", engine=engine, shard=shard, request_id=job.request_id)
        return {"status": "error", "code": code, "message": message}
    return {
        "status": "ok",
        "hits": [[h.subject_id, h.score] for h in hits],
        "templates": len(replica.index),
        "subjects": replica.index.subjects,
        "search_ms": search_ms,
    }


def merge_shard_answers(
    job: Job, engine: str, shards: int, answers: dict[int, dict[str, Any]], vector: dict[str, Any]
) -> EngineResult:
    """One engine's result from its shards' answers: the best ``k`` over the shards that answered (the
    same list one index over those shards would give), marked with which shards those were."""
    version = keys.as_str(vector.get("version", b"unknown"))
    ok = {i: a for i, a in answers.items() if a.get("status") == "ok"}
    if not ok:
        codes = sorted({a.get("code", Code.ENGINE_FAILED.value) for a in answers.values()})
        err = ServiceError(Code(codes[0]) if codes else Code.ENGINE_TIMEOUT, f"no shard of {engine} answered: {codes}")
        return _engine_error(job, engine, version, err, shards=shards, shards_answered=[])
    if sum(a["templates"] for a in ok.values()) == 0:
        err = ServiceError(Code.GALLERY_EMPTY, f"the {engine} gallery is empty")
        return _engine_error(job, engine, version, err, shards=shards, shards_answered=sorted(ok))
    hits = merge(([Hit(sj, float(sc)) for sj, sc in a["hits"]] for a in ok.values()), engine_list_length(job))
    return EngineResult(
        request_id=job.request_id,
        engine=engine,
        engine_version=version,
        status="ok",
        candidates=_ranked(hits),
        gallery_size=sum(a["subjects"] for a in ok.values()),
        embed_ms=float(keys.as_str(vector.get("embed_ms", b"0"))),
        search_ms=max(a["search_ms"] for a in ok.values()),
        shards=shards,
        shards_answered=sorted(ok),
    )


def _merge_now(ctx: StageContext, job: Job, engine: str, shards: int) -> EngineResult:
    r = ctx.redis
    raw = r.hgetall(keys.job_shards_key(job.request_id, engine))
    answers = {int(keys.as_str(k)): json.loads(v) for k, v in raw.items()}
    vector = {keys.as_str(k): v for k, v in r.hgetall(keys.job_vector_key(job.request_id, engine)).items()}
    return merge_shard_answers(job, engine, shards, answers, vector)


def shard_search(ctx: StageContext, *, request_id: str, engine: str, shard: int, shards: int) -> StageResult:
    """Search one shard of a sharded engine (once per shard), and when every shard has answered,
    merge their answers into the engine's result and record it as :func:`search` does."""
    r, s = ctx.redis, ctx.settings
    job = load_job(r, request_id)
    if job is None or r.exists(keys.job_published_key(request_id)):
        return StageResult("shard", "gone", job)
    if r.hexists(keys.job_results_key(request_id), engine):  # merged already, perhaps without this shard
        return StageResult("shard", "late", job, detail={"engine": engine, "shard": shard})
    shards_key = keys.job_shards_key(request_id, engine)
    answer: dict[str, Any] | None = None
    if not r.hexists(shards_key, shard):  # a redelivery does not search again
        gave_up = _gave_up(ctx, job, engine, shard)
        answer = (
            {"status": "error", "code": gave_up.error_code, "message": gave_up.error_message}
            if gave_up
            else _run_shard(ctx, job, engine, shard, shards)
        )
        pipe = r.pipeline(transaction=True)
        pipe.hsetnx(shards_key, shard, json.dumps(answer))
        pipe.hlen(shards_key)
        pipe.expire(shards_key, s.result_ttl_s)
        _, answered, _ = pipe.execute()
    else:
        answered = r.hlen(shards_key)
    detail = {"engine": engine, "shard": shard, "shards": shards, "answer": (answer or {}).get("status")}
    if answered < shards:
        return StageResult("shard", "answered", job, detail=detail)
    result = _merge_now(ctx, job, engine, shards)
    send = _record(ctx, job, engine, result)
    return StageResult("shard", "merged", job, send=tuple(send), engine_result=result, detail=detail)


# ---- fusion -------------------------------------------------------------------------------------------


def _alive(r: Any, key: str) -> bool:
    """Whether a worker's heartbeat in ``key`` still holds (a live engine or shard worker)."""
    return liveness.live(r, key) > 0


def _still_coming(ctx: StageContext, job: Job, missing: Sequence[str]) -> tuple[list[str], list[Send]]:
    """Of the engines that have not answered, those a live worker may still answer for (``sface`` or,
    for a shard, ``sface[2/4]``), and the searches to send again: a live engine's or shard's whose queue
    is empty has lost the message (a worker took it and died before acknowledging it)."""
    r, s = ctx.redis, ctx.settings
    waiting: list[str] = []
    redrive: list[Send] = []
    for e in missing:
        shards = s.shards_of(e)
        if shards > 1 and r.exists(keys.job_vector_key(job.request_id, e)):
            answered = {int(keys.as_str(k)) for k in r.hkeys(keys.job_shards_key(job.request_id, e))}
            for i in range(shards):
                if i in answered or not _alive(r, keys.shard_alive(e, i, shards)):
                    continue
                waiting.append(f"{e}[{i}/{shards}]")
                if r.llen(shard_queue(e, i, shards)) == 0:
                    redrive.append(shard_search_message(job.request_id, e, i, shards))
        elif _alive(r, keys.engine_alive(e)):
            waiting.append(e)
            if r.llen(engine_queue(e)) == 0:
                redrive.append(search_message(job.request_id, e))
    return waiting, redrive


def fuse(ctx: StageContext, *, request_id: str, final: bool = False, watchdog: bool = False) -> StageResult:
    """Merge the engines' lists into the candidate list and publish it, once.

    ``final=False`` (the last engine's call) fuses only when every engine has answered;
    ``final=True`` (a deadline or the backstop) fuses what is there, unless a missing engine is alive
    and the search timeout has not passed (then it asks for itself again a deadline later, and sends
    the missing engine's search again if that engine's queue is empty: a message a worker took and
    lost, e.g. killed between Redis handing it over and recording it as unacknowledged).

    ``watchdog=True`` is the intake watchdog the gateway schedules at admission: while the probe has
    no face yet (intake has not run) it sends ``prepare`` again if the intake queue is empty and checks
    again a deadline later; past the search timeout it answers ``SEARCH_TIMEOUT``. Once intake has run,
    the watchdog has nothing to do (the deadlines and the backstop take over).
    """
    r, s = ctx.redis, ctx.settings
    job = load_job(r, request_id)
    if job is None or r.exists(keys.result_key(job.agency_id, request_id)):
        return StageResult("fusion", "gone", job)
    if job.face is None:
        if not watchdog:
            return StageResult("fusion", "gone", job)
        if ctx.now() - job.received_at >= s.search_timeout_s:
            err = ServiceError(Code.SEARCH_TIMEOUT, f"the probe was not through intake after {s.search_timeout_s:.0f}s")
            return _held_or(ctx, job, lambda: _answer(ctx, job, _error(job, err, "intake")), Code.SEARCH_TIMEOUT.value)
        send = [watchdog_message(request_id, s.fusion_deadline_s)]
        redriven = r.llen(INTAKE_QUEUE) == 0
        if redriven:
            send.insert(0, prepare_message(request_id))
        return StageResult("fusion", "intake_pending", job, send=tuple(send), detail={"redriven": redriven})
    if watchdog:
        return StageResult("fusion", "intake_done", job)
    raw = r.hgetall(keys.job_results_key(request_id))
    results = {keys.as_str(k): EngineResult.model_validate_json(v) for k, v in raw.items()}
    if not final and len(results) < len(job.engines):
        return StageResult("fusion", "waiting", job)
    missing = [e for e in job.engines if e not in results]
    if missing and ctx.now() - job.received_at < s.search_timeout_s:
        # The deadline passed. An engine (or shard) whose workers are alive is busy, not down (a
        # backlog, one slow engine): give it another deadline rather than degrade; the search timeout
        # still bounds the wait. One with no live worker is left out now.
        waiting, redrive = _still_coming(ctx, job, missing)
        if waiting:
            return StageResult(
                "fusion",
                "extended",
                job,
                send=(*redrive, fuse_message(request_id, final=True, countdown=s.fusion_deadline_s)),
                detail={"waiting_for": waiting, "redriven": [m.kwargs.get("engine") for m in redrive]},
            )
    # A sharded engine some of whose shards answered contributes what they found, marked partial.
    for e in missing:
        shards = s.shards_of(e)
        if shards > 1 and r.hlen(keys.job_shards_key(request_id, e)):
            _record(ctx, job, e, _merge_now(ctx, job, e, shards))
            raw_e = r.hget(keys.job_results_key(request_id), e)
            if raw_e is not None:
                results[e] = EngineResult.model_validate_json(raw_e)
    missing = [e for e in job.engines if e not in results]
    ok = {e: res for e, res in results.items() if res.status == "ok"}
    failed = {e: res.error_code or Code.ENGINE_FAILED.value for e, res in results.items() if res.status != "ok"}
    for e in missing:
        failed[e] = Code.ENGINE_TIMEOUT.value
    if not ok:
        codes = set(failed.values())
        code = Code.GALLERY_EMPTY if codes == {Code.GALLERY_EMPTY.value} else Code.NO_ENGINE_RESULT
        err = ServiceError(code, f"no engine answered: {failed}")
        return _held_or(ctx, job, lambda: _answer(ctx, job, _error(job, err, "fusion")), code.value, results)
    result = assemble(ctx, job, ok, failed)
    engines = {
        e: {"status": res.status, "embed_ms": res.embed_ms, "search_ms": res.search_ms} for e, res in results.items()
    }
    return _held_or(ctx, job, lambda: _answer(ctx, job, result, engines), "published", results)


AUDIT_RETRY_S = 5.0


def _held_or(
    ctx: StageContext,
    job: Job,
    answer: Callable[[], CandidateList | ErrorResult | None],
    status: str,
    results: dict[str, EngineResult] | None = None,
) -> StageResult:
    """Run a fusion answer; if the audit database is away, or another process holds the request's
    answer, ask for fusion again in ``AUDIT_RETRY_S`` (a Redis timer) instead of publishing."""
    again = (fuse_message(job.request_id, final=True, countdown=AUDIT_RETRY_S, task_id=f"{job.request_id}.again"),)
    try:
        published = answer()
    except AnswerHeld:
        return StageResult("fusion", "held", job, send=again)
    except ServiceError as err:
        if err.code != Code.AUDIT_UNAVAILABLE:
            raise
        return StageResult("fusion", "audit_pending", job, send=again, detail={"error": err.message})
    return StageResult("fusion", status, job, published=published, engine_results=results or {})


def assemble(ctx: StageContext, job: Job, ok: dict[str, EngineResult], failed: dict[str, str]) -> CandidateList:
    """The candidate list from the engines that answered (pure, apart from the clock)."""
    assert job.face is not None
    lists = {e: [fusion.Ranked(c.subject_id, c.rank, c.score) for c in res.candidates] for e, res in ok.items()}
    versions = {e: res.engine_version for e, res in ok.items()}
    cal = ctx.calibration()
    method = fusion.effective_method(
        fusion.resolve_method(ctx.settings.fusion_method, cal), [e for e, lst in lists.items() if lst], cal, versions
    )
    quality = fusion.probe_quality(job.face.box, job.face.detector_score)
    fused = fusion.fuse(lists, job.candidates, method=method, calibration=cal, versions=versions, quality=quality)
    partial = {
        e: list(res.shards_answered)
        for e, res in ok.items()
        if res.shards_answered is not None and len(res.shards_answered) < res.shards
    }
    return CandidateList(
        request_id=job.request_id,
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
        engines_partial=partial,
        degraded=bool(failed) or bool(partial),
        duration_ms=round((ctx.now() - job.received_at) * 1000, 1),
    )


# ---- enrolment and gallery maintenance --------------------------------------------------------------------


def _gallery_face(ctx: StageContext, image: np.ndarray) -> Face:
    """The face a gallery image is enrolled with: the largest, big enough (raises its code if none)."""
    return choose_face(ctx.detect(image), None, min_face_pixels=ctx.settings.min_face_pixels)[1]


def enrol_detect(
    ctx: StageContext, *, items: Sequence[dict], engines: Sequence[str], task_ids: dict[str, str]
) -> StageResult:
    """Find the face in each gallery image once, for every engine, and hand the faces to each engine's
    enrolment (task ids chosen by the sender, who waits on them). An image without a usable face is
    reported to every engine with its code; nothing raises on input."""
    faced: list[dict] = []
    failed: list[dict] = []
    for item in items:
        try:
            faced.append({**item, "face": _gallery_face(ctx, ctx.load_image(item["image_key"])).to_dict()})
        except QuorumError as err:
            failed.append({"subject_id": item["subject_id"], "image_key": item["image_key"], "code": err.code.value})
    send = tuple(
        Send(TASK_ENROLL, {"engine": e, "items": faced, "failed": failed}, engine_queue(e), task_ids[e])
        for e in engines
    )
    return StageResult("enrolment", "detected", send=send, detail={"faces": len(faced), "failed": len(failed)})


def enroll(ctx: StageContext, *, engine: str, items: Sequence[dict], failed: Sequence[dict] = ()) -> StageResult:
    """Embed gallery images and append them to the engine's gallery log.

    ``items``: ``[{"subject_id": ..., "image_key": ..., "face": {...}}]``; an item with its ``face``
    (found once for every engine by :func:`enrol_detect`) is not detected again here. ``failed``: the
    items detection refused, reported with this engine's counts. ``detail`` holds the counts and, per
    image that could not be enrolled, its stable error code (failure to enrol is data, not an exception).
    """
    from .replica import enrolled_member, log_add_entries

    r, s = ctx.redis, ctx.settings
    eng = ctx.engine(engine)
    done_key = keys.gallery_enrolled(engine)
    failures: list[dict] = list(failed)
    todo: list[tuple[str, str, np.ndarray, Face]] = []
    detected_here = skipped = 0
    for item in items:
        subject, key = item["subject_id"], item["image_key"]
        if r.sismember(done_key, enrolled_member(subject, key, eng.version)):
            skipped += 1
            continue
        try:
            image = ctx.load_image(key)
            if item.get("face"):
                face = Face.from_dict(item["face"])
            else:
                face = _gallery_face(ctx, image)
                detected_here += 1
            todo.append((subject, key, image, face))
        except QuorumError as err:
            failures.append({"subject_id": subject, "image_key": key, "code": err.code.value})
    vectors = embed_faces(ctx, engine, [(img, face) for _, _, img, face in todo])
    subjects = [t[0] for t in todo]
    images = [t[1] for t in todo]
    # Marks each template in done_key too, and leaves out a subject expunged meanwhile (one Lua script).
    written = log_add_entries(r, engine, eng.version, subjects, vectors, images, shards=s.shards_of(engine))
    counts = {
        "engine": engine,
        "version": eng.version,
        "enrolled": len(written),
        "expunged_meanwhile": len(todo) - len(written),
        "skipped": skipped,
        "failed": failures,
        "detected_here": detected_here,
    }
    return StageResult("enrolment", "done", detail=counts)


def snapshot(ctx: StageContext, *, engines: Sequence[str] | None = None, shard: int | None = None) -> StageResult:
    """Snapshot galleries and trim their logs. On the gallery queue (``shard=None``): each unsharded
    engine's gallery here, and for a sharded engine one snapshot message to each of its shards' queues
    (``detail["sent"]``: their task ids), so each is written by a worker that holds that shard and the
    gallery worker never loads a sharded gallery. On a shard's queue: that shard."""
    s = ctx.settings
    names = list(engines or s.engines)
    if shard is not None:
        (engine,) = names
        return StageResult("gallery", "done", detail={"snapshots": [ctx.replica(engine, shard).save_snapshot()]})
    pointers = [ctx.replica(e).save_snapshot() for e in names if s.shards_of(e) == 1]
    send = tuple(
        Send(
            TASK_SNAPSHOT,
            {"engines": [e], "shard": i},
            shard_queue(e, i, s.shards_of(e)),
            f"snapshot.{e}.{i}of{s.shards_of(e)}.{uuid.uuid4().hex[:12]}",
        )
        for e in names
        if s.shards_of(e) > 1
        for i in range(s.shards_of(e))
    )
    detail = {"snapshots": pointers, "sent": [m.task_id for m in send]}
    return StageResult("gallery", "done", send=send, detail=detail)
