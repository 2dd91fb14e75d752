"""Process entry points: ``quorum worker ROLE`` and ``quorum gateway``."""

from __future__ import annotations

import os
import signal
import socket
import threading

import structlog

from broker.app import ROLE_QUEUES, app
from core import metrics
from core.config import settings
from core.logs import configure_logging

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
    """A Celery worker consuming the queue of ``role``; engine roles preload model and gallery."""
    if role not in ROLE_QUEUES:
        raise SystemExit(f"unknown role {role!r}; roles: {', '.join(ROLE_QUEUES)}")
    s = settings()
    configure_logging(s.log_level, s.log_json)
    from workers import hooks
    from workers.runtime import runtime

    hooks.install()
    runtime.role = role
    _start_metrics()
    node = f"{role}@{socket.gethostname()}-{os.getpid()}"
    if role in s.engines:
        # Beat from the start: a worker that is (re)starting will answer, so fusion waits for it
        # (bounded by the search timeout) rather than degrading the list while it loads.
        _start_heartbeat(runtime.redis, role, node)
        runtime.replica(role)  # loads the model and catches up with the gallery before taking work
        metrics.GALLERY_TEMPLATES.labels(role).set(len(runtime.replica(role).index))
    elif role == "intake":
        _ = runtime.detector
    if role == "fusion":
        _start_timer_sweeper(runtime.redis)
    # solo pool: tasks run in this process, next to the model and index loaded above. Scale out by
    # running more worker processes (each a full replica), not by forking.
    app.worker_main(
        [
            "worker",
            "-Q",
            ROLE_QUEUES[role],
            "-n",
            node,
            "--pool",
            "solo",
            "--loglevel",
            s.log_level,
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _start_heartbeat(redis, engine: str, node: str, every_s: float = 3.0) -> None:
    """Tell fusion this engine is alive (busy, perhaps, but not down) while the process lives."""
    from broker import keys

    key = keys.engine_alive(engine, node)

    def beat() -> None:
        while True:
            try:
                redis.set(key, "1", ex=int(every_s * 4))
            except Exception as exc:  # Redis briefly away: keep beating
                log.warning("heartbeat.failed", error=str(exc))
            threading.Event().wait(every_s)

    threading.Thread(target=beat, name="engine-heartbeat", daemon=True).start()


def sweep_timers_once(redis, now: float | None = None) -> int:
    """Send every timer that is due (``broker.deadlines``); returns how many were sent."""
    import time

    from broker import deadlines

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
    from workers.gateway import Gateway
    from workers.runtime import runtime

    _start_metrics()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    Gateway(
        runtime.redis, runtime.store, s, consumer=s.gateway_consumer or None, claim_idle_ms=s.gateway_claim_idle_ms
    ).run(stop)
