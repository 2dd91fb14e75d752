"""Process entry points: ``quorum worker ROLE`` and ``quorum gateway``."""

from __future__ import annotations

import os
import signal
import socket
import threading

import structlog

from ..broker.app import ROLE_QUEUES, app, parse_reindex_role, parse_shard_role, role_queue
from ..core import metrics
from ..core.config import settings
from ..core.logs import configure_logging

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
    shard = parse_shard_role(role)
    if shard and (shard[0] not in s.engines or s.shards_of(shard[0]) != shard[2]):
        configured = s.shards_of(shard[0]) if shard[0] in s.engines else 0
        raise SystemExit(
            f"{role}: {shard[0]} is configured with {configured} shard(s) here (QUORUM_ENGINES, QUORUM_SHARDS), "
            f"not {shard[2]}"
        )
    configure_logging(s.log_level, s.log_json)
    from ..broker import keys
    from . import hooks
    from .runtime import runtime

    hooks.install()
    runtime.role = role
    from . import watchdog

    watchdog.install(runtime.redis, s.task_time_limit, ttl_s=s.result_ttl_s)  # bounds each task's run time
    _start_metrics()
    node = f"{role}@{socket.gethostname()}-{os.getpid()}"
    reindexing = parse_reindex_role(role)
    if shard:
        engine, i, n = shard
        _start_heartbeat(runtime.redis, keys.shard_alive(engine, i, n), node, _version_of(runtime, engine))
        rep = runtime.replica(engine, i)  # loads only this shard's snapshot and log
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
        if s.shards_of(role) == 1:
            runtime.replica(role)  # loads the model and catches up with the gallery before taking work
            metrics.GALLERY_TEMPLATES.labels(role).set(len(runtime.replica(role).index))
        else:
            runtime.engine(role)  # embeds and scatters: the shards' workers hold the gallery
    elif role == "intake":
        _ = runtime.detector
    if role == "fusion":
        _start_timer_sweeper(runtime.redis)
    # Ready (GET /ready: the container health check) once the model and gallery above are loaded and
    # Celery consumes the queue: a worker still loading, or not reaching the broker, is not healthy.
    from celery.signals import worker_ready

    worker_ready.connect(lambda **_: metrics.set_ready(), weak=False)
    # Tasks run in this process, next to the model and index loaded above (scale out by running more
    # worker processes, each a full replica, not by forking): one at a time (solo pool), except in an
    # engine's embed workers, which run embed_batch tasks at once in threads and embed their faces in
    # shared model calls (workers.batching; the model itself is called from one thread only).
    pool = ["--pool", "solo"]
    if role in s.engines and s.embed_batch > 1:
        runtime.batching = True
        runtime.batcher(role)
        pool = ["--pool", "threads", "--concurrency", str(s.embed_batch)]
    app.worker_main(
        [
            "worker",
            "-Q",
            queue,
            "-n",
            node,
            *pool,
            "--loglevel",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _version_of(runtime, engine: str):
    """What an engine worker's heartbeat says: the version its engine runs once loaded (``quorum gallery
    status`` shows it), ``loading`` before."""
    return lambda: getattr(runtime._engines.get(engine), "version", "loading")


def _start_heartbeat(redis, key: str, node: str, version=lambda: "", every_s: float = 3.0) -> None:
    """Tell fusion this engine (or shard) is alive (busy, perhaps, but not down) while the process lives:
    the node's score in the sorted set ``key`` is the Redis server time until which it holds, and beside
    it the engine version it runs (``broker.liveness``); entries that ran out are dropped on each beat."""

    from ..broker import liveness

    stopped = threading.Event()

    def beat() -> None:
        while not stopped.is_set():
            try:
                liveness.heartbeat(redis, key, node, ttl_s=every_s * 4, version=version())
            except Exception as exc:  # Redis briefly away: keep beating
                log.warning("heartbeat.failed", error=str(exc))
            stopped.wait(every_s)

    def leave(**_: object) -> None:  # stopped on purpose: fusion stops waiting for this worker at once
        stopped.set()
        try:
            liveness.leave(redis, key, node)
        except Exception as exc:
            log.warning("heartbeat.leave_failed", error=str(exc))

    from celery.signals import worker_shutdown

    worker_shutdown.connect(leave, weak=False)
    threading.Thread(target=beat, name="engine-heartbeat", daemon=True).start()


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
    from .gateway import Gateway
    from .runtime import runtime

    _start_metrics()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    gateway = Gateway(
        runtime.redis, runtime.store, s, consumer=s.gateway_consumer or None, claim_idle_ms=s.gateway_claim_idle_ms
    )
    gateway.run(stop)  # ready (GET /ready) once it has found and recovered the intake streams
