"""Resharding (``quorum gallery reshard ENGINE --shards N``): a new shard layout of an engine's gallery
built from the templates it holds (snapshots and logs, never the images: nothing is embedded again),
while the old layout keeps serving; then the workers switch, the way ``reindex`` does for versions.

1. **begin**: the engine's reshard hash (``keys.gallery_reshard``) names the two layouts and the engine
   version. From then on every add and every expunge of that version is written to both layouts' logs
   (``workers.replica.log_add_entries`` checks the hash in the same Lua script that writes; an expunge
   reads it after deleting the subject's record).
2. **build**, one new shard at a time (resumable: a shard built is marked in the hash and skipped by a
   rerun): each old shard's replica is loaded (its snapshot, then its log), the templates of subjects
   that belong to the new shard and still have their record are copied, with their labels, into a new
   index; then the new shard's own log (the adds and expunges written to both layouts since step 1) is
   applied on top, and the result saved as the new shard's snapshot. Memory: one old and one new shard.
3. **switch**: the operator sets ``QUORUM_SHARDS`` to the new count and restarts the engine's workers
   (and starts the new shards' workers); they load the new snapshots and follow the new logs, which
   every write has kept current.
4. **finish** (``--finish``): once no worker serves the old layout, the hash goes (writes go to one
   layout again) and the old layout's logs and snapshots are deleted. ``--abort`` instead deletes the
   new layout and keeps the old one.

Refused, changing nothing: a count below 1, the count the engine has, an unknown engine, an engine
being reindexed (live reindex workers, or more than one version in its gallery), and a second reshard
of the same engine to another count while one runs. Audited (``gallery.reshard``) at each step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

from ..accountability import audit
from ..broker import keys, liveness
from ..broker.redis_errors import connect
from ..core.config import Settings
from ..core.objectstore import ObjectStore
from ..workers.replica import GalleryReplica, snapshot_prefix
from ..workers.shards import shard_of
from .versions import GalleryRefused, live_versions

log = structlog.get_logger()


@dataclass
class ReshardReport:
    engine: str
    version: str
    old: int
    new: int
    built: list[dict] = field(default_factory=list)  # per new shard: shard, templates, subjects, seconds
    skipped: list[int] = field(default_factory=list)  # new shards a previous run built already
    dropped_no_record: int = 0  # templates left out: their subject's record is gone (expunged meanwhile)
    seconds: float = 0.0


def _state(r, engine: str) -> dict[str, str]:
    return {keys.as_str(k): keys.as_str(v) for k, v in r.hgetall(keys.gallery_reshard(engine)).items()}


def _in_progress(r, engine: str, hint: str = "") -> tuple[dict[str, str], int, int]:
    """The reshard in progress: its state and the shard counts from and to; refused when there is none."""
    state = _state(r, engine)
    if not state:
        raise GalleryRefused(f"{engine}: no reshard in progress{hint}")
    old, new = (int(x) for x in state["layout"].split(":"))
    return state, old, new


def _version(r, engine: str) -> str:
    """The one engine version to reshard: refused while a reindex runs or several versions are held."""
    if live_versions(r, "reindex", engine):
        raise GalleryRefused(f"{engine} is being reindexed (reindex workers are running): reshard after it")
    held = sorted(keys.as_str(v) for v, n in r.hgetall(keys.gallery_versions(engine)).items() if int(n) > 0)
    if len(held) != 1:
        what = "no templates" if not held else f"templates of {len(held)} versions ({', '.join(held)})"
        raise GalleryRefused(
            f"{engine} holds {what}: reshard one version (finish the reindex and drop-version the old one)"
        )
    return held[0]


def begin(s: Settings, engine: str, shards: int, *, actor: str = "operator") -> dict[str, str]:
    """Step 1: from now on writes go to both layouts. Idempotent for the same target; refused otherwise."""
    if engine not in s.engines:
        raise GalleryRefused(f"{engine} is not a configured engine ({', '.join(s.engines)})")
    if shards < 1:
        raise GalleryRefused(f"--shards {shards}: an engine has at least 1 shard")
    old = s.shards_of(engine)
    r = connect(s.redis_url)
    state = _state(r, engine)
    if state:
        if state["layout"] == f"{old}:{shards}":
            return state  # resumed
        raise GalleryRefused(
            f"{engine}: a reshard {state['layout'].replace(':', ' -> ')} is in progress; finish or abort it first"
        )
    if shards == old:
        raise GalleryRefused(f"{engine} has {old} shard(s) already (QUORUM_SHARDS): nothing to do")
    version = _version(r, engine)
    state = {"layout": f"{old}:{shards}", "version": version, "started_at": f"{time.time():.3f}", "actor": actor}
    if not r.hsetnx(keys.gallery_reshard(engine), "layout", state["layout"]):
        raise GalleryRefused(f"{engine}: another reshard began at the same moment; run the command again")
    fields: dict[Any, Any] = dict(state)
    r.hset(keys.gallery_reshard(engine), mapping=fields)
    details = {"engine": engine, "version": version, "from": old, "to": shards}
    audit.record(s, audit.AuditEvent(action=audit.GALLERY_RESHARD, outcome="started", actor=actor, details=details))
    log.info("gallery.reshard_started", **details)
    return state


def build(
    s: Settings,
    store: ObjectStore,
    engine: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    actor: str = "operator",
) -> ReshardReport:
    """Step 2: build every new shard not built yet, from the old layout's snapshots and logs."""
    r = connect(s.redis_url)
    state, old, new = _in_progress(r, engine, f" (quorum gallery reshard {engine} --shards N)")
    report = ReshardReport(engine, state["version"], old, new)
    t0 = time.monotonic()
    for j in range(new):
        if state.get(f"done:{j}"):
            report.skipped.append(j)
        else:
            report.built.append(_build_shard(s, store, r, report, j))
            r.hset(keys.gallery_reshard(engine), f"done:{j}", json.dumps(report.built[-1]))
        if progress:
            progress(j + 1, new)
    report.seconds = time.monotonic() - t0
    details = {"engine": engine, "version": report.version, "from": old, "to": new, "built": report.built}
    details |= {"skipped": report.skipped, "dropped_no_record": report.dropped_no_record}
    audit.record(s, audit.AuditEvent(action=audit.GALLERY_RESHARD, outcome="built", actor=actor, details=details))
    log.info("gallery.reshard_built", **details, seconds=round(report.seconds, 1))
    return report


