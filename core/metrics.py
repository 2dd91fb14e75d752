"""Prometheus metrics, defined once.

Naming follows Prometheus conventions: one ``quorum_`` prefix, base units in the name, ``_total`` on
counters, and labels only from small bounded sets (agency, engine, stage, outcome, error code, queue),
never request or subject ids. Deployment rules and dashboards in ``deploy/`` use these names.

The same HTTP server answers ``/ready``: 503 until the process calls :func:`set_ready` (a worker once
its model and gallery are loaded and Celery consumes its queue; the gateway once it reads the intake
streams), then 200; and ``/live``: 200 unless the process's loop stopped coming round (:func:`beat`).
Container health checks (``quorum health``) and readiness probes ask ``/ready``, liveness probes
``/live``, Prometheus ``/metrics``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

PROBES_RECEIVED = Counter("quorum_probes_received_total", "Probe requests read from intake streams", ["agency"])
PROBES_REJECTED = Counter(
    "quorum_probes_rejected_total", "Probe requests answered with an error instead of a search", ["agency", "code"]
)
SEARCHES_COMPLETED = Counter(
    "quorum_searches_completed_total", "Fused candidate lists published", ["agency", "outcome"]
)
SEARCH_DURATION = Histogram(
    "quorum_search_duration_seconds",
    "From gateway receipt to fused result",
    ["agency", "outcome"],  # agency: bounded by the registry (64 members)
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120),
)
ENGINE_DURATION = Histogram(
    "quorum_engine_duration_seconds",
    "Time an engine spends per probe",
    ["engine", "stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EMBED_BATCH_FACES = Histogram(
    "quorum_embed_batch_faces",
    "Faces per model call of an engine worker (micro-batching: workers.batching)",
    ["engine"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
EMBED_BATCH_WAIT = Histogram(
    "quorum_embed_batch_wait_seconds",
    "How long the first face of a model call waited for the others",
    ["engine"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
ENGINE_FAILURES = Counter("quorum_engine_failures_total", "Engine results with an error", ["engine", "code"])
GALLERY_TEMPLATES = Gauge("quorum_gallery_templates", "Live templates in this worker's index", ["engine"])
QUEUE_LENGTH = Gauge("quorum_queue_length", "Messages waiting in a Celery queue", ["queue"])
REDIS_WAIT_SHORT = Counter(
    "quorum_redis_replication_wait_short_total",
    "Writes acknowledged after WAIT timed out with fewer replicas than QUORUM_REDIS_WAIT_REPLICAS confirming",
    ["where"],
)
QUEUE_OLDEST_AGE = Gauge(
    "quorum_queue_oldest_message_age_seconds",
    "How long the oldest message waiting in a Celery queue has waited (0: empty)",
    ["queue"],
)
TIMERS_PENDING = Gauge("quorum_timers_pending", "Fusion deadlines and search backstops waiting in Redis")
TIMER_OVERDUE = Gauge(
    "quorum_timer_overdue_seconds", "How late the earliest due timer is (0: none due; grows if no fusion worker sweeps)"
)
TASKS_UNACKED = Gauge("quorum_tasks_unacked", "Celery messages taken by workers and not yet acknowledged")
ANSWERS_HELD = Counter(
    "quorum_answers_held_for_audit_total", "Answers not published yet because the audit database was unavailable"
)
QUOTA_USED = Gauge("quorum_agency_quota_used", "Searches counted against the agency's daily quota today", ["agency"])
QUOTA_LIMIT = Gauge("quorum_agency_quota_limit", "The agency's daily search quota (0: unlimited)", ["agency"])
AUDIT_ANCHOR_AGE = Gauge(
    "quorum_audit_anchor_age_seconds", "Time since this gateway last anchored the audit chain head in the object store"
)
TASK_QUEUE_WAIT = Histogram(
    "quorum_task_queue_wait_seconds",
    "From a task's message being sent to a worker starting it (one queue hop)",
    ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TASK_OVERRUNS = Gauge(
    "quorum_task_time_limit_exceeded",
    "Tasks that ran past the task time limit, whose worker then exited (workers.watchdog); a running count "
    "kept in Redis, so read its rise over a window (max_over_time - min_over_time)",
    ["task"],
)
TASKS = Counter("quorum_tasks_total", "Celery tasks run by this process", ["task", "outcome"])

REDIS_ACL_STALE = Gauge(
    "quorum_redis_acl_stale",
    "1 when the agency users Redis was last given differ from the registry's (a change not applied yet)",
)
READY = Gauge("quorum_ready", "1 once this process has loaded what it needs and takes work (GET /ready)")

_started = False
_ready = threading.Event()


def set_ready() -> None:
    """This process takes work from now on: ``/ready`` answers 200."""
    _ready.set()
    READY.set(1)


def is_ready() -> bool:
    return _ready.is_set()


LIVE_STALE_S = 120.0  # a loop that has not come round for this long is stuck: /live answers 503
_last_beat: list[float] = []  # monotonic time of the process loop's last round; empty: it has no loop


def beat() -> None:
    """The process's main loop came round (the gateway's poll loop, a worker's heartbeat thread): it is
    alive. A Redis outage is not death: loops beat while they wait it out."""
    _last_beat[:] = [time.monotonic()]


def is_live() -> bool:
    """``GET /live``: the HTTP server answers, and the loop (if the process has one) beat lately. Unlike
    ``/ready`` it holds while the model loads, so an orchestrator restarts only a stuck process."""
    return not _last_beat or time.monotonic() - _last_beat[0] < LIVE_STALE_S


def _with_ready(metrics_app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path in ("/ready", "/live"):
            ok = _ready.is_set() if path == "/ready" else is_live()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            word = path[1:].encode()
            return [word + b"\n" if ok else b"not " + word + b"\n"]
        return metrics_app(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Health checks every 15 s would fill the log."""


def start_metrics_server(port: int) -> None:
    """Serve /metrics and /ready on ``port`` (0 = do not serve). Safe to call more than once."""
    global _started
    if port and not _started:
        httpd = make_server("0.0.0.0", port, _with_ready(make_wsgi_app()), ThreadingWSGIServer, _QuietHandler)
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
        _started = True
