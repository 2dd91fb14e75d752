"""Fusion: merge the engines' ranked lists into the candidate list, once, when every engine has answered
or a deadline has passed.

``workers.stages.search`` asks for a ``fuse`` at ``fusion_deadline_s`` when the first engine
answers and for one at once when the last does. If the deadline passes with engines missing, an engine
whose workers are alive (their heartbeat holds) is busy, not down: fusion waits another deadline for it,
up to ``search_timeout_s`` from receipt; one with no live worker is left out and the list is marked
degraded. The scores are fused by ``workers.fusion`` (pure).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...broker import keys, liveness
from ...broker.app import INTAKE_QUEUE, engine_queue, shard_queue
from ...broker.jobs import load_job
from ...core.errors import Code, ServiceError
from ...schemas import CandidateList, EngineResult, FusedCandidate
from ...schemas.job import Job
from ..fusion import Ranked, effective_method, probe_quality, resolve_method
from ..fusion import fuse as fuse_lists
from .answer import answer, answer_or_retry, error_result
from .context import (
    Outcome,
    Send,
    StageContext,
    StageResult,
    fuse_message,
    prepare_message,
    search_message,
    shard_search_message,
    watchdog_message,
)
from .search import record_engine_result
from .shards import merge_now

# When every engine failed for one of these reasons, the request is answered with it.
SAID_AS_IT_IS = frozenset({Code.GALLERY_EMPTY.value, Code.STORE_UNAVAILABLE.value})


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

    ``watchdog=True`` is the watchdog the gateway schedules at admission: it re-sends a lost ``prepare``
    (:func:`_watch_intake`), then lost searches and a lost fuse (:func:`_watch_engines`), until answered.
    """
    r, s = ctx.redis, ctx.settings
    job = load_job(r, request_id)
    if job is None or r.exists(keys.result_key(job.agency_id, request_id)):
        return StageResult("fusion", Outcome.GONE, job)
    if job.face is None:
        return _watch_intake(ctx, job) if watchdog else StageResult("fusion", Outcome.GONE, job)
    if watchdog:
        return _watch_engines(ctx, job)
    raw = r.hgetall(keys.job_results_key(request_id))
    results = {keys.as_str(k): EngineResult.model_validate_json(v) for k, v in raw.items()}
    if not final and len(results) < len(job.engines):
        return StageResult("fusion", Outcome.WAITING, job)
    missing = [e for e in job.engines if e not in results]
    if missing and ctx.now() - job.received_at < s.search_timeout_s:
        # The deadline passed. An engine (or shard) whose workers are alive is busy, not down (a
        # backlog, one slow engine): give it another deadline rather than degrade; the search timeout
        # still bounds the wait. One with no live worker is left out now.
        waiting, redrive = _still_coming(ctx, job, missing)
        if waiting:
            return StageResult(
                "fusion",
                Outcome.EXTENDED,
                job,
                send=(*redrive, fuse_message(request_id, final=True, countdown=s.fusion_deadline_s)),
                detail={"waiting_for": waiting, "redriven": [m.kwargs.get("engine") for m in redrive]},
            )
    results.update(_partial_shards(ctx, job, missing))
    return _answer_fused(ctx, job, results)


def _watch_intake(ctx: StageContext, job: Job) -> StageResult:
    """The intake watchdog, for a probe that has no face yet (intake has not run): it sends ``prepare``
    again if the intake queue is empty and checks again a deadline later; past the search timeout it
    answers ``SEARCH_TIMEOUT``. Once intake has run, :func:`_watch_engines` takes over."""
    s = ctx.settings
    if ctx.now() - job.received_at >= s.search_timeout_s:
        err = ServiceError(Code.SEARCH_TIMEOUT, f"the probe was not through intake after {s.search_timeout_s:.0f}s")
        return answer_or_retry(
            ctx, job, lambda: answer(ctx, job, error_result(job, err, "intake")), Outcome.FAILED, code=err.code.value
        )
    send = [watchdog_message(job.request_id, s.fusion_deadline_s)]
    redriven = ctx.redis.llen(INTAKE_QUEUE) == 0
    if redriven:
        send.insert(0, prepare_message(job.request_id))
    return StageResult("fusion", Outcome.INTAKE_PENDING, job, send=tuple(send), detail={"redriven": redriven})


