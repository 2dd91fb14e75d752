"""Cross-cutting work, in one place: log context and metrics.

Nothing here decides anything: it observes. Two kinds of observer:

- Celery signals (:func:`install`, once per worker process): before a task runs, its request id and
  engine are bound to structlog's context and the time its message waited on the queue is observed
  (``quorum_task_queue_wait_seconds``, from the ``quorum_sent_at`` header every message carries);
  after it, the task's outcome is counted
  (``quorum_tasks_total``); a task that raised is logged.
- :func:`observe`, called by every task adapter (``workers.tasks``) with the
  :class:`~workers.stages.StageResult` its stage returned: an answer the stage published is counted
  (searches completed, refusals by code, search duration) and logged; an answer held back because the
  audit database is away is counted; an engine's result is timed or counted as a failure; the gallery
  size is sampled.

Stage functions (``workers.stages``) therefore hold no metric or log-context code of their own. The
audit record of an answer is not an observation: it is written before the answer is published, as
part of the stage (``workers.stages._answer`` through the context's ``record_result``), so that no
answer ever reaches an agency unaudited.
"""

from __future__ import annotations

import time

import structlog
from celery import signals

from ..broker.app import SENT_AT_HEADER, TASK_FUSE, TASK_PREPARE, TASK_SEARCH, TASK_SHARD_SEARCH
from ..core import metrics
from ..core.config import Settings
from ..schemas import CandidateList
from .stages import StageResult

log = structlog.get_logger()
_installed = False


def observe(settings: Settings, result: StageResult) -> None:
    """Record what a stage produced: the audit of its answer, metrics and a log line."""
    job, answer = result.job, result.published
    if answer is not None and job is not None:
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
    if result.status == "audit_pending":
        metrics.ANSWERS_HELD.inc()
        log.warning("answer.held_for_audit", request_id=job.request_id if job else None, **result.detail)
    er = result.engine_result
    if er is not None:
        if er.status == "ok":
            metrics.ENGINE_DURATION.labels(er.engine, "embed").observe((er.embed_ms or 0) / 1000)
            metrics.ENGINE_DURATION.labels(er.engine, "search").observe((er.search_ms or 0) / 1000)
        else:
            metrics.ENGINE_FAILURES.labels(er.engine, er.error_code or "unknown").inc()
    if er is not None and result.gallery_templates is not None:
        metrics.GALLERY_TEMPLATES.labels(er.engine).set(result.gallery_templates)
    if result.status == "extended":
        log.info("fusion.deadline_extended", request_id=job.request_id if job else None, **result.detail)
    if result.status == "intake_pending" and result.detail.get("redriven"):
        log.warning("intake.redriven", request_id=job.request_id if job else None)


def install() -> None:
    """Attach the Celery signal observers (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True

    @signals.task_prerun.connect(weak=False)
    def _bind(task_id=None, task=None, args=None, kwargs=None, **_):
        structlog.contextvars.clear_contextvars()
        ctx = {"task": task.name if task else None, "task_id": task_id}
        kw = kwargs or {}
        if task and task.name in {TASK_PREPARE, TASK_SEARCH, TASK_SHARD_SEARCH, TASK_FUSE} and "request_id" in kw:
            ctx["request_id"] = kw["request_id"]
        if "engine" in kw:
            ctx["engine"] = kw["engine"]
        if "shard" in kw:
            ctx["shard"] = kw["shard"]
        structlog.contextvars.bind_contextvars(**ctx)
        if task is not None:  # how long its message waited on the queue (the sender stamped it)
            req = task.request
            sent = getattr(req, SENT_AT_HEADER, None) or (getattr(req, "headers", None) or {}).get(SENT_AT_HEADER)
            if sent is not None:
                metrics.TASK_QUEUE_WAIT.labels(task.name).observe(max(0.0, time.time() - float(sent)))

    @signals.task_postrun.connect(weak=False)
    def _count(task=None, state=None, **_):
        metrics.TASKS.labels(task.name if task else "unknown", (state or "unknown").lower()).inc()
        structlog.contextvars.clear_contextvars()

    @signals.task_failure.connect(weak=False)
    def _failed(task_id=None, exception=None, sender=None, **_):
        log.error("task.failed", task=getattr(sender, "name", None), task_id=task_id, error=repr(exception))
