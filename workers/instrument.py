"""Cross-cutting instrumentation for Celery tasks, attached once through Celery's signals.

Task bodies hold no logging context or metric code of their own: before a task runs its request id
and engine are bound to structlog's context; after it, the outcome is counted.
"""

from __future__ import annotations

import structlog
from celery import signals

from broker.app import TASK_FUSE, TASK_PREPARE, TASK_SEARCH
from core import metrics

log = structlog.get_logger()
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True

    @signals.task_prerun.connect(weak=False)
    def _bind(task_id=None, task=None, args=None, **_):
        structlog.contextvars.clear_contextvars()
        ctx = {"task": task.name if task else None, "task_id": task_id}
        if args and task and task.name in {TASK_PREPARE, TASK_SEARCH, TASK_FUSE}:
            ctx["request_id"] = args[0]
        if args and task and task.name == TASK_SEARCH and len(args) > 1:
            ctx["engine"] = args[1]
        structlog.contextvars.bind_contextvars(**ctx)

    @signals.task_postrun.connect(weak=False)
    def _count(task=None, state=None, **_):
        metrics.TASKS.labels(task.name if task else "unknown", (state or "unknown").lower()).inc()
        structlog.contextvars.clear_contextvars()

    @signals.task_failure.connect(weak=False)
    def _failed(task_id=None, exception=None, sender=None, **_):
        log.error("task.failed", task=getattr(sender, "name", None), task_id=task_id, error=repr(exception))