def _watch_engines(ctx: StageContext, job: Job) -> StageResult:
    """The watchdog once intake has run: until the request is answered it comes back every deadline, so
    that a message lost on the way (a Redis failover drops what the old primary had not replicated: an
    engine's search, the last engine's fuse) is sent again. An alive engine (or shard) that has not
    answered and whose queue is empty gets its search again (a repeat is harmless: results are recorded
    once); with every engine in, the fuse is sent. Past the search timeout the backstop answers."""
    r, s = ctx.redis, ctx.settings
    answered = {keys.as_str(k) for k in r.hkeys(keys.job_results_key(job.request_id))}
    missing = [e for e in job.engines if e not in answered]
    if not missing:
        return StageResult("fusion", Outcome.INTAKE_DONE, job, send=(fuse_message(job.request_id, final=False),))
    if ctx.now() - job.received_at >= s.search_timeout_s:
        return StageResult("fusion", Outcome.WATCHING, job)  # the backstop fuse answers now
    _, redrive = _still_coming(ctx, job, missing)
    again = watchdog_message(job.request_id, s.fusion_deadline_s)
    detail = {"missing": missing, "redriven": [m.kwargs.get("engine") for m in redrive]}
    return StageResult("fusion", Outcome.WATCHING, job, send=(*redrive, again), detail=detail)


def _partial_shards(ctx: StageContext, job: Job, missing: Sequence[str]) -> dict[str, EngineResult]:
    """A sharded engine some of whose shards answered contributes what they found, marked partial."""
    r, s = ctx.redis, ctx.settings
    found: dict[str, EngineResult] = {}
    for e in missing:
        shards = s.shards_of(e)
        if shards > 1 and r.hlen(keys.job_shards_key(job.request_id, e)):
            record_engine_result(ctx, job, e, merge_now(ctx, job, e, shards))
            raw_e = r.hget(keys.job_results_key(job.request_id), e)
            if raw_e is not None:
                found[e] = EngineResult.model_validate_json(raw_e)
    return found


def _answer_fused(ctx: StageContext, job: Job, results: dict[str, EngineResult]) -> StageResult:
    """The request's answer from the engines' results: the fused candidate list, or an error when no
    engine gave a list (engines that never answered count as ``ENGINE_TIMEOUT``). The error is
    ``NO_ENGINE_RESULT``, unless every engine failed for one reason the agency can act on: an empty
    gallery (``GALLERY_EMPTY``) or the probe's image out of reach (``STORE_UNAVAILABLE``)."""
    ok = {e: res for e, res in results.items() if res.status == "ok"}
    failed = {e: res.error_code or Code.ENGINE_FAILED.value for e, res in results.items() if res.status != "ok"}
    for e in job.engines:
        if e not in results:
            failed[e] = Code.ENGINE_TIMEOUT.value
    if not ok:
        codes = set(failed.values())
        code = Code(codes.pop()) if len(codes) == 1 and codes <= SAID_AS_IT_IS else Code.NO_ENGINE_RESULT
        err = ServiceError(code, f"no engine answered: {failed}")
        reply = error_result(job, err, "fusion")
        return answer_or_retry(ctx, job, lambda: answer(ctx, job, reply), Outcome.FAILED, results, code.value)
    result = assemble(ctx, job, ok, failed)
    engines = {
        e: {"status": res.status, "embed_ms": res.embed_ms, "search_ms": res.search_ms} for e, res in results.items()
    }
    return answer_or_retry(ctx, job, lambda: answer(ctx, job, result, engines), Outcome.PUBLISHED, results)


def assemble(ctx: StageContext, job: Job, ok: dict[str, EngineResult], failed: dict[str, str]) -> CandidateList:
    """The candidate list from the engines that answered (pure, apart from the clock)."""
    assert job.face is not None
    lists = {e: [Ranked(c.subject_id, c.rank, c.score) for c in res.candidates] for e, res in ok.items()}
    versions = {e: res.engine_version for e, res in ok.items()}
    cal = ctx.calibration()
    method = effective_method(
        resolve_method(ctx.settings.fusion_method, cal), [e for e, lst in lists.items() if lst], cal, versions
    )
    quality = probe_quality(job.face.box, job.face.detector_score)
    fused = fuse_lists(lists, job.candidates, method=method, calibration=cal, versions=versions, quality=quality)
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
