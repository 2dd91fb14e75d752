"""The Celery application on Redis (kombu).

Queues: ``intake`` (detect and choose the face), one ``engine.<name>`` per engine (embed + search,
and enrolment into that engine; for a sharded engine, embed and scatter), one ``shard.<name>.<i>of<S>``
per shard of a sharded engine (search that shard; created when first used), ``fusion`` (merge rank
lists) and ``gallery`` (maintenance: snapshots, expunge). Tasks are acknowledged late and rejected
when a worker dies, so a message is redelivered rather than lost; every task is idempotent (see
``workers.tasks``) so redelivery is safe.
"""

from __future__ import annotations

import json
import re

from celery import Celery
from kombu import Exchange, Queue

from ..core.config import settings
from ..core.engines import ENGINE_NAMES
from . import lifecycle
from .lifecycle import SENT_AT_HEADER
from .sentinel import celery_config

# Task names: the workers register these names (workers.tasks); senders use them (no import of workers).
TASK_PREPARE = "quorum.intake.prepare"
TASK_SEARCH = "quorum.engine.search"
TASK_SHARD_SEARCH = "quorum.shard.search"
TASK_ENROL = "quorum.engine.enrol"
TASK_ENROL_DETECT = "quorum.enrol.detect"
TASK_FUSE = "quorum.fusion.fuse"
TASK_SNAPSHOT = "quorum.gallery.snapshot"

INTAKE_QUEUE = "intake"
ENROL_QUEUE = "enrol"  # bulk enrolment's face detection: intake workers take it beside probes, in turn
FUSION_QUEUE = "fusion"
GALLERY_QUEUE = "gallery"


def engine_queue(engine: str) -> str:
    return f"engine.{engine}"


def reindex_queue(engine: str) -> str:
    """Enrolment and snapshots for the engine version a reindex builds (``quorum gallery reindex``),
    consumed only by ``quorum worker ENGINE --reindex`` workers, never by the ones that search."""
    return f"engine.{engine}.reindex"


def reindex_role(engine: str) -> str:
    """The worker role of an engine's reindex workers: ``sface.reindex``."""
    return f"{engine}.reindex"


def parse_reindex_role(role: str) -> str | None:
    """``sface.reindex`` -> "sface"; None for any other role."""
    engine, sep, rest = role.partition(".")
    return engine if sep and rest == "reindex" and engine in ENGINE_NAMES else None


def shard_queue(engine: str, shard: int, shards: int) -> str:
    """One shard of a sharded engine's gallery: its searches (every replica of the shard consumes it)."""
    return f"shard.{engine}.{shard}of{shards}"


ALL_QUEUES = (INTAKE_QUEUE, ENROL_QUEUE, *(engine_queue(e) for e in ENGINE_NAMES), FUSION_QUEUE, GALLERY_QUEUE)

# Which queue each worker role consumes.
ROLE_QUEUES = {
    "intake": f"{INTAKE_QUEUE},{ENROL_QUEUE}",  # kombu polls the two in turn: enrolment never starves probes
    **{e: engine_queue(e) for e in ENGINE_NAMES},
    "fusion": FUSION_QUEUE,
    "gallery": GALLERY_QUEUE,
}


def shard_role(engine: str, shard: int, shards: int) -> str:
    """The worker role that serves one shard of a sharded engine: ``sface.2of4``."""
    return f"{engine}.{shard}of{shards}"


_SHARD_ROLE = re.compile(r"^([a-z0-9_]+)\.(\d+)of(\d+)$")


def parse_shard_role(role: str) -> tuple[str, int, int] | None:
    """``sface.2of4`` -> ("sface", 2, 4); None for any other role."""
    m = _SHARD_ROLE.match(role)
    if not m or m.group(1) not in ENGINE_NAMES:
        return None
    shard, shards = int(m.group(2)), int(m.group(3))
    return (m.group(1), shard, shards) if 0 <= shard < shards else None


def role_queue(role: str) -> str | None:
    """The queue a worker role consumes (None: no such role)."""
    parsed = parse_shard_role(role)
    if parsed:
        return shard_queue(*parsed)
    reindexing = parse_reindex_role(role)
    return reindex_queue(reindexing) if reindexing else ROLE_QUEUES.get(role)


def queues_of(s) -> tuple[str, ...]:
    """Every queue a deployment with these settings uses: the fixed ones and its engines' shard queues."""
    shards = tuple(shard_queue(e, i, n) for e, n in s.shards if e in s.engines for i in range(n))
    return ALL_QUEUES + shards + tuple(reindex_queue(e) for e in s.engines)


# Every sender stamps its messages with the time it sent them (broker.lifecycle.SentAt).
lifecycle.register(lifecycle.SentAt())


def oldest_message_age(raw: bytes | str | None, now: float) -> float:
    """Seconds the message ``raw`` (a kombu message as the Redis transport stores it: a JSON envelope
    whose ``headers`` Celery fills) has waited; 0 for none, or one without the header."""
    if not raw:
        return 0.0
    try:
        sent = json.loads(raw).get("headers", {}).get(SENT_AT_HEADER)
        return max(0.0, now - float(sent)) if sent is not None else 0.0
    except (ValueError, TypeError, AttributeError):
        return 0.0


def own_queue(name: str) -> Queue:
    """A queue bound to an exchange of its own, its name the routing key: a message for one queue reaches
    no other (the queues Celery creates on first use, shards' and reindex queues, are made so too)."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def make_app(redis_url: str | None = None) -> Celery:
    s = settings()
    url = redis_url or s.redis_url
    conn = celery_config(url)  # one server, or Sentinel: kombu's sentinel:// transport and result backend
    app = Celery("quorum", broker=conn["broker_url"], backend=conn["result_backend"], include=["quorum.workers.tasks"])
    app.conf.update(
        task_queues=[own_queue(q) for q in ALL_QUEUES],
        task_default_queue=INTAKE_QUEUE,
        task_routes={
            "quorum.intake.*": {"queue": INTAKE_QUEUE},
            "quorum.enrol.*": {"queue": ENROL_QUEUE},
            "quorum.fusion.*": {"queue": FUSION_QUEUE},
            "quorum.gallery.*": {"queue": GALLERY_QUEUE},
            # quorum.engine.* tasks are sent with an explicit engine queue (see workers.tasks).
        },
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=False,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        # A message a dead worker had taken is restored visibility_timeout after delivery; kombu looks
        # for such messages every unacked_restore_interval x unacked_restore_throttle seconds.
        broker_transport_options={
            "visibility_timeout": s.task_visibility_timeout_s,
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            **conn["transport_options"],
        },
        result_backend_transport_options=conn["transport_options"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


app = make_app()
