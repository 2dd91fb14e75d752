"""Intake: decode the probe, find its faces, choose the one to search, and fan the job out to its engines.

The gateway admits a probe and sends ``prepare``; :func:`prepare` asks for one ``search`` per engine
plus a backstop ``fuse`` at ``search_timeout_s`` that answers even if no engine ever does.
"""

from __future__ import annotations

import time

import structlog

from ...broker.jobs import load_job, save_job
from ...core.errors import Code, QuorumError
from ...schemas.job import SearchedFace
from ..detect import choose_face
from .answer import AnswerHeld, answer, error_result
from .context import Outcome, StageContext, StageResult, fuse_message, search_message

log = structlog.get_logger()


def prepare(ctx: StageContext, *, request_id: str, last_attempt: bool = True) -> StageResult:
    """Find the face to search and fan the job out to its engines.

    A bad probe (not decodable, no face, ambiguous face choice...) is answered with its error code.
    A failure that may pass (a ``retryable`` error: the store or the detector away) is raised for the
    caller to retry, unless this is the last attempt, when it too is answered as an error.
    """
    s = ctx.settings
    job = load_job(ctx.redis, request_id)
    if job is None:
        log.warning("intake.job_missing", request_id=request_id)
        return StageResult("intake", Outcome.MISSING)
    failure: QuorumError | None = None
    t0 = time.perf_counter()
    try:
        image = ctx.load_image(job.image_key)
        faces = ctx.detect(image)
        idx, face = choose_face(faces, job.face_index, min_face_pixels=s.min_face_pixels)
    except QuorumError as err:
        if err.retryable and not last_attempt:
            raise
        failure = err
    except Exception as exc:  # never crash on input: anything unexpected is an error result
        log.exception("intake.unexpected", request_id=request_id)
        failure = QuorumError(Code.INTERNAL, f"{type(exc).__name__}")
    if failure is not None:
        # An audit database that is away raises here (AUDIT_UNAVAILABLE): the task retries, and the
        # intake watchdog sends prepare again after that; nothing is answered unaudited.
        try:
            published = answer(ctx, job, error_result(job, failure, "intake"))
        except AnswerHeld:
            published = None
        return StageResult("intake", Outcome.FAILED, job, published=published, code=failure.code.value)
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
    return StageResult("intake", Outcome.DISPATCHED, job, send=tuple(send))
