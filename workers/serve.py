"""Process entry points: ``quorum worker ROLE`` and ``quorum gateway``."""

from __future__ import annotations

import os
import signal
import socket
import threading

import structlog

from ..broker import lifecycle, liveness
from ..broker.app import ROLE_QUEUES, app, parse_reindex_role, parse_shard_role, role_queue
from ..broker.lifecycle import Observer
from ..core import metrics
from ..core.config import settings
from ..core.logs import configure_logging, relay_foreign_output

log = structlog.get_logger()


def _start_metrics() -> None:
    port = settings().metrics_port
    if not port:
        return
    try:
        metrics.start_metrics_server(port)
        log.info("metrics.serving", port=port)
    except OSError as exc:  # a taken port must not stop a worker
        log.warning("metrics.port_unavailable", port=port, error=str(exc))


def run_worker(role: str, concurrency: int = 1) -> None:
    """A Celery worker consuming the queue of ``role``; engine roles preload model and gallery.

    For a sharded engine (``settings.shards``) the engine's role (``sface``) embeds and scatters and
    loads no gallery; each shard has its own role (``sface.2of4``), which loads only that shard."""
    queue = role_queue(role)
    if queue is None:
        raise SystemExit(
            f"unknown role {role!r}; roles: {', '.join(ROLE_QUEUES)}, or ENGINE.IofS for a shard, "
            "ENGINE.reindex for a reindex worker"
        )
    s = settings()
    _check_shard_role(role, s)
    configure_logging(s.log_level, s.log_json)
    if s.log_json:
        relay_foreign_output()
    _preflight(role, s)
    from . import observers
    from .runtime import runtime

    runtime.role = role
    observers.install(s, runtime.redis)  # log context, metrics, the task time limit, readiness
    _start_metrics()
    node = f"{role}@{socket.gethostname()}-{os.getpid()}"
    _load(runtime, role, node, s)
    if role == "fusion":
        _start_timer_sweeper(runtime.redis)
    # Tasks run in this process, next to the model and index loaded above (scale out by running more
    # worker processes, each a full replica, not by forking): one at a time (solo pool), except in an
    # engine's embed workers, which run embed_batch tasks at once in threads and embed their faces in
    # shared model calls (workers.batching; the model itself is called from one thread only).
    pool = ["--pool", "solo"]
    if role in s.engines and s.embed_batch > 1:
        runtime.batching = True
        runtime.batcher(role)
        pool = ["--pool", "threads", "--concurrency", str(s.embed_batch)]
    argv = ["worker", "-Q", queue, "-n", node, *pool, "--loglevel", s.log_level, "--without-gossip", "--without-mingle"]
    app.worker_main(["--quiet", *argv] if s.log_json else argv)  # JSON mode: no banner, records only


def _check_shard_role(role: str, s) -> None:
    """A shard role must match the shard count this deployment gives its engine."""
    shard = parse_shard_role(role)
    if shard and (shard[0] not in s.engines or s.shards_of(shard[0]) != shard[2]):
        configured = s.shards_of(shard[0]) if shard[0] in s.engines else 0
        raise SystemExit(
            f"{role}: {shard[0]} is configured with {configured} shard(s) here (QUORUM_ENGINES, QUORUM_SHARDS), "
            f"not {shard[2]}"
        )


def _preflight(role: str, s) -> None:
    """Before anything loads: the model packages this role opens are installed, or the process ends
    saying which command installs them (``ENGINE_NOT_INSTALLED``)."""
    from ..core.engines import require_models
    from ..core.errors import QuorumError

    shard = parse_shard_role(role)
    engine = shard[0] if shard else parse_reindex_role(role) or (role if role in s.engines else None)
    detects = role == "intake" or parse_reindex_role(role) is not None
    try:
        require_models((engine,) if engine else (), s.detector if detects else None)
    except QuorumError as exc:
        log.error("worker.models_missing", role=role, code=exc.code.value, error=exc.message)
        raise SystemExit(f"{role}: {exc}") from None


