"""The gallery log, and the replicas that follow it: each an index (``workers.index``) kept in step with the log.

Every change to the gallery is appended to a Redis stream per engine *version*
(``quorum:gallery:log:<engine>@<version slug>``, ``broker.keys.gallery_log``): ``add`` carries a template
(label, subject, embedding), ``remove`` a subject to expunge. Each process that searches an engine holds
a *replica*: it loads the latest snapshot of its version from the object store, then applies that
version's log from the snapshot's position, and before each search applies whatever is new. So any
number of workers per engine serve the same gallery, and a worker that starts late catches up.

Two versions of one engine coexist while ``quorum gallery reindex`` builds the new one from the stored
images: each has its own log, snapshots and trimming, so neither can lose the other's entries. An add
is written only while the subject's record exists (one Lua script: check, append, count), and an
expunge deletes the record before it writes its removal to every version present, so an expunged
subject is never written back by an enrolment or a reindex that was under way.

:class:`~workers.index.GalleryIndex` is the pure part (no Redis, no store).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence

import numpy as np
import structlog

from ..broker.keys import as_str
from .index import GalleryIndex, _vec_from_bytes, _vec_to_bytes

log = structlog.get_logger()


class GalleryReplica:
    """One engine's index kept in step with the gallery log in Redis and snapshots in the store."""

    def __init__(
        self,
        engine: str,
        engine_version: str,
        dim: int,
        redis,
        store,
        *,
        m: int,
        ef_construction: int,
        ef_search: int,
        capacity: int,
        shard: int = 0,
        shards: int = 1,
    ) -> None:
        from ..broker import keys

        self.engine = engine
        self.engine_version = engine_version
        self.dim = dim
        self.redis = redis
        self.store = store
        self.shard, self.shards = shard, shards
        self.log_key = keys.gallery_log(engine, engine_version, shard, shards)
        self.index = GalleryIndex(dim, m=m, ef_construction=ef_construction, ef_search=ef_search, capacity=capacity)
        self.applied_id = "0-0"
        self.skipped_other_version = 0
        self._lock = threading.RLock()  # one catch-up (or snapshot) at a time among a worker's threads

    @classmethod
    def for_settings(
        cls, s, engine: str, engine_version: str, dim: int, redis, store, *, shard: int = 0, shards: int = 1
    ) -> GalleryReplica:
        """A replica with the deployment's HNSW settings (``hnsw_m``, ``hnsw_ef_*``, ``gallery_capacity``)."""
        return cls(
            engine,
            engine_version,
            dim,
            redis,
            store,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            ef_search=s.hnsw_ef_search,
            capacity=s.gallery_capacity,
            shard=shard,
            shards=shards,
        )

    # Snapshots live under gallery/<engine>/<version slug>/ (a shard's under .../shard-<i>of<S>/) with a
    # pointer object naming the newest one: one pointer per engine version and shard.
    @property
    def _prefix(self) -> str:
        return snapshot_prefix(self.engine, self.engine_version, self.shard, self.shards)

    @property
    def _pointer_key(self) -> str:
        return f"{self._prefix}/latest.json"

    @property
    def name(self) -> str:
        """The engine, or ``engine[i/S]`` for one shard of it (logs, metrics)."""
        return self.engine if self.shards == 1 else f"{self.engine}[{self.shard}/{self.shards}]"

    def load_snapshot(self) -> bool:
        from ..core.errors import InputError

        try:
            pointer = json.loads(self.store.get(self._pointer_key))
        except InputError:
            return False
        if pointer.get("engine_version") != self.engine_version:
            log.warning(
                "gallery.snapshot_version_mismatch",
                engine=self.name,
                snapshot=pointer.get("engine_version"),
                ours=self.engine_version,
            )
            return False
        meta = json.loads(self.store.get(pointer["meta_key"]))
        data = self.store.get(pointer["index_key"])
        self.index = GalleryIndex.from_bytes(data, meta)
        self.applied_id = pointer["log_id"]
        log.info("gallery.snapshot_loaded", engine=self.name, templates=len(self.index), log_id=self.applied_id)
        return True

    def save_snapshot(self) -> dict:
        with self._lock:
            return self._save_snapshot()

    def _save_snapshot(self) -> dict:
        from ..broker import keys

        if self.redis.sismember(keys.gallery_dropped(self.engine), self.engine_version):
            raise RuntimeError(
                f"{self.name}: version {self.engine_version} was dropped (quorum gallery drop-version); "
                "no snapshot written: stop this worker, which still runs it"
            )
        self.sync()
        data, meta = self.index.to_bytes()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = f"{self._prefix}/snapshots/{stamp}-{self.applied_id.replace('-', '_')}"
        self.store.put(base + "/index.hnsw", data)
        self.store.put(base + "/meta.json", json.dumps(meta).encode())
        pointer = {
            "engine": self.engine,
            "shard": self.shard,
            "shards": self.shards,
            "engine_version": self.engine_version,
            "index_key": base + "/index.hnsw",
            "meta_key": base + "/meta.json",
            "log_id": self.applied_id,
            "templates": len(self.index),
            "subjects": self.index.subjects,
            "created_at": stamp,
        }
        previous = self._read_pointer()
        self.store.put(self._pointer_key, json.dumps(pointer).encode())
        log.info("gallery.snapshot_saved", engine=self.name, templates=len(self.index), log_id=self.applied_id)
        # The log before the *previous* snapshot is no longer needed by anyone: a starting replica
        # loads this snapshot, and a running one that fell behind it notices the gap and reloads.
        # Keeping one generation of overlap spares replicas that are merely a little behind.
        if previous and previous.get("engine_version") == self.engine_version and previous["log_id"] != "0-0":
            trimmed = self.redis.xtrim(self.log_key, minid=previous["log_id"], approximate=False)
            log.info("gallery.log_trimmed", engine=self.name, entries=trimmed, before=previous["log_id"])
        return pointer

    def _read_pointer(self) -> dict | None:
        from ..core.errors import InputError

        try:
            return json.loads(self.store.get(self._pointer_key))
        except InputError:
            return None

    def _missed_entries(self) -> bool:
        """True when the log was trimmed past what this replica has applied (it fell too far behind)."""
        if not self.redis.exists(self.log_key):
            return False
        info = self.redis.xinfo_stream(self.log_key)
        first = info.get("first-entry")
        # Entries are only ever removed by trimming from the front (never XDEL), so: something was
        # trimmed, and the oldest entry left is newer than the last one this replica applied.
        trimmed = int(info.get("entries-added", 0)) > int(info.get("length", 0))
        return bool(trimmed and first and _id_tuple(as_str(first[0])) > _id_tuple(self.applied_id))

    def sync(self, batch: int = 5000) -> int:
        """Apply every log entry after the last one applied. Returns how many entries were read."""
        with self._lock:
            return self._sync(batch)

    def _sync(self, batch: int) -> int:
        total = 0
        if self._missed_entries():
            log.warning("gallery.replica_behind_trimmed_log", engine=self.name, applied=self.applied_id)
            if not self.load_snapshot():
                raise RuntimeError(f"{self.name}: the gallery log was trimmed but no snapshot can be loaded")
        while True:
            resp = self.redis.xread({self.log_key: self.applied_id}, count=batch)
            if not resp:
                return total
            entries = resp[0][1]
            self._apply(entries)
            total += len(entries)
            self.applied_id = as_str(entries[-1][0])
            if len(entries) < batch:
                return total

    def _apply(self, entries: Iterable[tuple]) -> None:
        labels: list[int] = []
        subjects: list[str] = []
        vecs: list[np.ndarray] = []

        def flush() -> None:
            if labels:
                self.index.add(labels, subjects, np.stack(vecs))
                labels.clear()
                subjects.clear()
                vecs.clear()

        for _entry_id, fields in entries:
            f = {as_str(k): v for k, v in fields.items()}
            op = as_str(f["op"])
            if op == "add":
                if as_str(f["version"]) != self.engine_version:
                    self.skipped_other_version += 1
                    continue
                labels.append(int(f["label"]))
                subjects.append(as_str(f["subject"]))
                vecs.append(_vec_from_bytes(f["vec"], self.dim))
            elif op == "remove":
                flush()
                self.index.remove_subject(as_str(f["subject"]))
        flush()


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def snapshot_prefix(engine: str, version: str, shard: int = 0, shards: int = 1) -> str:
    """Where one engine version's (one shard's) snapshots and their pointer ``latest.json`` live."""
    from ..broker.keys import version_slug

    base = f"gallery/{engine}/{version_slug(version)}"
    return base if shards == 1 else f"{base}/shard-{shard}of{shards}"


