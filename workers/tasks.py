"""Celery tasks: few-line adapters over the stage functions in ``workers.stages``.

Each task runs its stage with this process's context (``workers.runtime``) and hands the result to
:func:`finish`, which tells the observers (``broker.lifecycle``: metrics, logs) and sends the messages
the stage asked for, by task name. Tasks take named arguments only (``request_id=``, ``engine=``...); the
names are in ``broker.app``. The probe's tasks keep no result (``ignore_result``: nobody reads their
return, and each would leave a ``celery-task-meta-*`` key in Redis for a day); enrolment's and snapshots'
results are read by the operator's command that sent them. The probe's path and the idempotence that
makes redelivery safe are described in ``workers.stages``.
"""

from __future__ import annotations

import time

from celery import Task

from ..broker import deadlines, lifecycle
from ..broker.app import (
    TASK_ENROL,
    TASK_ENROL_DETECT,
    TASK_FUSE,
    TASK_PREPARE,
    TASK_SEARCH,
    TASK_SHARD_SEARCH,
    TASK_SNAPSHOT,
    app,
)
from ..core.errors import QuorumError
from . import stages
from .runtime import runtime


def send(m: stages.Send) -> None:
    """Send a stage's message: now through Celery, or later through a Redis timer (``broker.deadlines``:
    a countdown task would sit unacknowledged in one worker's memory and die with it)."""
    if m.countdown:
        timer = deadlines.Timer(m.task, m.kwargs, m.queue, m.task_id or f"{m.kwargs.get('request_id')}.{m.task}")
        deadlines.schedule(runtime.redis, timer, time.time() + m.countdown)
    else:
        app.send_task(m.task, kwargs=m.kwargs, queue=m.queue, task_id=m.task_id)


def finish(result: stages.StageResult) -> stages.StageResult:
    """A stage's result to the observers, then its messages sent."""
    lifecycle.stage_finished(result)
    for m in result.send:
        send(m)
    return result


@app.task(name=TASK_PREPARE, bind=True, max_retries=5, ignore_result=True)
def prepare(self: Task, *, request_id: str) -> str:
    last = self.request.retries >= self.max_retries
    try:
        result = stages.prepare(runtime.context(), request_id=request_id, last_attempt=last)
    except QuorumError as err:  # retryable (a dependency away): try again later; the last attempt answers
        if not err.retryable:
            raise
        raise self.retry(countdown=2**self.request.retries) from err
    return finish(result).status


@app.task(name=TASK_SEARCH, ignore_result=True)
def search(*, request_id: str, engine: str) -> str:
    with runtime.embedding_slot(engine):  # this task's face joins a shared model call (workers.batching)
        result = stages.search(runtime.context(), request_id=request_id, engine=engine)
    return finish(result).status


@app.task(name=TASK_SHARD_SEARCH, ignore_result=True)
def shard_search(*, request_id: str, engine: str, shard: int, shards: int) -> str:
    ctx = runtime.context()
    return finish(stages.shard_search(ctx, request_id=request_id, engine=engine, shard=shard, shards=shards)).status


@app.task(name=TASK_FUSE, ignore_result=True)
def fuse(*, request_id: str, final: bool = False, watchdog: bool = False) -> str:
    return finish(stages.fuse(runtime.context(), request_id=request_id, final=final, watchdog=watchdog)).status


@app.task(name=TASK_ENROL_DETECT)
def enrol_detect(*, items: list[dict], engines: list[str], task_ids: dict[str, str]) -> dict:
    """Detect each gallery image's face once and send it to every engine's enrolment."""
    return finish(stages.enrol_detect(runtime.context(), items=items, engines=engines, task_ids=task_ids)).detail


@app.task(name=TASK_ENROL)
def enrol(*, engine: str, items: list[dict], failed: list[dict] | None = None) -> dict:
    """Enrol gallery images into one engine; returns counts and per-image error codes."""
    return finish(stages.enrol(runtime.context(), engine=engine, items=items, failed=failed or ())).detail


@app.task(name=TASK_SNAPSHOT)
def snapshot(*, engines: list[str] | None = None, shard: int | None = None) -> dict:
    """Snapshots written here, and the task ids of those sent to the shards' queues (``sent``)."""
    return finish(stages.snapshot(runtime.context(), engines=engines, shard=shard)).detail