def _replica(s: Settings, r, store: ObjectStore, engine: str, version: str, shard: int, shards: int, dim: int):
    return GalleryReplica.for_settings(s, engine, version, dim, r, store, shard=shard, shards=shards)


def _old_templates(s, store, r, report: ReshardReport, j: int) -> Iterator[tuple[list[int], list[str], np.ndarray]]:
    """Per old shard: the templates (labels, subjects, vectors) that belong to new shard ``j``."""
    for i in range(report.old):
        rep = _replica(s, r, store, report.engine, report.version, i, report.old, _dim(r, store, report, i))
        rep.load_snapshot()
        rep.sync()
        labels, subjects = rep.index.templates_of(lambda subject: shard_of(subject, report.new) == j)
        if labels:
            yield labels, subjects, rep.index.vectors(labels)


def _build_shard(s: Settings, store: ObjectStore, r, report: ReshardReport, j: int) -> dict:
    t0 = time.monotonic()
    dim = _dim(r, store, report, 0)
    target = _replica(s, r, store, report.engine, report.version, j, report.new, dim)
    for labels, subjects, vectors in _old_templates(s, store, r, report, j):
        # A subject expunged since the old replica's log was read has no record: its removal may have gone
        # to the old layout only (an expunge that looked before the reshard began), so it is not copied.
        recorded = r.hmget(keys.GALLERY_SUBJECTS, subjects)
        keep = [k for k, rec in enumerate(recorded) if rec is not None]
        report.dropped_no_record += len(labels) - len(keep)
        if keep:
            target.index.add([labels[k] for k in keep], [subjects[k] for k in keep], vectors[keep])
    # The new shard's own log: what was written to both layouts since the reshard began (adds already
    # copied are skipped by label; expunges apply), then its snapshot.
    target.sync()
    pointer = target.save_snapshot()
    return {
        "shard": j,
        "templates": pointer["templates"],
        "subjects": pointer["subjects"],
        "log_id": pointer["log_id"],
        "seconds": round(time.monotonic() - t0, 2),
    }


