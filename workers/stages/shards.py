"""Shard search: one shard of a sharded engine's gallery searched with the vector the engine's embed step
left in Redis (``workers.stages.search.scatter``), once per shard; the last shard in merges every shard's
answer into the engine's result (the same list one index over those shards would give).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from ...broker import keys
from ...broker.jobs import load_job
from ...core.errors import Code, ServiceError
from ...schemas import EngineResult
from ...schemas.job import Job
from ..index import Hit
from ..shards import merge
from .context import Outcome, StageContext, StageResult
from .search import coded, engine_error, engine_list_length, gave_up, ranked, record_engine_result


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
        code, message = coded(err, "shard.unexpected", engine=engine, shard=shard, request_id=job.request_id)
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
        return engine_error(job, engine, version, err, shards=shards, shards_answered=[])
    if sum(a["templates"] for a in ok.values()) == 0:
        err = ServiceError(Code.GALLERY_EMPTY, f"the {engine} gallery is empty")
        return engine_error(job, engine, version, err, shards=shards, shards_answered=sorted(ok))
    hits = merge(([Hit(sj, float(sc)) for sj, sc in a["hits"]] for a in ok.values()), engine_list_length(job))
    return EngineResult(
        request_id=job.request_id,
        engine=engine,
        engine_version=version,
        status="ok",
        candidates=ranked(hits),
        gallery_size=sum(a["subjects"] for a in ok.values()),
        embed_ms=float(keys.as_str(vector.get("embed_ms", b"0"))),
        search_ms=max(a["search_ms"] for a in ok.values()),
        shards=shards,
        shards_answered=sorted(ok),
    )


def merge_now(ctx: StageContext, job: Job, engine: str, shards: int) -> EngineResult:
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
        return StageResult("shard", Outcome.GONE, job)
    if r.hexists(keys.job_results_key(request_id), engine):  # merged already, perhaps without this shard
        return StageResult("shard", Outcome.LATE, job, detail={"engine": engine, "shard": shard})
    shards_key = keys.job_shards_key(request_id, engine)
    answer: dict[str, Any] | None = None
    if not r.hexists(shards_key, shard):  # a redelivery does not search again
        timed_out = gave_up(ctx, job, engine, shard)
        answer = (
            {"status": "error", "code": timed_out.error_code, "message": timed_out.error_message}
            if timed_out
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
        return StageResult("shard", Outcome.ANSWERED, job, detail=detail)
    result = merge_now(ctx, job, engine, shards)
    send = record_engine_result(ctx, job, engine, result)
    return StageResult("shard", Outcome.MERGED, job, send=tuple(send), engine_result=result, detail=detail)
