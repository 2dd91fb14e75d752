"""Engine search: embed the probe's face with one engine and search its gallery, or, for a sharded engine,
embed once and scatter the vector to every shard (``workers.stages.shards`` searches and merges them).

An engine never raises on a probe: any failure is its result, with a stable code (failure is data).
Every engine's result is recorded once per request (:func:`record_engine_result`); the first in asks for
fusion's deadline, the last for fusion now.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import structlog

from ...broker import keys
from ...broker.app import TASK_SEARCH, TASK_SHARD_SEARCH
from ...broker.jobs import load_job
from ...core.errors import Code, QuorumError, ServiceError
from ...schemas import EngineCandidate, EngineResult
from ...schemas.job import Job
from ...schemas.messages import MAX_CANDIDATES
from .. import watchdog
from ..faces import Face
from ..index import Hit
from .context import Outcome, Send, StageContext, StageResult, fuse_message, shard_search_message

log = structlog.get_logger()


def engine_list_length(job: Job) -> int:
    """How many candidates an engine returns: a full list even when the agency asked for a few, since
    fusion standardises each engine's scores against the list's bulk."""
    return max(job.candidates, MAX_CANDIDATES)


def coded(err: Exception, event: str, **context: Any) -> tuple[str, str]:
    """(code, message) of an engine-side failure: a QuorumError's own, ENGINE_FAILED (logged as
    ``event``) for anything else."""
    if isinstance(err, QuorumError):
        return err.code.value, err.message
    log.error(event, error=repr(err), **context)
    return Code.ENGINE_FAILED.value, type(err).__name__


def engine_error(job: Job, engine: str, version: str, err: Exception, **extra: Any) -> EngineResult:
    """An engine's error result: a stable code for a QuorumError, ENGINE_FAILED for anything else."""
    code, message = coded(err, "engine.unexpected", engine=engine, request_id=job.request_id)
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


def embed_probe(ctx: StageContext, job: Job, engine: str) -> np.ndarray:
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
        vec = embed_probe(ctx, job, engine_name)
        t1 = time.perf_counter()
        replica.sync()
        templates = len(replica.index)
        if templates == 0:
            raise ServiceError(Code.GALLERY_EMPTY, f"the {engine_name} gallery is empty")
        hits = replica.index.search(vec, engine_list_length(job))
        t2 = time.perf_counter()
    except Exception as err:
        return engine_error(job, engine_name, version, err), templates
    return EngineResult(
        request_id=job.request_id,
        engine=engine_name,
        engine_version=version,
        status="ok",
        candidates=ranked(hits),
        gallery_size=replica.index.subjects,
        embed_ms=round((t1 - t0) * 1000, 2),
        search_ms=round((t2 - t1) * 1000, 2),
    ), templates


def ranked(hits: Sequence[Hit]) -> list[EngineCandidate]:
    """Hits, best first, as the engine's ranked candidates."""
    return [EngineCandidate(subject_id=h.subject_id, rank=i + 1, score=round(h.score, 6)) for i, h in enumerate(hits)]


def record_engine_result(ctx: StageContext, job: Job, engine: str, result: EngineResult | None) -> list[Send]:
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


def gave_up(ctx: StageContext, job: Job, engine: str, shard: int | None = None) -> EngineResult | None:
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
    return engine_error(job, engine, "unknown", err)


def search(ctx: StageContext, *, request_id: str, engine: str) -> StageResult:
    """Record one engine's result for a job (once), and ask for fusion when the job needs it.

    For a sharded engine (``settings.shards``) this embeds the face once and scatters the vector to
    every shard (:func:`scatter`); the shards' answers are merged by :func:`shard_search`."""
    r = ctx.redis
    job = load_job(r, request_id)
    if job is None or r.exists(keys.job_published_key(request_id)):
        return StageResult("engine", Outcome.GONE, job)
    answered = r.hexists(keys.job_results_key(request_id), engine)  # a redelivery does not recompute
    if not answered and (timed_out := gave_up(ctx, job, engine)):
        send = tuple(record_engine_result(ctx, job, engine, timed_out))
        return StageResult("engine", Outcome.GAVE_UP, job, send=send, engine_result=timed_out)
    if ctx.settings.shards_of(engine) > 1:
        return scatter(ctx, job, engine)
    result: EngineResult | None = None
    templates: int | None = None
    if not answered:
        result, templates = run_engine(ctx, job, engine)
    done = tuple(record_engine_result(ctx, job, engine, result))
    return StageResult("engine", Outcome.DONE, job, send=done, engine_result=result, gallery_templates=templates)


def scatter(ctx: StageContext, job: Job, engine: str) -> StageResult:
    """Embed the probe once with a sharded engine, keep the vector in Redis for the shards (with the
    job's lifetime) and ask every shard that has not answered yet to search it."""
    r, s = ctx.redis, ctx.settings
    shards = s.shards_of(engine)
    if r.hexists(keys.job_results_key(job.request_id), engine):  # merged already (or failed): a redelivery
        return StageResult("engine", Outcome.DONE, job, send=tuple(record_engine_result(ctx, job, engine, None)))
    vkey = keys.job_vector_key(job.request_id, engine)
    if not r.exists(vkey):
        version = "unknown"
        try:
            eng = ctx.engine(engine)
            version = eng.version
            t0 = time.perf_counter()
            vec = np.asarray(embed_probe(ctx, job, engine), dtype="<f4")
            embed_ms = round((time.perf_counter() - t0) * 1000, 2)
        except Exception as err:
            result = engine_error(job, engine, version, err, shards=shards)
            return StageResult(
                "engine",
                Outcome.DONE,
                job,
                send=tuple(record_engine_result(ctx, job, engine, result)),
                engine_result=result,
            )
        pipe = r.pipeline(transaction=True)
        pipe.hset(vkey, mapping={"vec": vec.tobytes(), "version": version, "embed_ms": embed_ms})
        pipe.expire(vkey, s.result_ttl_s)
        pipe.execute()
    answered = {int(k) for k in r.hkeys(keys.job_shards_key(job.request_id, engine))}
    send = tuple(shard_search_message(job.request_id, engine, i, shards) for i in range(shards) if i not in answered)
    return StageResult("engine", Outcome.SCATTERED, job, send=send, detail={"engine": engine, "shards": shards})
