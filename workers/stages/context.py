"""What a stage is given and what it gives back: its context, its outcome, and the messages it asks for.

Each stage takes an explicit :class:`StageContext` (Redis, settings and the process's lazily loaded
parts) and named arguments, and returns a :class:`StageResult`: an :class:`Outcome`, the messages to
send next (:class:`Send`, by task name; built here, so every sender names a task, its queue and its id
the same way), and what it produced (an answer it published, an engine's result). A stage sends
nothing through Celery and records no metric or log line of its own: the Celery tasks
(``workers.tasks``) run it, hand its result to the observers (``workers.observers``) and send its messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from ...broker import deadlines
from ...broker.app import (
    FUSION_QUEUE,
    INTAKE_QUEUE,
    TASK_FUSE,
    TASK_PREPARE,
    TASK_SEARCH,
    TASK_SHARD_SEARCH,
    engine_queue,
    shard_queue,
)
from ...core.config import Settings
from ...schemas import CandidateList, EngineResult, ErrorResult
from ...schemas.job import Job
from ..faces import Face


class Outcome(StrEnum):
    """What a stage did: the one vocabulary observers, tests and logs read (never free text)."""

    MISSING = "missing"  # intake: the job is not in Redis (expired, or never saved)
    DISPATCHED = "dispatched"  # intake: the face found, one search sent to each engine
    FAILED = "failed"  # the request was answered with an error (StageResult.code), or would be if not held
    GONE = "gone"  # answered already, or the job expired: nothing to do
    GAVE_UP = "gave_up"  # engine/shard: ran past the time limit too often for this probe, ENGINE_TIMEOUT
    DONE = "done"  # engine: its result recorded (now, or by an earlier delivery); enrolment, gallery: done
    SCATTERED = "scattered"  # sharded engine: embedded once, a search sent to each shard
    ANSWERED = "answered"  # shard: its answer recorded, other shards still to come
    MERGED = "merged"  # shard: the last one in, the engine's result merged from every shard
    LATE = "late"  # shard: the engine's result was merged already (perhaps without this shard)
    INTAKE_PENDING = "intake_pending"  # intake watchdog: intake has not run yet, checks again later
    INTAKE_DONE = "intake_done"  # intake watchdog: intake ran, every engine answered; fuses (a lost fuse re-sent)
    WATCHING = "watching"  # watchdog after intake: engines still missing; lost searches re-sent, back later
    WAITING = "waiting"  # fusion: not every engine has answered
    EXTENDED = "extended"  # fusion: a missing engine is alive and busy, another deadline given
    HELD = "held"  # fusion: another process is answering this request now; asks again later
    AUDIT_PENDING = "audit_pending"  # fusion: the audit database is away; the answer waits for it
    PUBLISHED = "published"  # fusion: the candidate list audited and published
    DETECTED = "detected"  # enrolment: the faces of a batch found, sent to every engine


@dataclass(frozen=True)
class StageContext:
    """What a stage may use. ``workers.runtime.Runtime.context()`` builds the production one, whose
    callables load the detector, engines and gallery replicas once per process on first use."""

    redis: Any
    settings: Settings
    load_image: Callable[[str], np.ndarray]  # object-store key -> decoded BGR image, under size limits
    detect: Callable[[np.ndarray], list[Face]]
    engine: Callable[[str], Any]  # name -> workers.engines.Engine
    # (name) -> the engine's workers.replica.GalleryReplica; (name, shard) -> one shard's (synced on use)
    replica: Callable[..., Any]
    # Writes a request's answer to the audit trail before it is published (once per request; raises
    # ServiceError(AUDIT_UNAVAILABLE) if it cannot): accountability.audit.record_result in production.
    record_result: Callable[[Job, Any, dict | None], bool]
    calibration: Callable[[], Any] = lambda: None  # fusion calibration (None: uncalibrated methods only)
    # Keeps a published result in the object store (broker.results.archive) so that Redis can let it go
    # after result_hold_s; None: no store, Redis keeps it for result_ttl_s.
    archive: Callable[[Any], None] | None = None
    # (engine name, [(image, face), ...]) -> (n, dim) templates. In an engine worker the call is shared
    # with the other tasks it runs at once (workers.batching); None: the engine's embed_batch directly.
    embed: Callable[[str, Sequence[tuple[np.ndarray, Face]]], np.ndarray] | None = None
    now: Callable[[], float] = time.time


@dataclass(frozen=True)
class Send:
    """A message a stage asks to be sent: a task by name, its named arguments, where and when."""

    task: str
    kwargs: dict[str, Any]
    queue: str
    task_id: str | None = None
    countdown: float | None = None


@dataclass(frozen=True)
class StageResult:
    stage: str  # intake, engine, shard, fusion, enrolment, gallery
    status: Outcome  # what happened
    job: Job | None = None
    send: tuple[Send, ...] = ()
    published: CandidateList | ErrorResult | None = None  # the request's answer, if this stage published it
    engine_results: dict[str, EngineResult] = field(default_factory=dict)  # fusion: what each engine said
    engine_result: EngineResult | None = None  # search: this engine's result, if computed now
    gallery_templates: int | None = None  # search: the replica's size when it searched
    detail: dict[str, Any] = field(default_factory=dict)
    code: str | None = None  # FAILED: the error code the request was answered with


def fuse_message(request_id: str, *, final: bool, countdown: float | None = None, task_id: str | None = None) -> Send:
    return Send(TASK_FUSE, {"request_id": request_id, "final": final}, FUSION_QUEUE, task_id, countdown)


def watchdog_message(request_id: str, countdown: float) -> Send:
    """The intake watchdog (scheduled at admission, see :func:`fuse`): a fusion call that checks intake ran."""
    t = deadlines.intake_watchdog(request_id)
    return Send(t.task, t.kwargs, t.queue, t.timer_id, countdown)


def search_message(request_id: str, engine: str) -> Send:
    return Send(
        TASK_SEARCH, {"request_id": request_id, "engine": engine}, engine_queue(engine), f"{request_id}.{engine}"
    )


def shard_search_message(request_id: str, engine: str, shard: int, shards: int) -> Send:
    return Send(
        TASK_SHARD_SEARCH,
        {"request_id": request_id, "engine": engine, "shard": shard, "shards": shards},
        shard_queue(engine, shard, shards),
        f"{request_id}.{engine}.{shard}of{shards}",
    )


def prepare_message(request_id: str) -> Send:
    return Send(TASK_PREPARE, {"request_id": request_id}, INTAKE_QUEUE, f"{request_id}.prepare")
