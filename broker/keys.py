"""Every Redis key and stream name in one place.

Names carry the agency so that a Redis ACL user per agency can be confined to
``quorum:intake:<agency>`` (write) and ``quorum:results:<agency>`` / ``quorum:result:<agency>:*`` (read).
"""

from __future__ import annotations


def as_str(v: bytes | str) -> str:
    """Redis replies come as bytes (the clients do not decode): stream ids, key names, field values."""
    return v.decode() if isinstance(v, bytes) else v


INTAKE_STREAM_PREFIX = "quorum:intake:"
AUDIT_HEAD = "quorum:audit:head"  # the audit chain's head outside the database (accountability.audit_head)
DEADLINES = "quorum:deadlines"  # timers due later (broker.deadlines): sorted set scored by due epoch second
INTAKE_GROUP = "quorum-gateway"


def intake_stream(agency: str) -> str:
    return f"{INTAKE_STREAM_PREFIX}{agency}"


def results_stream(agency: str) -> str:
    return f"quorum:results:{agency}"


def result_key(agency: str, request_id: str) -> str:
    """The published result of one request, kept for ``result_ttl_s`` (lookup and idempotency)."""
    return f"quorum:result:{agency}:{request_id}"


def result_object(agency: str, request_id: str) -> str:
    """Where a published result is kept in the object store once Redis has let it go (``result_hold_s``)."""
    return f"results/{agency}/{request_id}.json"


def request_key(agency: str, request_id: str) -> str:
    """Claimed by the gateway for a request id: the stream entry that carried it first."""
    return f"quorum:request:{agency}:{request_id}"


def job_key(request_id: str) -> str:
    """A search in flight: agency, case, probe key, face, expected engines, timings."""
    return f"quorum:job:{request_id}"


def job_results_key(request_id: str) -> str:
    """Hash engine -> EngineResult JSON for a search in flight."""
    return f"quorum:job:{request_id}:engines"


def answer_lock(request_id: str) -> str:
    """Held while one process audits and publishes a request's answer."""
    return f"quorum:job:{request_id}:answering"


def job_published_key(request_id: str) -> str:
    return f"quorum:job:{request_id}:published"


def version_slug(version: str) -> str:
    """An engine version as it appears in key names and object paths: its safe characters (others as
    ``_``, at most 60) and 8 hex digits of its SHA-256, so two versions never share a name."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", version)[:60]
    return f"{safe}-{hashlib.sha256(version.encode()).hexdigest()[:8]}"


def gallery_log(engine: str, version: str, shard: int = 0, shards: int = 1) -> str:
    """Append-only stream of gallery changes for one engine version (or one shard of it: ``shards`` > 1);
    every replica of that index applies it. Two versions of an engine (during a reindex) have two logs,
    each snapshotted and trimmed on its own."""
    base = f"quorum:gallery:log:{engine}@{version_slug(version)}"
    return base if shards == 1 else f"{base}:{shard}of{shards}"


def gallery_dropped(engine: str) -> str:
    """Set of engine versions whose gallery state ``quorum gallery drop-version`` deleted: a worker of such a
    version left running writes no snapshot of it (an add of that version takes it off the set)."""
    return f"quorum:gallery:dropped:{engine}"


def gallery_reshard(engine: str) -> str:
    """Hash of an engine's reshard in progress (``quorum gallery reshard``): ``layout`` ("2:4", the shard
    counts from and to), ``version``, ``started_at``, ``actor``, and ``done:<i>`` per new shard built. While
    it exists every add and expunge of that version is written to both layouts' logs."""
    return f"quorum:gallery:reshard:{engine}"


def gallery_versions(engine: str) -> str:
    """Hash engine version -> templates its logs hold (adds less expunged): the versions present, which
    an expunge writes its removal to, and ``quorum gallery status``'s counts."""
    return f"quorum:gallery:versions:{engine}"


# Hash task name -> how many times it ran past the task time limit (workers.watchdog); the gateway
# exports it as quorum_task_time_limit_exceeded.
TASK_OVERRUNS = "quorum:stats:task_overruns"


