"""The gateway: reads agencies' probe requests from Redis streams and starts the pipeline.

Agencies need no Python: each writes ``XADD quorum:intake:<agency> * payload <ProbeRequest JSON> ...``
(signed: see ``broker.signing``). The gateway owns the stream I/O only:

1. It reads one ``quorum:intake:<agency>`` stream per registered agency (the registry, never a keyspace
   SCAN) through one consumer group (``broker.redis_errors.ensure_group``; several gateways share the
   work) with the intake reader (``broker.intake``): entries are measured inside Redis, one over the
   size or field limit never enters the gateway (it is answered by its measure), at most
   ``gateway_reads_per_agency`` entries of one agency are read before the others' again, and they are
   handled one agency at a time. On start and every ``claim_idle_ms / 2`` it takes back its own
   pending entries and claims others' idle longer than ``claim_idle_ms`` (a gateway that died).
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

It also keeps its heartbeat in a liveness set (``broker.keys.GATEWAY_ALIVE``), samples the Celery queue lengths for the
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
from ..broker import deadlines, keys, liveness
from ..broker.app import INTAKE_QUEUE, TASK_PREPARE, app, oldest_message_age, queues_of
from ..broker.intake import IDLE_S, Entry, IntakeReader, Limits, interleave, rotated
from ..broker.keys import as_str
from ..broker.redis_errors import ensure_group, redis_boundary
from ..broker.results import archive, publish
from ..broker.sentinel import replicated
from ..core import metrics
from ..core.config import Settings
from ..core.errors import Code, QuorumError, ServiceError
from ..core.objectstore import ObjectStore
from ..schemas import ErrorResult
from ..schemas.job import Job
from .admission import (
    MAX_FIELDS,
    Admission,
    AdmissionContext,
    Refusal,
    Registry,
    admit_entry,
    entry_limit,
    record_refusal,
    screen,
)

log = structlog.get_logger()
UNACKED_HASH = "unacked"  # kombu's Redis transport: messages delivered to a worker, not yet acknowledged
# Intake streams of unregistered agencies are looked for by a SCAN walked a little at each discovery round
# (every 2 s): this many calls of COUNT 1000, so its cost does not grow with the keyspace (a whole walk of
# 1 M keys takes 830 ms of Redis time: BENCHMARKS.md "Liveness lookups"); a bigger keyspace only takes
# longer to walk (1 M keys: about 3 minutes; a small one: every round).
STRAY_SCAN_CALLS = 10


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
        limit = entry_limit(settings.max_image_bytes)
        self.reader = IntakeReader(
            redis,
            keys.INTAKE_GROUP,
            self.consumer,
            Limits(
                max_entry_bytes=limit,
                max_fields=MAX_FIELDS,
                per_stream=settings.gateway_reads_per_agency,
                max_batch_bytes=4 * limit,
            ),
        )
        self._turn = 0
        self._last_heartbeat = 0.0
        self._last_trim = 0.0
        self._last_discover = 0.0
        self._stray_cursor = 0  # where the walk for unregistered agencies' streams goes on from
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
        """The intake streams to read: one per registered agency (from the registry snapshot, never a
        keyspace SCAN), each with the consumer group created on first sight."""
        if not force and time.monotonic() - self._last_discover < 2.0:
            return
        self._last_discover = time.monotonic()
        from .admission import snapshot

        names = [keys.intake_stream(agency) for agency in snapshot(self.admission).agencies]
        names += self._stray_streams()
        for name in names:
            if name in self.streams:
                continue
            ensure_group(self.redis, name, keys.INTAKE_GROUP)
            self.streams.add(name)
            log.info("gateway.stream_added", stream=name)

    def _stray_streams(self) -> list[str]:
        """Intake streams of no registered agency (written by a service or admin user, or where Redis runs
        without the ACL), so their entries are answered UNKNOWN_AGENCY rather than left unread: the next
        STRAY_SCAN_CALLS steps of a keyspace SCAN that goes on where the last round stopped."""
        found: list[str] = []
        with redis_boundary("looking for intake streams of unregistered agencies"):
            for _ in range(STRAY_SCAN_CALLS):
                self._stray_cursor, batch = self.redis.scan(
                    self._stray_cursor, match=f"{keys.INTAKE_STREAM_PREFIX}*", count=1000, _type="STREAM"
                )
                found += [keys.as_str(k) for k in batch]
                if not self._stray_cursor:
                    break
        return found

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

    def trim_results(self) -> None:
        """Every agency's results stream keeps the answers of the last ``result_hold_s`` only (also trimmed
        at each publish; this catches a stream no answer has been published to since)."""
        if time.monotonic() - self._last_trim < 5.0:
            return
        self._last_trim = time.monotonic()
        min_id = f"{int((time.time() - self.settings.result_hold_s) * 1000)}-0"
        with redis_boundary("trimming results streams"):
            pipe = self.redis.pipeline(transaction=False)
            for stream in sorted(self.streams):
                pipe.xtrim(
                    keys.results_stream(stream[len(keys.INTAKE_STREAM_PREFIX) :]), minid=min_id, approximate=True
                )
            pipe.execute()

    def heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat < 1.0:
            return
        with redis_boundary("setting the heartbeat"):
            liveness.heartbeat(self.redis, keys.GATEWAY_ALIVE, self.consumer, ttl_s=15)
        self._last_heartbeat = time.monotonic()

    # ---- the loop -------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, block_ms: int = 1000) -> None:
        """Serve until ``stop`` is set; a Redis outage is logged and waited out, never fatal."""
        stop = stop or threading.Event()
        log.info("gateway.started", consumer=self.consumer)
        last_recover: float | None = None
        while not stop.is_set():
            metrics.beat()  # /live: the loop comes round (also while Redis is away)
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
        try:  # gone at once from the liveness set rather than when its heartbeat runs out
            liveness.leave(self.redis, keys.GATEWAY_ALIVE, self.consumer)
        except Exception as exc:  # Redis away at shutdown: the heartbeat runs out by itself
            log.warning("gateway.leave_failed", error=str(exc))
        log.info("gateway.stopped", consumer=self.consumer)

    def recover(self) -> int:
        """Handle entries left pending: ours from a previous life, and others' idle too long (claimed by
        id only, then read, measured, like new ones, through the intake reader)."""
        n = 0
        for stream in sorted(self.streams):
            start = "0-0"
            while True:
                with redis_boundary("claiming idle entries"):
                    resp = self.redis.xautoclaim(
                        stream, keys.INTAKE_GROUP, self.consumer, self.claim_idle_ms, start_id=start, justid=True
                    )
                start = as_str(resp[0]) if resp else "0-0"  # [next id, ids, deleted ids]
                if start == "0-0":
                    break
            n += self._pending(stream)
        return n

    def _pending(self, stream: str) -> int:
        """Handle this consumer's pending entries of ``stream``, oldest first, ``per_stream`` at a time."""
        n, after = 0, "0"
        while True:
            with redis_boundary("reading pending entries"):
                per_stream, errors = self.reader.read([(stream, after)])
            self._forget(errors)
            batch = per_stream[0] if per_stream else []
            if not batch:
                return n
            for entry in batch:
                self.handle_entry(entry)
                n += 1
            after = batch[-1].id

    def poll(self, block_ms: int = 1000) -> int:
        """Read every agency's stream once (the first stream in turn), handle what came, one entry per
        agency at a time; when nothing came, read again every ``intake.IDLE_S`` for up to ``block_ms``."""
        self.discover()
        self.sample_queues()
        self.trim_results()
        deadline = time.monotonic() + block_ms / 1000
        while True:
            order = rotated(self.streams, self._turn)
            self._turn += 1
            if order:
                with redis_boundary("reading intake streams"):
                    per_stream, errors = self.reader.read([(s, ">") for s in order])
                self._forget(errors)
                n = 0
                for entry in interleave(per_stream):
                    self.handle_entry(entry)
                    n += 1
                if n:
                    return n
            if time.monotonic() >= deadline:
                return 0
            time.sleep(IDLE_S)

    def _forget(self, errors: list) -> None:
        """A stream Redis would not read (its group gone: deleted by an administrator) is set up again
        at the next discovery."""
        for err in errors:
            log.warning("gateway.stream_unreadable", stream=err.stream, error=str(err))
            self.streams.discard(err.stream)
            self._last_discover = 0.0

    # ---- one message ----------------------------------------------------------------------
    def handle_entry(self, entry: Entry) -> None:
        """One entry as the intake reader measured it: handled whole, answered by its size, or (deleted
        from the stream while it was pending) acknowledged."""
        if entry.whole:
            self.handle(entry.stream, entry.id, entry.fields)
        elif entry.deleted:
            with redis_boundary("acknowledging a deleted entry"):
                self.redis.xack(entry.stream, keys.INTAKE_GROUP, entry.id)
        else:
            self.handle(entry.stream, entry.id, {}, measured=entry)

    def handle(self, stream: str, entry_id: str, fields: Mapping[Any, Any], measured: Entry | None = None) -> None:
        """Admit and dispatch, or answer, one entry, then acknowledge it.

        Never raises on bad input; when a dependency fails the entry is left pending (not acknowledged)
        to be retried, and the error is logged, not raised.
        """
        agency = stream[len(keys.INTAKE_STREAM_PREFIX) :]
        metrics.PROBES_RECEIVED.labels(agency).inc()
        structlog.contextvars.bind_contextvars(agency=agency, entry_id=entry_id)
        try:
            outcome = self._admit(agency, entry_id, fields) if measured is None else self._too_big(measured)
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
                # What admitting or answering wrote goes to a replica first (broker.sentinel): acknowledged
                # only then, so a failover cannot lose an accepted probe.
                s = self.settings
                replicated(self.redis, s.redis_wait_replicas, s.redis_wait_timeout_ms, "intake_ack")
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

    def _too_big(self, entry: Entry) -> Refusal:
        """An entry the reader did not bring in (over the size or field limit): refused by its measure."""
        try:
            screen(entry.size, entry.n_fields, max_bytes=entry_limit(self.settings.max_image_bytes))
        except QuorumError as err:
            return Refusal(err, None, keyed=False)
        return Refusal(QuorumError(Code.INTERNAL, "entry measured over the limits but within them"), None)

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
        s = self.settings
        hold = s.result_ttl_s
        if refusal.keyed:  # the request's answer: kept in the object store, held in Redis for delivery
            try:
                archive(self.store, result)
                hold = s.result_hold_s
            except Exception as exc:  # the store away: Redis keeps the answer for result_ttl_s instead
                log.warning("result.archive_failed", request_id=result.request_id, error=f"{type(exc).__name__}")
        with redis_boundary("publishing a refusal"):
            publish(self.redis, result, ttl_s=hold, keyed=refusal.keyed, stream_age_s=s.result_hold_s)
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
