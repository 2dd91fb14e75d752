"""Bound how long a task runs in a worker process.

Celery's ``time_limit`` does nothing in the solo and threads pools Quorum's workers run (the model and
index live in the worker process, not in forked children). A task that hangs (a stuck native call, a
dependency that never answers) would hold its worker, or one of its threads, forever, and once it has
run past the broker's visibility timeout its message is handed to a second worker as well.

So every worker process runs a watchdog thread (:class:`TaskTimeLimit`, one of the worker's observers,
``workers.observers``). It knows when each bounded task started and ended; when one has run past
``settings.task_time_limit`` (shorter than the visibility timeout), it records the overrun in Redis (per
probe and task part: ``broker.keys.job_overruns_key``; and a total per task for the SRE:
``broker.keys.TASK_OVERRUNS``), logs it, and ends the process (exit code :data:`EXIT_OVERRUN`). The
supervisor (``quorum up``, or compose's restart policy) starts a fresh one, and the task's
unacknowledged message comes back after the visibility timeout (every stage is idempotent). An engine or
shard search that overran ``settings.task_overrun_max`` times for one probe is not run again: the stage
records ENGINE_TIMEOUT for that engine (``workers.stages``), so one probe that makes an engine hang
cannot take its workers down in a loop until the search timeout.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ..broker import keys
from ..broker.app import TASK_ENROL, TASK_ENROL_DETECT, TASK_FUSE, TASK_PREPARE, TASK_SEARCH, TASK_SHARD_SEARCH
from ..broker.lifecycle import Observer
from ..core.logs import drain_relay

log = structlog.get_logger()

EXIT_OVERRUN = 75  # the worker ended itself: a task ran past the time limit
# What the watchdog bounds: the probe's path and enrolment. A gallery snapshot of a large shard may
# legitimately take longer and is left alone.
BOUNDED_TASKS = frozenset({TASK_PREPARE, TASK_SEARCH, TASK_SHARD_SEARCH, TASK_FUSE, TASK_ENROL_DETECT, TASK_ENROL})


@dataclass(frozen=True)
class Running:
    task_id: str
    task: str
    started: float  # monotonic
    request_id: str | None  # the probe, for a probe-path task
    part: str | None  # field of keys.job_overruns_key


def describe(task: str, kwargs: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The probe and the overrun field of a task from its named arguments (None for enrolment)."""
    request_id = kwargs.get("request_id")
    if not isinstance(request_id, str):
        return None, None
    engine = kwargs.get("engine") if task in (TASK_SEARCH, TASK_SHARD_SEARCH) else None
    shard = kwargs.get("shard") if task == TASK_SHARD_SEARCH else None
    return request_id, keys.overrun_part(task, engine, shard)


class TaskWatchdog:
    """Which bounded tasks run in this process, and since when; :meth:`overdue` names those past the limit."""

    def __init__(self, limit_s: float, bounded: Iterable[str] = BOUNDED_TASKS, clock=time.monotonic) -> None:
        self.limit_s = limit_s
        self.bounded = frozenset(bounded)
        self.clock = clock
        self._running: dict[str, Running] = {}
        self._lock = threading.Lock()

    def started(self, task_id: str, task: str, kwargs: Mapping[str, Any]) -> None:
        if task not in self.bounded:
            return
        request_id, part = describe(task, kwargs)
        with self._lock:
            self._running[task_id] = Running(task_id, task, self.clock(), request_id, part)

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._running.pop(task_id, None)

    def running(self) -> list[Running]:
        with self._lock:
            return list(self._running.values())

    def overdue(self) -> list[Running]:
        now = self.clock()
        return [r for r in self.running() if now - r.started > self.limit_s]


def record_overruns(redis: Any, overdue: Iterable[Running], ttl_s: int) -> None:
    """Count each overdue task against its probe (for the stages' give-up rule) and in the totals."""
    pipe = redis.pipeline(transaction=False)
    for r in overdue:
        if r.request_id and r.part:
            key = keys.job_overruns_key(r.request_id)
            pipe.hincrby(key, r.part, 1)
            pipe.expire(key, ttl_s)
        pipe.hincrby(keys.TASK_OVERRUNS, r.task, 1)
    pipe.execute()


def overruns(redis: Any, request_id: str, part: str) -> int:
    """How often ``part`` of the probe's search ran past the task time limit."""
    raw = redis.hget(keys.job_overruns_key(request_id), part)
    return int(raw) if raw is not None else 0


def _exit_process(code: int) -> None:  # pragma: no cover - ends the process
    sys.stdout.flush()
    sys.stderr.flush()
    drain_relay()  # the last records (why the process ends) reach the log before os._exit skips atexit
    os._exit(code)


def watch(
    dog: TaskWatchdog,
    redis: Any,
    *,
    ttl_s: int,
    stop: threading.Event,
    every_s: float = 1.0,
    exit_process: Callable[[int], None] = _exit_process,
) -> None:
    """The watchdog loop: on the first overdue task, record, log and end the process."""
    while not stop.wait(every_s):
        late = dog.overdue()
        if not late:
            continue
        now = dog.clock()
        for r in late:
            log.critical(
                "task.time_limit_exceeded",
                task=r.task,
                task_id=r.task_id,
                request_id=r.request_id,
                running_s=round(now - r.started, 1),
                limit_s=dog.limit_s,
                action="exiting: the supervisor restarts the worker, the message returns after the visibility timeout",
            )
        try:
            record_overruns(redis, late, ttl_s)
        except Exception as exc:  # Redis away: exit all the same (the stuck task must not hold the worker)
            log.error("task.overrun_not_recorded", error=str(exc))
        exit_process(EXIT_OVERRUN)
        return


class TaskTimeLimit(Observer):
    """The watchdog as an observer of this worker's tasks: it learns when each bounded task starts and
    ends, and its thread (:func:`watch`) ends the process on the first that overruns."""

    def __init__(self, redis: Any, limit_s: float, *, ttl_s: int) -> None:
        self.dog = TaskWatchdog(limit_s)
        stop = threading.Event()
        threading.Thread(
            target=watch,
            args=(self.dog, redis),
            kwargs={"ttl_s": ttl_s, "stop": stop},
            name="task-watchdog",
            daemon=True,
        ).start()
        log.info("task.watchdog_started", limit_s=limit_s, tasks=sorted(self.dog.bounded))

    def task_started(self, task: Any, task_id: str, kwargs: Mapping[str, Any]) -> None:
        if task_id and task is not None:
            self.dog.started(task_id, task.name, kwargs)

    def task_finished(self, task: Any, task_id: str, state: str) -> None:
        if task_id:
            self.dog.finished(task_id)
