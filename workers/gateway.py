"""The gateway: reads agencies' probe requests from Redis streams and starts the pipeline.

Agencies need no Python: each writes ``XADD quorum:intake:<agency> * payload <ProbeRequest JSON> ...``
(signed: see ``broker.signing``). The gateway owns the stream I/O only:

1. It discovers every ``quorum:intake:<agency>`` stream and reads them all through one consumer group
   (``broker.redis_errors.ensure_group``; several gateways share the work), new entries with
   ``XREADGROUP``; on start and every ``claim_idle_ms / 2`` it takes back its own pending entries and
   claims others' idle longer than ``claim_idle_ms`` (a gateway that died).
2. Each entry goes through the admission chain (``workers.admission.admit_entry``: signature, policy,
   quota, image storage, the accepted audit record, the saved job; the rules are described there).
3. An admitted entry is dispatched: ``quorum.intake.prepare`` is sent by name (``broker.app.TASK_PREPARE``)
   to the intake queue with ``request_id`` as its argument. A refused one is answered now: its audit
   record is written (``workers.admission.record_refusal``), then an error result with a stable code
   is published on ``quorum:results:<agency>`` (under the request's result key when the refusal is
   the request's answer) and noted on ``quorum:rejected``. Every entry therefore gets an answer: a
   candidate list later, or an error result now.
4. The entry is acknowledged only once it has been answered or handed to Celery. When a dependency
   fails (Redis, the store, the audit database, the broker: a ``ServiceError``) the entry is left
   pending and retried later, by this gateway or another; nothing runs or is refused unaudited. A Redis
   outage does not stop the loop: it logs, waits ``backoff_s`` and carries on.

It also keeps a heartbeat key (``broker.keys.gateway_alive``), samples the Celery queue lengths for the
metrics, counts received and rejected probes, and anchors the audit chain head every
``audit_anchor_interval_s``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from ..accountability import audit
from ..accountability.policy import RegistrySnapshot
from ..broker import deadlines, keys
from ..broker.app import INTAKE_QUEUE, TASK_PREPARE, app, oldest_message_age, queues_of
from ..broker.keys import as_str
from ..broker.redis_errors import ensure_group, redis_boundary
from ..broker.results import publish
from ..core import metrics
from ..core.config import Settings
from ..core.errors import Code, QuorumError, ServiceError
from ..core.objectstore import ObjectStore
from ..schemas import ErrorResult
from ..schemas.job import Job
from .admission import Admission, AdmissionContext, Refusal, Registry, admit_entry, record_refusal

log = structlog.get_logger()
UNACKED_HASH = "unacked"  # kombu's Redis transport: messages delivered to a worker, not yet acknowledged


class LazyRegistry:
    """The registry snapshot cache, opened (and the database migrated) on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: Any = None

    def _open(self) -> Any:
        if self._cache is None:
            from ..accountability import db
            from ..accountability.registry import SnapshotCache

            try:
                self._cache = SnapshotCache(db.get_engine(self.settings))
            except Exception as exc:
                raise ServiceError(Code.AUDIT_UNAVAILABLE, f"registry database unavailable: {exc}") from exc
        return self._cache

    def get(self) -> RegistrySnapshot:
        return self._open().get()

    def secret(self, agency_id: str) -> str | None:
        return self._open().secret(agency_id)


def send_prepare(job: Job) -> None:
    """Start the pipeline for an admitted job (the task is sent by name: no import of workers.tasks)."""
    try:
        app.send_task(
            TASK_PREPARE, kwargs={"request_id": job.request_id}, queue=INTAKE_QUEUE, task_id=f"{job.request_id}.prepare"
        )
    except Exception as exc:  # kombu's and redis' errors alike: the broker is unavailable
        raise ServiceError(Code.BROKER_UNAVAILABLE, f"sending {TASK_PREPARE}: {type(exc).__name__}: {exc}") from exc