def enrolled_member(subject: str, image_key: str, version: str) -> str:
    """A template's member of ``keys.gallery_enrolled``: enrolment and reindex skip what is there."""
    return f"{subject}|{image_key}|{version}"


# The conditional add, atomic in Redis: for each template whose subject still has its record (an
# expunge deletes the record first), append it to its log (to each layout's log while a reshard runs),
# mark it enrolled, and count it for its version (and take it off the dropped versions, if it was
# there). KEYS: subjects hash, enrolled set, versions hash, dropped set, the engine's reshard hash, then
# L log keys per template. ARGV: version, L, the reshard layout the caller saw ("" for none), then
# label, subject, image, member, vector per template. Returns the labels written, or the error
# RESHARD_CHANGED when a reshard began or ended since the caller looked (it looks again).
_ADD_SCRIPT = """
local seen = redis.call('HGET', KEYS[5], 'layout') or ''
if seen ~= ARGV[3] then
  return redis.error_reply('RESHARD_CHANGED')
end
local per = tonumber(ARGV[2])
local out = {}
local n = 0
local t = 0
for a = 4, #ARGV, 5 do
  local subject = ARGV[a + 1]
  if redis.call('HEXISTS', KEYS[1], subject) == 1 then
    for l = 1, per do
      redis.call('XADD', KEYS[5 + t * per + l], '*', 'op', 'add', 'label', ARGV[a], 'subject', subject,
                 'version', ARGV[1], 'image', ARGV[a + 2], 'vec', ARGV[a + 4])
    end
    redis.call('SADD', KEYS[2], ARGV[a + 3])
    n = n + 1
    out[n] = ARGV[a]
  end
  t = t + 1
end
redis.call('HINCRBY', KEYS[3], ARGV[1], n)
if n > 0 then
  redis.call('SREM', KEYS[4], ARGV[1])
end
return out
"""