def _dim(r, store: ObjectStore, report: ReshardReport, shard: int) -> int:
    """The templates' dimension, from an old shard's snapshot or a log entry (the engine's model is
    never loaded to learn it)."""
    for i in [shard, *range(report.old)]:
        prefix = snapshot_prefix(report.engine, report.version, i, report.old)
        if store.size(prefix + "/latest.json") is not None:
            pointer = json.loads(store.get(prefix + "/latest.json"))
            return int(json.loads(store.get(pointer["meta_key"]))["dim"])
        for _, fields in r.xrange(keys.gallery_log(report.engine, report.version, i, report.old), count=100):
            vec = fields.get(b"vec")
            if vec is not None:
                return len(vec) // 4
    raise GalleryRefused(f"{report.engine} {report.version}: no snapshot and no template in the old layout's logs")


def finish(s: Settings, store: ObjectStore, engine: str, *, actor: str = "operator") -> dict:
    """Step 4: writes go to the new layout only; the old layout's logs and snapshots are deleted."""
    r = connect(s.redis_url)
    state, old, new = _in_progress(r, engine)
    missing = [j for j in range(new) if not state.get(f"done:{j}")]
    if missing:
        raise GalleryRefused(f"{engine}: new shard(s) {missing} not built yet: run the reshard again first")
    if s.shards_of(engine) != new:
        raise GalleryRefused(
            f"{engine}: QUORUM_SHARDS gives {s.shards_of(engine)} shard(s): switch the workers to {new} first"
        )
    serving = [n for n, sets in _old_layout_workers(r, engine, old).items() if sets]
    if serving:
        raise GalleryRefused(f"{engine}: workers still serve the old layout ({serving}): restart them first")
    return _drop_layout(s, store, r, engine, state, drop=old, outcome="finished", actor=actor)


def abort(s: Settings, store: ObjectStore, engine: str, *, actor: str = "operator") -> dict:
    """Give the reshard up: the new layout's logs and snapshots are deleted, the old one stays."""
    r = connect(s.redis_url)
    state, old, new = _in_progress(r, engine)
    if s.shards_of(engine) != old:
        raise GalleryRefused(f"{engine}: QUORUM_SHARDS gives {s.shards_of(engine)}: switch the workers back to {old}")
    return _drop_layout(s, store, r, engine, state, drop=new, outcome="aborted", actor=actor)


def _old_layout_workers(r, engine: str, shards: int) -> dict[str, dict[str, str]]:
    if shards == 1:
        return {}  # an unsharded layout's workers are the engine's own: the operator restarts them
    return {f"{i}of{shards}": liveness.members(r, keys.shard_alive(engine, i, shards)) for i in range(shards)}


def _drop_layout(s, store, r, engine: str, state: dict, *, drop: int, outcome: str, actor: str) -> dict:
    version = state["version"]
    r.delete(keys.gallery_reshard(engine))  # writes go to one layout from here on
    logs = [keys.gallery_log(engine, version, i, drop) for i in range(drop)]
    deleted = r.delete(*logs)
    prefixes = (
        [snapshot_prefix(engine, version) + "/latest.json", snapshot_prefix(engine, version) + "/snapshots/"]
        if drop == 1
        else [snapshot_prefix(engine, version, i, drop) + "/" for i in range(drop)]
    )
    objects = [k for p in prefixes for k in (store.list(p) if p.endswith("/") else [p] if store.size(p) else [])]
    for key in objects:
        store.delete(key)
    details = {"engine": engine, "version": version, "layout": state["layout"], "dropped_shards": drop}
    details |= {"logs_deleted": deleted, "objects_deleted": len(objects)}
    audit.record(s, audit.AuditEvent(action=audit.GALLERY_RESHARD, outcome=outcome, actor=actor, details=details))
    log.info(f"gallery.reshard_{outcome}", **details)
    return details