def job_overruns_key(request_id: str) -> str:
    """Hash task part (:func:`overrun_part`) -> how often it ran past the task time limit (workers.watchdog)."""
    return f"quorum:job:{request_id}:overruns"


def overrun_part(task: str, engine: str | None = None, shard: int | None = None) -> str:
    """The field of :func:`job_overruns_key` for one task of a probe: ``quorum.engine.search:sface``,
    ``quorum.shard.search:sface:2``."""
    return ":".join(str(p) for p in (task, engine, shard) if p is not None)


def job_vector_key(request_id: str, engine: str) -> str:
    """A sharded engine's embedding of the probe (float32 bytes), read by every shard's search."""
    return f"quorum:job:{request_id}:vector:{engine}"


def job_shards_key(request_id: str, engine: str) -> str:
    """Hash shard number -> that shard's hits (JSON) for a sharded engine's search in flight."""
    return f"quorum:job:{request_id}:shards:{engine}"


def gallery_label_counter(engine: str) -> str:
    return f"quorum:gallery:next_label:{engine}"


def engine_alive(engine: str) -> str:
    """Sorted set of an engine's live workers: member the worker's node name, score the Redis server
    time (seconds) until which its heartbeat holds (workers.serve). Live = a score in the future."""
    return f"quorum:alive:engine:{engine}"


def shard_alive(engine: str, shard: int, shards: int) -> str:
    """Sorted set of one shard's live workers, as :func:`engine_alive`."""
    return f"quorum:alive:shard:{engine}:{shard}of{shards}"


def reindex_alive(engine: str) -> str:
    """Sorted set of an engine's live reindex workers (``quorum worker ENGINE --reindex``), as
    :func:`engine_alive`; the version each embeds with is kept beside it (``broker.liveness.members``),
    which ``quorum gallery reindex`` reads."""
    return f"quorum:alive:reindex:{engine}"


def shard_alive_index(engine: str) -> str:
    """Set of the names of an engine's shard liveness sets (:func:`shard_alive`, any shard count): each
    shard worker's heartbeat adds its own, so ``quorum gallery status`` lists them without a SCAN."""
    return f"quorum:alive:shards:{engine}"


def gallery_enrolled(engine: str) -> str:
    """Set of ``subject|image_key|engine_version`` already enrolled into an engine (enrolment is idempotent)."""
    return f"quorum:gallery:enrolled:{engine}"


def enrol_job_done(job_id: str) -> str:
    """Bitmap of a bulk enrolment's items (by position in its manifest) enrolled in every engine, so a
    restarted enrolment skips them. 1 bit an item: 9 million items take about 1 MB."""
    return f"quorum:enrol:{job_id}:done"


def nonce_key(agency: str, nonce: str) -> str:
    """A signed entry's nonce, kept for twice the signature window (replay refusal)."""
    return f"quorum:nonce:{agency}:{nonce}"


def quota_key(agency: str, day: str) -> str:
    """Searches accepted for an agency on a UTC day (``YYYYMMDD``)."""
    return f"quorum:quota:{agency}:{day}"


# Sorted set of the running gateways (member: consumer name), as :func:`engine_alive` (``broker.liveness``):
# ``quorum status`` and the local stack ask it with one ZCOUNT.
GATEWAY_ALIVE = "quorum:alive:gateway"


GALLERY_SUBJECTS = "quorum:gallery:subjects"  # hash subject id -> JSON {images: [...], enrolled_at}
REJECTED_STREAM = "quorum:rejected"  # every refused message, for the operators
# Hash: the digest of the agency users last pushed to (or found in) Redis's ACL, when, at which registry
# version (accountability.registry.mark_redis_acl); the gateway compares it with the registry's.
REDIS_ACL_APPLIED = "quorum:acl:applied"


def review_token(token_sha256: str) -> str:
    """A one-time sign-in token for ``quorum review`` (its SHA-256, never the token): the user id, with a TTL."""
    return f"quorum:review:token:{token_sha256}"


def review_session(session_sha256: str) -> str:
    """A signed-in ``quorum review`` session (SHA-256 of the cookie value): user id and form token, with a TTL."""
    return f"quorum:review:session:{session_sha256}"