def reshard_layouts(redis, engine: str, engine_version: str, shards: int) -> tuple[str, tuple[int, ...]]:
    """The shard counts an add or removal of ``engine_version`` is written for: the caller's ``shards``,
    and while a reshard of that version runs (``keys.gallery_reshard``) both of its layouts; with the
    reshard's ``layout`` field as read ("" for none)."""
    from ..broker import keys

    layout, version = (
        as_str(x) if x is not None else "" for x in redis.hmget(keys.gallery_reshard(engine), ["layout", "version"])
    )
    counts = {shards}
    if layout and version == engine_version:
        counts |= {int(x) for x in layout.split(":")}
    return layout, tuple(sorted(counts))


def log_add_entries(
    redis,
    engine: str,
    engine_version: str,
    subjects: Sequence[str],
    vectors: np.ndarray,
    images: Sequence[str],
    *,
    shards: int = 1,
) -> list[int]:
    """Append templates to an engine version's gallery log (each to its subject's shard's log when the
    engine has ``shards`` > 1; to both layouts' logs while a reshard runs) and mark them in
    ``keys.gallery_enrolled``; labels come from one atomic counter per engine, unique across its shards,
    layouts and versions.

    Only templates whose subject is recorded (``keys.GALLERY_SUBJECTS``) are written, checked and written
    in one Lua script: a subject expunged while its images were being embedded is not written back.
    Returns the labels written (those of expunged subjects are left out)."""
    from ..broker import keys

    n = len(subjects)
    if n == 0:
        return []
    last = redis.incrby(keys.gallery_label_counter(engine), n)
    labels = list(range(last - n + 1, last + 1))
    args: list = []
    for lab, subj, vec, img in zip(labels, subjects, vectors, images, strict=True):
        args += [lab, subj, img, enrolled_member(subj, img, engine_version), _vec_to_bytes(vec)]
    state = [keys.GALLERY_SUBJECTS, keys.gallery_enrolled(engine), keys.gallery_versions(engine)]
    state += [keys.gallery_dropped(engine), keys.gallery_reshard(engine)]
    script = redis.register_script(_ADD_SCRIPT)  # EVALSHA: the script's text is sent once per server
    for _ in range(3):  # a reshard that begins or ends between the look and the script: look again
        layout, counts = reshard_layouts(redis, engine, engine_version, shards)
        logs = [_log_of(engine, engine_version, subj, c) for subj in subjects for c in counts]
        try:
            written = script(keys=[*state, *logs], args=[engine_version, len(counts), layout, *args])
            return [int(x) for x in written]
        except Exception as exc:  # redis.ResponseError, not imported here
            if "RESHARD_CHANGED" not in str(exc):
                raise
    raise RuntimeError(f"{engine}: the reshard state kept changing while templates were being written")


def _log_of(engine: str, version: str, subject: str, shards: int) -> str:
    from ..broker import keys
    from .shards import shard_of

    return keys.gallery_log(engine, version, shard_of(subject, shards), shards)