def _load(runtime, role: str, node: str, s) -> None:
    """What a role loads before it takes work (model, gallery or shard, detector), and its heartbeat."""
    from ..broker import keys

    shard = parse_shard_role(role)
    reindexing = parse_reindex_role(role)
    if shard:
        engine, i, n = shard
        version = runtime.identity(engine)[0]  # the engine's version without its model: a shard embeds nothing
        _start_heartbeat(
            runtime.redis, keys.shard_alive(engine, i, n), node, lambda: version, keys.shard_alive_index(engine)
        )
        rep = runtime.replica(engine, i)  # loads only this shard's snapshot and log, never the model
        metrics.GALLERY_TEMPLATES.labels(rep.name).set(len(rep.index))
    elif reindexing:
        # Embeds the stored images with the engine version this process runs, into that version's logs
        # (quorum gallery reindex); consumes only the reindex queue and serves no search, so fusion never
        # counts it as the engine's worker. Its heartbeat names its version, which the reindex reads.
        version = runtime.engine(reindexing).version
        _ = runtime.detector
        _start_heartbeat(runtime.redis, keys.reindex_alive(reindexing), node, lambda: version)
    elif role in s.engines:
        # Beat from the start: a worker that is (re)starting will answer, so fusion waits for it
        # (bounded by the search timeout) rather than degrading the list while it loads.
        _start_heartbeat(runtime.redis, keys.engine_alive(role), node, _version_of(runtime, role))
        runtime.engine(role)  # the model, before taking work
        if s.shards_of(role) == 1:
            runtime.replica(role)  # and the gallery, caught up
            metrics.GALLERY_TEMPLATES.labels(role).set(len(runtime.replica(role).index))
        # else: it embeds and scatters; the shards' workers hold the gallery
    elif role == "intake":
        _ = runtime.detector


def _version_of(runtime, engine: str):
    """What an engine worker's heartbeat says: the version its engine runs once loaded (``quorum gallery
    status`` shows it), ``loading`` before."""
    return lambda: getattr(runtime._engines.get(engine), "version", "loading")


class Heartbeat(Observer):
    """Tells fusion this engine (or shard) is alive (busy, perhaps, but not down) while the process lives:
    the node's score in the sorted set ``key`` is the Redis server time until which it holds, and beside
    it the engine version it runs (``broker.liveness``); entries that ran out are dropped on each beat.
    A worker stopped on purpose leaves at once, so fusion stops waiting for it."""

    def __init__(self, redis, key: str, node: str, version=lambda: "", every_s: float = 3.0, index: str = "") -> None:
        self.redis, self.key, self.node, self.version, self.every_s = redis, key, node, version, every_s
        self.index = index  # shards: the engine's index of shard liveness sets (``quorum gallery status``)
        self.stopped = threading.Event()

    def beat(self) -> None:
        while not self.stopped.is_set():
            metrics.beat()  # /live
            try:
                liveness.heartbeat(
                    self.redis, self.key, self.node, ttl_s=self.every_s * 4, version=self.version(), index=self.index
                )
            except Exception as exc:  # Redis briefly away: keep beating
                log.warning("heartbeat.failed", error=str(exc))
            self.stopped.wait(self.every_s)

    def worker_stopping(self) -> None:
        self.stopped.set()
        try:
            liveness.leave(self.redis, self.key, self.node)
        except Exception as exc:
            log.warning("heartbeat.leave_failed", error=str(exc))


def _start_heartbeat(redis, key: str, node: str, version=lambda: "", index: str = "", every_s: float = 3.0) -> None:
    heartbeat = Heartbeat(redis, key, node, version, every_s, index)
    lifecycle.register(heartbeat)
    threading.Thread(target=heartbeat.beat, name="engine-heartbeat", daemon=True).start()


def sweep_timers_once(redis, now: float | None = None) -> int:
    """Send every timer that is due (``broker.deadlines``); returns how many were sent."""
    import time

    from ..broker import deadlines

    sent = 0
    for timer in deadlines.claim_due(redis, time.time() if now is None else now):
        app.send_task(timer.task, kwargs=timer.kwargs, queue=timer.queue)
        deadlines.done(redis, timer)
        sent += 1
    return sent


def _start_timer_sweeper(redis, every_s: float = 0.5) -> None:
    """Every fusion worker sends due timers (claims are atomic: several sweepers share the work)."""

    def sweep() -> None:
        while True:
            try:
                if sweep_timers_once(redis):
                    continue  # more may be due
            except Exception as exc:  # Redis briefly away: the timers wait in Redis, sweep again
                log.warning("timers.sweep_failed", error=str(exc))
            threading.Event().wait(every_s)

    threading.Thread(target=sweep, name="timer-sweeper", daemon=True).start()


def run_gateway() -> None:
    s = settings()
    configure_logging(s.log_level, s.log_json)
    if s.log_json:
        relay_foreign_output()
    from .gateway import Gateway
    from .runtime import runtime

    _start_metrics()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    gateway = Gateway(
        runtime.redis, runtime.store, s, consumer=s.gateway_consumer or None, claim_idle_ms=s.gateway_claim_idle_ms
    )
    from ..accountability.registry import AclWatch

    AclWatch(s, runtime.redis).run()  # quorum_redis_acl_stale: a registry change that has not reached Redis
    gateway.run(stop)  # ready (GET /ready) once it has found and recovered the intake streams
