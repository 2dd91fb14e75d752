"""Answering a request: audited first, published once (``broker.results``), never twice.

Every stage that ends a search (intake for a bad probe, fusion for a candidate list or an error) answers
through :func:`answer`; fusion, which may find the audit database away or another process answering,
through :func:`answer_or_retry`.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from ...broker import keys
from ...broker.results import publish
from ...broker.sentinel import replicated
from ...core.errors import Code, QuorumError, ServiceError
from ...schemas import CandidateList, EngineResult, ErrorResult
from ...schemas.job import Job
from .context import Outcome, StageContext, StageResult, fuse_message

log = structlog.get_logger()


class AnswerHeld(Exception):
    """Another process is auditing and publishing this request's answer right now."""


def answer(
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
        hold = s.result_hold_s if _archived(ctx, result) else s.result_ttl_s
        published = result if publish(r, result, ttl_s=hold, stream_age_s=s.result_hold_s) else None
        _let_go(r, job, hold)
        # Before the task is acknowledged: on a replica too (a failover then cannot lose the answer, and a
        # redelivered task finds it published: broker.sentinel).
        replicated(r, s.redis_wait_replicas, s.redis_wait_timeout_ms, "result")
        return published
    finally:
        r.delete(lock)


def _archived(ctx: StageContext, result: CandidateList | ErrorResult) -> bool:
    """Keep the answer in the object store; if the store is away, Redis keeps it for the whole
    ``result_ttl_s`` instead (logged), so no lookup ever misses it."""
    if ctx.archive is None:
        return False
    try:
        ctx.archive(result)
        return True
    except Exception as exc:  # the store's errors: the answer still goes out, kept by Redis
        log.warning("result.archive_failed", request_id=result.request_id, error=f"{type(exc).__name__}: {exc}")
        return False


def _let_go(r, job: Job, hold_s: int) -> None:
    """What the search kept in Redis (the job, the engines' lists, the probe's templates, the shards'
    answers) is needed no more once the answer is out: it expires with the answer's hold."""
    pipe = r.pipeline(transaction=False)
    pipe.set(keys.job_published_key(job.request_id), 1, ex=hold_s)
    for key in (
        keys.job_key(job.request_id),
        keys.job_results_key(job.request_id),
        keys.job_overruns_key(job.request_id),
    ):
        pipe.expire(key, hold_s)
    for e in job.engines:
        pipe.expire(keys.job_vector_key(job.request_id, e), hold_s)
        pipe.expire(keys.job_shards_key(job.request_id, e), hold_s)
    pipe.execute()


def error_result(job: Job, err: QuorumError, stage: str) -> ErrorResult:
    """The error answer of a request, with the error's stable code and retryable flag."""
    return ErrorResult(
        request_id=job.request_id,
        agency_id=job.agency_id,
        stream_entry_id=job.stream_entry_id,
        code=err.code.value,
        message=err.message,
        retryable=err.retryable,
        stage=stage,
    )


AUDIT_RETRY_S = 5.0


def answer_or_retry(
    ctx: StageContext,
    job: Job,
    answer: Callable[[], CandidateList | ErrorResult | None],
    status: Outcome,
    results: dict[str, EngineResult] | None = None,
    code: str | None = None,
) -> StageResult:
    """Run a fusion answer (``status``, and ``code`` for an error answer); if the audit database is away,
    or another process holds the request's answer, ask for fusion again in ``AUDIT_RETRY_S`` (a Redis
    timer) instead of publishing."""
    again = (fuse_message(job.request_id, final=True, countdown=AUDIT_RETRY_S, task_id=f"{job.request_id}.again"),)
    try:
        published = answer()
    except AnswerHeld:
        return StageResult("fusion", Outcome.HELD, job, send=again, code=code)
    except ServiceError as err:
        if err.code != Code.AUDIT_UNAVAILABLE:
            raise
        return StageResult("fusion", Outcome.AUDIT_PENDING, job, send=again, detail={"error": err.message}, code=code)
    return StageResult("fusion", status, job, published=published, engine_results=results or {}, code=code)