def log_remove(redis, engine: str, subject: str, reason: str, *, shards: int = 1, versions: Iterable[str] = ()) -> int:
    """Expunge a subject from an engine: a ``remove`` entry in the log of the shard that holds it, in
    every version of the engine present (``keys.gallery_versions``) and in ``versions``. Its members of
    ``keys.gallery_enrolled`` go, and each version's count drops by those it had. Returns how many
    templates that was. Call it after the subject's record is deleted (as ``gallery.expunge.expunge``
    does), so no add can follow it."""
    from ..broker import keys

    present = {as_str(v) for v in redis.hkeys(keys.gallery_versions(engine))} | set(versions)
    done_key = keys.gallery_enrolled(engine)
    stale = [m for m in redis.sscan_iter(done_key, match=f"{subject}|*") if as_str(m).split("|", 1)[0] == subject]
    per_version: dict[str, int] = {}
    for m in stale:
        version = as_str(m).rsplit("|", 1)[-1]
        per_version[version] = per_version.get(version, 0) + 1
    pipe = redis.pipeline(transaction=True)
    # The reshard state is read after the subject's record is gone (the caller deleted it): a reshard that
    # began before this look gets the removal in both layouts, one that begins after it copies no template
    # of the subject (gallery.reshard checks the records).
    for version in sorted(present | set(per_version)):
        for count in reshard_layouts(redis, engine, version, shards)[1]:
            pipe.xadd(_log_of(engine, version, subject, count), {"op": "remove", "subject": subject, "reason": reason})
        if per_version.get(version):
            pipe.hincrby(keys.gallery_versions(engine), version, -per_version[version])
    if stale:
        pipe.srem(done_key, *stale)
    pipe.execute()
    return len(stale)


def migrate_unversioned(redis, store, engine: str, shards: int = 1) -> dict:
    """Move an engine's gallery state written before it was kept per engine version (the log
    ``quorum:gallery:log:<engine>[:<i>of<S>]``, the pointer ``gallery/<engine>/[shard-<i>of<S>/]latest.json``)
    to the names of its version, and count its templates per version; once, when upgrading Quorum to the
    release that keys gallery state by version (``quorum gallery migrate-keys``), before its workers start.

    Each shard's version is its pointer's (the snapshot its workers loaded), or else that of the newest
    add in its log. Idempotent: what has been moved is not there to move again. Snapshot objects stay
    where they are (the pointer names them)."""
    from ..broker import keys
    from ..core.errors import InputError

    moved: dict = {"engine": engine, "logs": {}, "pointers": {}, "counts": {}}
    for i in range(shards):
        legacy_log = f"quorum:gallery:log:{engine}" if shards == 1 else f"quorum:gallery:log:{engine}:{i}of{shards}"
        legacy_dir = f"gallery/{engine}" if shards == 1 else f"gallery/{engine}/shard-{i}of{shards}"
        try:
            pointer = json.loads(store.get(f"{legacy_dir}/latest.json"))
        except InputError:
            pointer = None
        version = (pointer or {}).get("engine_version") or _newest_add_version(redis, legacy_log)
        if version is None:
            continue
        if redis.exists(legacy_log):
            new_log = keys.gallery_log(engine, version, i, shards)
            if redis.exists(new_log):
                raise RuntimeError(f"{engine}: both {legacy_log} and {new_log} exist; merge them by hand")
            redis.rename(legacy_log, new_log)
            moved["logs"][legacy_log] = new_log
        new_pointer = f"{snapshot_prefix(engine, version, i, shards)}/latest.json"
        if pointer is not None and store.size(new_pointer) is None:
            store.put(new_pointer, json.dumps(pointer).encode())
            store.delete(f"{legacy_dir}/latest.json")
            moved["pointers"][f"{legacy_dir}/latest.json"] = new_pointer
    if not redis.exists(keys.gallery_versions(engine)):
        counts: dict[str, int] = {}
        for m in redis.sscan_iter(keys.gallery_enrolled(engine), count=1000):
            version = as_str(m).rsplit("|", 1)[-1]
            counts[version] = counts.get(version, 0) + 1
        if counts:
            redis.hset(keys.gallery_versions(engine), mapping=counts)
        moved["counts"] = counts
    return moved


def _newest_add_version(redis, log_key: str) -> str | None:
    """The version of the newest ``add`` in a log (None: no add in it)."""
    last = "+"
    while True:
        entries = redis.xrevrange(log_key, max=last, count=500)
        for _entry_id, fields in entries:
            f = {as_str(k): v for k, v in fields.items()}
            if as_str(f.get("op", b"")) == "add":
                return as_str(f["version"])
        if len(entries) < 500:
            return None
        last = "(" + as_str(entries[-1][0])
