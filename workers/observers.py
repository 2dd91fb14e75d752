"""A worker process's observers, in the order they run (``broker.lifecycle`` calls them).

Nothing here decides anything: it observes. :func:`install` registers, once per worker process:

1. :class:`LogContext`: before a task runs, its request id, engine and shard are bound to structlog's
   context (cleared after);
2. :class:`QueueWait`: the time its message waited on the queue (``quorum_task_queue_wait_seconds``,
   from the ``quorum_sent_at`` header every message carries);
3. :class:`TaskCounts`: the task's outcome (``quorum_tasks_total``), and a task that raised is logged;
4. the task time limit (``workers.watchdog.TaskTimeLimit``);
5. :class:`StageMetrics`: what each stage produced (``StageResult``): an answer the stage published is
   counted (searches completed, refusals by code, search duration) and logged; an answer held back
   because the audit database is away is counted; an engine's result is timed or counted as a
   failure; the gallery size is sampled;
6. :class:`Readiness`: ``/ready`` once the worker consumes its queue.

Stage functions (``workers.stages``) therefore hold no metric or log-context code of their own. The
audit record of an answer is not an observation: it is written before the answer is published, as
part of the stage (``workers.stages.answer``), so that no answer ever reaches an agency unaudited.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

from ..broker import lifecycle
from ..broker.app import TASK_FUSE, TASK_PREPARE, TASK_SEARCH, TASK_SHARD_SEARCH
from ..broker.lifecycle import SENT_AT_HEADER, Observer
from ..core import metrics
from ..core.config import Settings
from ..schemas import CandidateList
from .stages import Outcome, StageResult
from .watchdog import TaskTimeLimit

log = structlog.get_logger()
PROBE_TASKS = frozenset({TASK_PREPARE, TASK_SEARCH, TASK_SHARD_SEARCH, TASK_FUSE})


class LogContext(Observer):
    """A task's log lines carry its request id, engine and shard."""

    def task_started(self, task: Any, task_id: str, kwargs: Mapping[str, Any]) -> None:
        structlog.contextvars.clear_contextvars()
        ctx: dict[str, Any] = {"task": task.name if task else None, "task_id": task_id}
        if task and task.name in PROBE_TASKS and "request_id" in kwargs:
            ctx["request_id"] = kwargs["request_id"]
        for name in ("engine", "shard"):
            if name in kwargs:
                ctx[name] = kwargs[name]
        structlog.contextvars.bind_contextvars(**ctx)

    def task_finished(self, task: Any, task_id: str, state: str) -> None:
        structlog.contextvars.clear_contextvars()


class QueueWait(Observer):
    """How long a task's message waited on its queue (the sender stamped it)."""

    def task_started(self, task: Any, task_id: str, kwargs: Mapping[str, Any]) -> None:
        if task is None:
            return
        req = task.request
        sent = getattr(req, SENT_AT_HEADER, None) or (getattr(req, "headers", None) or {}).get(SENT_AT_HEADER)
        if sent is not None:
            metrics.TASK_QUEUE_WAIT.labels(task.name).observe(max(0.0, time.time() - float(sent)))


class TaskCounts(Observer):
    """Every task's outcome counted; a task that raised, logged."""

    def task_finished(self, task: Any, task_id: str, state: str) -> None:
        metrics.TASKS.labels(task.name if task else "unknown", state.lower()).inc()

    def task_failed(self, task: Any, task_id: str, exception: BaseException | None) -> None:
        log.error("task.failed", task=getattr(task, "name", None), task_id=task_id, error=repr(exception))


class StageMetrics(Observer):
    """What a stage produced: answers published, engine results, the gallery's size."""

    def stage_finished(self, result: StageResult) -> None:
        self._answer(result)
        er = result.engine_result
        if er is not None:
            if er.status == "ok":
                metrics.ENGINE_DURATION.labels(er.engine, "embed").observe((er.embed_ms or 0) / 1000)
                metrics.ENGINE_DURATION.labels(er.engine, "search").observe((er.search_ms or 0) / 1000)
            else:
                metrics.ENGINE_FAILURES.labels(er.engine, er.error_code or "unknown").inc()
            if result.gallery_templates is not None:
                metrics.GALLERY_TEMPLATES.labels(er.engine).set(result.gallery_templates)
        request_id = result.job.request_id if result.job else None
        if result.status == Outcome.AUDIT_PENDING:
            metrics.ANSWERS_HELD.inc()
            log.warning("answer.held_for_audit", request_id=request_id, **result.detail)
        elif result.status == Outcome.EXTENDED:
            log.info("fusion.deadline_extended", request_id=request_id, **result.detail)
        elif result.status == Outcome.INTAKE_PENDING and result.detail.get("redriven"):
            log.warning("intake.redriven", request_id=request_id)

    @staticmethod
    def _answer(result: StageResult) -> None:
        """An answer this stage published: counted once (a stage publishes a request's answer at most once)."""
        job, answer = result.job, result.published
        if answer is None or job is None:
            return
        if isinstance(answer, CandidateList):
            outcome = "degraded" if answer.degraded else "ok"
            metrics.SEARCHES_COMPLETED.labels(job.agency_id, outcome).inc()
            metrics.SEARCH_DURATION.labels(job.agency_id, outcome).observe(answer.duration_ms / 1000)
            log.info(
                "search.published",
                request_id=job.request_id,
                outcome=outcome,
                candidates=len(answer.candidates),
                duration_ms=answer.duration_ms,
            )
        else:
            metrics.PROBES_REJECTED.labels(job.agency_id, answer.code).inc()
            metrics.SEARCHES_COMPLETED.labels(job.agency_id, "error").inc()
            log.info("probe.error", request_id=job.request_id, code=answer.code, stage=answer.stage)


class Readiness(Observer):
    """``GET /ready`` (the container health check) answers once Celery consumes the queue: a worker
    still loading its model and gallery, or not reaching the broker, is not ready."""

    def worker_ready(self) -> None:
        metrics.set_ready()


_installed = False


def install(settings: Settings, redis: Any) -> None:
    """Register a worker process's observers, in order (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    lifecycle.register(
        LogContext(),
        QueueWait(),
        TaskCounts(),
        TaskTimeLimit(redis, settings.task_time_limit, ttl_s=settings.result_ttl_s),
        StageMetrics(),
        Readiness(),
    )
