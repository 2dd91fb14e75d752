"""Cross-cutting work, attached in one place: an ordered list of observers of a message's life.

An :class:`Observer` sees a message from the moment it is published to the end of the task that runs
it, and the outcome of the stage that task ran. Every hook is optional (the base does nothing), and an
observer decides nothing: it stamps, measures, logs or bounds. :func:`register` appends observers to
the one list, in order; the Celery signals are connected once (:func:`_connect`) and call each
observer in that order, so what runs around a task is read from one list, never from code inside it:

- ``broker.app`` registers :class:`SentAt` in every process (every sender stamps its messages);
- ``workers.observers.install`` registers a worker process's own (log context, queue wait, task
  counts, the task time limit, stage metrics, readiness, heartbeat);
- ``workers.tasks`` hands each stage's result to :func:`stage_finished`.

A failing observer is logged and skipped: observation never changes what a task does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

log = structlog.get_logger()

# Every message carries the time it was sent (header ``quorum_sent_at``, seconds since the epoch), so the
# age of the oldest message waiting in a queue can be read from the queue itself (workers.gateway samples
# it as quorum_queue_oldest_message_age_seconds): a queue nobody drains shows it before its length does.
SENT_AT_HEADER = "quorum_sent_at"


class Observer:
    """The hooks of a message's life; override those you need."""

    def before_publish(self, headers: dict) -> None:
        """A message is about to be sent (its headers may be stamped)."""

    def task_started(self, task: Any, task_id: str, kwargs: Mapping[str, Any]) -> None:
        """A task is about to run in this process."""

    def task_finished(self, task: Any, task_id: str, state: str) -> None:
        """A task ended (``state``: Celery's, e.g. SUCCESS, RETRY, FAILURE)."""

    def task_failed(self, task: Any, task_id: str, exception: BaseException | None) -> None:
        """A task raised."""

    def stage_finished(self, result: Any) -> None:
        """A stage returned its result (a ``workers.stages.StageResult``)."""

    def worker_ready(self) -> None:
        """The worker consumes its queue."""

    def worker_stopping(self) -> None:
        """The worker is shutting down on purpose."""


OBSERVERS: list[Observer] = []
_connected = False


def register(*observers: Observer) -> None:
    """Append observers to the list (in order), connecting the Celery signals on first use."""
    _connect()
    OBSERVERS.extend(observers)


def _each(hook: str, *args: Any) -> None:
    for observer in list(OBSERVERS):
        try:
            getattr(observer, hook)(*args)
        except Exception as exc:  # observation never changes what a task does
            log.error("observer.failed", observer=type(observer).__name__, hook=hook, error=repr(exc))


def stage_finished(result: Any) -> None:
    """Hand a stage's result to every observer."""
    _each("stage_finished", result)


def _connect() -> None:
    global _connected
    if _connected:
        return
    _connected = True
    from celery import signals

    def publish(headers: dict | None = None, **_: Any) -> None:
        if headers is not None:
            _each("before_publish", headers)

    def prerun(task_id: str | None = None, task: Any = None, kwargs: Mapping[str, Any] | None = None, **_: Any) -> None:
        _each("task_started", task, task_id or "", kwargs or {})

    def postrun(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
        _each("task_finished", task, task_id or "", state or "unknown")

    def failure(
        task_id: str | None = None, exception: BaseException | None = None, sender: Any = None, **_: Any
    ) -> None:
        _each("task_failed", sender, task_id or "", exception)

    signals.before_task_publish.connect(publish, weak=False)
    signals.task_prerun.connect(prerun, weak=False)
    signals.task_postrun.connect(postrun, weak=False)
    signals.task_failure.connect(failure, weak=False)
    signals.worker_ready.connect(lambda **_: _each("worker_ready"), weak=False)
    signals.worker_shutdown.connect(lambda **_: _each("worker_stopping"), weak=False)


class SentAt(Observer):
    """Stamps every message with the time it was first sent (a resend keeps the first stamp)."""

    def before_publish(self, headers: dict) -> None:
        headers.setdefault(SENT_AT_HEADER, time.time())
