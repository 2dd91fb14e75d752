"""The versions an engine's gallery holds, who serves them, and dropping one no worker runs any more
(the rest of an engine upgrade: README "Upgrading an engine: reindex")."""

from __future__ import annotations

import json

import structlog

from ..accountability import audit
from ..broker import keys, liveness
from ..broker.app import TASK_SNAPSHOT
from ..broker.redis_errors import connect
from ..core.config import Settings
from ..core.errors import InputError
from ..core.objectstore import ObjectStore
from ..workers.replica import snapshot_prefix

log = structlog.get_logger()


class GalleryRefused(Exception):
    """A gallery operation the operator must set up first (no reindex worker, a version still served);
    the CLI prints its message."""


def live_versions(r, kind: str, engine: str) -> dict[str, str]:
    """Live workers of one kind (``engine``, ``shard``, ``reindex``) for an engine: node -> the engine
    version it runs (from its heartbeat)."""
    if kind == "shard":
        sets = liveness.indexed_sets(r, keys.shard_alive_index(engine))
    else:
        sets = [keys.engine_alive(engine) if kind == "engine" else keys.reindex_alive(engine)]
    out: dict[str, str] = {}
    for key in sets:
        out.update(liveness.members(r, key))
    return out


def gallery_items(r) -> list[tuple[str, str]]:
    """Every enrolled image: (subject, image key), sorted (what a reindex embeds)."""
    items = []
    for subject, raw in r.hscan_iter(keys.GALLERY_SUBJECTS, count=1000):
        for key in json.loads(raw).get("images", []):
            items.append((keys.as_str(subject), key))
    return sorted(items)


def snapshot_version(app, engine: str, shards: int, queue: str, *, wait: bool, timeout: float = 1800.0) -> list[dict]:
    """Ask the workers on ``queue`` (a reindex queue: the version they run) to snapshot every shard of
    ``engine``; with ``wait``, the pointers written."""
    sent = [app.send_task(TASK_SNAPSHOT, kwargs={"engines": [engine], "shard": i}, queue=queue) for i in range(shards)]
    if not wait:
        return []
    return [p for res in sent for p in res.get(timeout=timeout)["snapshots"]]


def gallery_status(s: Settings, store: ObjectStore) -> list[dict]:
    """Per engine: the versions its gallery holds (templates counted at enrolment and expunge; each
    shard's newest snapshot), and the versions its live workers run (searching, per shard, reindexing)."""
    r = connect(s.redis_url)
    out = []
    for engine in s.engines:
        shards = s.shards_of(engine)
        counts = {keys.as_str(v): int(n) for v, n in r.hgetall(keys.gallery_versions(engine)).items()}
        serving = {kind: live_versions(r, kind, engine) for kind in ("engine", "shard", "reindex")}
        versions = []
        for version in sorted(set(counts) | {v for w in serving.values() for v in w.values()}):
            snaps = []
            for i in range(shards):
                try:
                    p = json.loads(store.get(snapshot_prefix(engine, version, i, shards) + "/latest.json"))
                    snaps.append({"shard": i, "templates": p["templates"], "created_at": p["created_at"]})
                except InputError:
                    pass
            versions.append(
                {
                    "version": version,
                    "templates": counts.get(version, 0),
                    "log_entries": sum(r.xlen(keys.gallery_log(engine, version, i, shards)) for i in range(shards)),
                    "snapshots": snaps,
                    "searching_workers": sum(v == version for v in serving["engine"].values()),
                    "shard_workers": sum(v == version for v in serving["shard"].values()),
                    "reindex_workers": sum(v == version for v in serving["reindex"].values()),
                }
            )
        resharding = {keys.as_str(k): keys.as_str(v) for k, v in r.hgetall(keys.gallery_reshard(engine)).items()}
        out.append({"engine": engine, "shards": shards, "versions": versions, "reshard": resharding or None})
    return out


def drop_version(s: Settings, store: ObjectStore, engine: str, version: str, *, actor: str = "operator") -> dict:
    """Delete an engine version's gallery state once no worker runs it: its logs, snapshots and pointers,
    its members of ``keys.gallery_enrolled`` and its count (audited as ``gallery.drop_version``)."""
    r = connect(s.redis_url)
    users = {
        k: n
        for k, w in ((k, live_versions(r, k, engine)) for k in ("engine", "shard", "reindex"))
        for n, v in w.items()
        if v == version
    }
    if users:
        raise GalleryRefused(f"{engine} {version} still has live workers ({sorted(users)}): stop them first")
    shards = s.shards_of(engine)
    audit.record(
        s,
        audit.AuditEvent(
            action=audit.GALLERY_DROP_VERSION, outcome="ok", actor=actor, details={"engine": engine, "version": version}
        ),
    )
    logs = [keys.gallery_log(engine, version, i, shards) for i in range(shards)]
    deleted = r.delete(*logs)
    objects = store.list(snapshot_prefix(engine, version) + "/")
    for key in objects:
        store.delete(key)
    done_key = keys.gallery_enrolled(engine)
    members = 0
    batch: list = []
    for m in r.sscan_iter(done_key, match=f"*|{version}", count=1000):
        if keys.as_str(m).rsplit("|", 1)[-1] == version:
            batch.append(m)
        if len(batch) >= 1000:
            members += r.srem(done_key, *batch)
            batch = []
    if batch:
        members += r.srem(done_key, *batch)
    pipe = r.pipeline(transaction=True)
    pipe.hdel(keys.gallery_versions(engine), version)
    pipe.sadd(keys.gallery_dropped(engine), version)  # a worker of it left running writes no snapshot
    pipe.execute()
    log.info("gallery.version_dropped", engine=engine, version=version, logs=deleted, objects=len(objects))
    return {
        "engine": engine,
        "version": version,
        "logs_deleted": deleted,
        "objects_deleted": len(objects),
        "templates": members,
    }
