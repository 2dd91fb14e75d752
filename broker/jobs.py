"""Where a job lives while its search is in flight: one Redis string per request id."""

from __future__ import annotations

from ..schemas.job import Job
from . import keys


def save_job(redis, job: Job, *, ttl_s: int) -> None:
    redis.set(keys.job_key(job.request_id), job.model_dump_json(), ex=ttl_s)


def load_job(redis, request_id: str) -> Job | None:
    raw = redis.get(keys.job_key(request_id))
    return Job.model_validate_json(raw) if raw else None