class Gateway:
    def __init__(
        self,
        redis,
        store: ObjectStore,
        settings: Settings,
        *,
        consumer: str | None = None,
        claim_idle_ms: int = 60_000,
        registry: Registry | None = None,
        dispatch: Callable[[Job], None] | None = None,
        backoff_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.store = store
        self.settings = settings
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms
        self.registry: Registry = registry if registry is not None else LazyRegistry(settings)
        self.dispatch = dispatch or self.start_search
        self.backoff_s = backoff_s
        self.admission = AdmissionContext(redis, store, settings, self.registry)
        self.streams: set[str] = set()
        self._last_discover = 0.0
        self._last_sample = 0.0
        self._last_anchor = time.monotonic()
        self._last_anchor_ok = time.monotonic()  # the age counts from start until the first anchor

    def start_search(self, job: Job) -> None:
        """Set the intake watchdog (a Redis timer: ``broker.deadlines``), then send ``prepare``. If the
        prepare message is lost on its way to a worker, the watchdog sends it again."""
        with redis_boundary("setting the intake watchdog"):
            deadlines.schedule(
                self.redis, deadlines.intake_watchdog(job.request_id), time.time() + self.settings.fusion_deadline_s
            )
        send_prepare(job)

    def anchor_audit(self, force: bool = False) -> None:
        """Anchor the audit chain head in the object store every ``audit_anchor_interval_s``."""
        every = self.settings.audit_anchor_interval_s
        if not force and (every <= 0 or time.monotonic() - self._last_anchor < every):
            return
        self._last_anchor = time.monotonic()
        try:
            from ..accountability import db

            audit.anchor(db.get_engine(self.settings), audit.open_anchors(self.settings), actor="gateway")
            self._last_anchor_ok = time.monotonic()
        except Exception as exc:  # anchoring is periodic: a failure is logged and retried next time
            log.warning("audit.anchor_failed", error=f"{type(exc).__name__}: {exc}")

    # ---- stream bookkeeping ----------------------------------------------------------------
    def discover(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_discover < 2.0:
            return
        self._last_discover = time.monotonic()
        with redis_boundary("listing intake streams"):
            found = [
                as_str(k)
                for k in self.redis.scan_iter(match=keys.INTAKE_STREAM_PREFIX + "*", _type="STREAM", count=1000)
            ]
        for name in found:
            if name in self.streams:
                continue
            ensure_group(self.redis, name, keys.INTAKE_GROUP)
            self.streams.add(name)
            log.info("gateway.stream_added", stream=name)

    def sample_queues(self) -> None:
        if time.monotonic() - self._last_sample < 5.0:
            return
        self._last_sample = time.monotonic()
        with redis_boundary("sampling queue lengths"):
            queues = queues_of(self.settings)
            pipe = self.redis.pipeline()
            for q in queues:
                pipe.llen(q)
                pipe.lindex(q, -1)  # kombu pushes on the left and takes from the right: the oldest
            pipe.zcard(keys.DEADLINES)
            pipe.zrange(keys.DEADLINES, 0, 0, withscores=True)
            pipe.hlen(UNACKED_HASH)
            pipe.hgetall(keys.TASK_OVERRUNS)
            *per_queue, timers, first, unacked, overruns = pipe.execute()
        now = time.time()
        for i, q in enumerate(queues):
            metrics.QUEUE_LENGTH.labels(q).set(per_queue[2 * i])
            metrics.QUEUE_OLDEST_AGE.labels(q).set(oldest_message_age(per_queue[2 * i + 1], now))
        metrics.TIMERS_PENDING.set(timers)
        metrics.TIMER_OVERDUE.set(max(0.0, time.time() - float(first[0][1])) if first else 0.0)
        metrics.TASKS_UNACKED.set(unacked)
        for task, n in overruns.items():
            metrics.TASK_OVERRUNS.labels(as_str(task)).set(int(n))
        if self.settings.audit_anchor_interval_s > 0:
            metrics.AUDIT_ANCHOR_AGE.set(time.monotonic() - self._last_anchor_ok)

    def heartbeat(self) -> None:
        with redis_boundary("setting the heartbeat"):
            self.redis.set(keys.gateway_alive(self.consumer), "1", ex=15)

    # ---- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, block_ms: int = 1000) -> None:
        """Serve until ``stop`` is set; a Redis outage is logged and waited out, never fatal."""
        stop = stop or threading.Event()
        log.info("gateway.started", consumer=self.consumer)
        last_recover: float | None = None
        while not stop.is_set():
            try:
                if last_recover is None:
                    self.discover(force=True)
                    self.recover()
                    last_recover = time.monotonic()
                    metrics.set_ready()  # Redis answered and the intake streams are read: healthy
                self.heartbeat()
                self.poll(block_ms=block_ms)
                self.anchor_audit()
                if time.monotonic() - last_recover > self.claim_idle_ms / 2000:
                    self.recover()
                    last_recover = time.monotonic()
            except ServiceError as err:
                log.warning("gateway.unavailable", code=err.code.value, error=err.message, retry_in_s=self.backoff_s)
                stop.wait(self.backoff_s)
        log.info("gateway.stopped", consumer=self.consumer)

    def recover(self) -> int:
        """Handle entries left pending: ours from a previous life, and others' idle too long."""
        n = 0
        for stream in sorted(self.streams):
            with redis_boundary("reading pending entries"):
                resp = self.redis.xreadgroup(keys.INTAKE_GROUP, self.consumer, {stream: "0"}, count=1000)
            for _, entries in resp or []:
                for entry_id, fields in entries:
                    if fields:
                        self.handle(stream, as_str(entry_id), fields)
                        n += 1
            start = "0-0"
            while True:
                with redis_boundary("claiming idle entries"):
                    nxt, claimed, *_ = self.redis.xautoclaim(
                        stream, keys.INTAKE_GROUP, self.consumer, self.claim_idle_ms, start_id=start, count=100
                    )
                for entry_id, fields in claimed:
                    if fields:
                        self.handle(stream, as_str(entry_id), fields)
                        n += 1
                start = as_str(nxt)
                if start == "0-0":
                    break
        return n

    def poll(self, block_ms: int = 1000) -> int:
        self.discover()
        self.sample_queues()
        if not self.streams:
            time.sleep(block_ms / 1000)
            return 0
        with redis_boundary("reading intake streams"):
            resp = self.redis.xreadgroup(
                keys.INTAKE_GROUP, self.consumer, {s: ">" for s in self.streams}, count=50, block=block_ms
            )
        n = 0
        for stream, entries in resp or []:
            for entry_id, fields in entries:
                self.handle(as_str(stream), as_str(entry_id), fields)
                n += 1
        return n

    # ---- one message ----------------------------------------------------------------------
    def handle(self, stream: str, entry_id: str, fields: Mapping[Any, Any]) -> None:
        """Admit and dispatch, or answer, one entry, then acknowledge it.

        Never raises on bad input; when a dependency fails the entry is left pending (not acknowledged)
        to be retried, and the error is logged, not raised.
        """
        agency = stream[len(keys.INTAKE_STREAM_PREFIX) :]
        metrics.PROBES_RECEIVED.labels(agency).inc()
        structlog.contextvars.bind_contextvars(agency=agency, entry_id=entry_id)
        try:
            outcome = self._admit(agency, entry_id, fields)
            if isinstance(outcome, Refusal):
                self.answer(agency, entry_id, outcome)
            else:
                log.info(
                    "probe.accepted",
                    request_id=outcome.job.request_id,
                    case=outcome.job.case_number,
                    purpose=outcome.job.purpose,
                )
            with redis_boundary("acknowledging an entry"):
                # Answered or admitted: the entry (and the probe image it may carry, now in the object
                # store under its retention) leaves Redis. Only entries not yet handled stay.
                pipe = self.redis.pipeline(transaction=True)
                pipe.xack(stream, keys.INTAKE_GROUP, entry_id)
                pipe.xdel(stream, entry_id)
                pipe.execute()
        except ServiceError as err:
            # Redis, the store, the audit database or the broker is down: leave the entry pending so it
            # is retried (by us on the next recover, or by another gateway).
            log.warning("gateway.service_error", code=err.code.value, error=err.message)
        finally:
            structlog.contextvars.unbind_contextvars("agency", "entry_id")

    def _admit(self, agency: str, entry_id: str, fields: Mapping[Any, Any]) -> Admission | Refusal:
        try:
            return admit_entry(self.admission, agency, entry_id, fields, dispatch=self.dispatch)
        except ServiceError:
            raise
        except Exception as exc:  # a bug must not take the gateway down or lose the message
            log.exception("gateway.unexpected")
            return Refusal(QuorumError(Code.INTERNAL, type(exc).__name__), None, keyed=True)

    def answer(self, agency: str, entry_id: str, refusal: Refusal) -> None:
        """Audit, publish and count one refusal (raises ``ServiceError`` if any of it cannot be done)."""
        err = refusal.error
        record_refusal(self.admission, agency, entry_id, refusal)
        result = ErrorResult(
            request_id=refusal.request_id,
            agency_id=agency,
            stream_entry_id=entry_id,
            code=err.code.value,
            message=err.message,
            retryable=err.retryable,
            stage="gateway",
        )
        with redis_boundary("publishing a refusal"):
            publish(self.redis, result, ttl_s=self.settings.result_ttl_s, keyed=refusal.keyed)
            self.redis.xadd(
                keys.REJECTED_STREAM,
                {
                    "agency": agency,
                    "entry_id": entry_id,
                    "request_id": refusal.request_id or "",
                    "code": err.code.value,
                },
                maxlen=100_000,
                approximate=True,
            )
        metrics.PROBES_REJECTED.labels(agency, err.code.value).inc()
        log.info("probe.rejected", request_id=refusal.request_id, code=err.code.value, reason=err.message)
