"""Gallery administration from the operator's side: enrol a folder or a manifest, expunge a subject,
reindex an engine for a new version.

Enrolment uploads each image to the object store under ``gallery/<sha256>`` (or takes an object the
booking system stored), records the subject, and sends batches to the ``enrol`` queue: an intake
worker finds each face once and sends it to every engine's enrolment (``quorum.engine.enrol``); the
engine workers embed the faces and append templates to each engine's gallery log (its subject's shard's
log, for a sharded engine), which every replica applies. A rerun of the same items resumes.

Reindex (:func:`reindex`, ``quorum gallery reindex``) rebuilds one engine's templates from the stored images
for the engine version its reindex workers run, into that version's own logs, reusing enrolment's
resumable batch loop (:func:`run_batches`); :func:`gallery_status` and :func:`drop_version` are the rest of
an engine upgrade (README "Upgrading an engine: reindex").

All are audited (``accountability.audit``: ``gallery.enrol``, ``gallery.expunge``, ``gallery.reindex``,
``gallery.drop_version``). A probe image is never enrolled: an image whose SHA-256 names a stored probe
(``probes/<sha256>``) or any probe ever submitted (the audit trail) stops the enrolment with
``PROBE_ENROL_REFUSED``, audited, before anything of its batch is stored (earlier batches stay enrolled;
a rerun without the probe resumes after them).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis as redis_lib
import structlog

from ..accountability import audit, db
from ..broker import keys
from ..broker.app import make_app
from ..core.config import Settings
from ..core.errors import Code, InputError
from ..core.objectstore import ObjectStore, put_content

log = structlog.get_logger()

T = TypeVar("T")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class EnrolReport:
    images: int = 0
    enrolled: dict[str, int] = field(default_factory=dict)  # engine -> templates added
    failed: dict[str, list[dict]] = field(default_factory=dict)  # engine -> [{subject_id, image_key, code}]
    seconds: float = 0.0
    skipped: int = 0  # items a previous run of the same job enrolled already
    detected_in_engine: int = 0  # faces an engine had to find itself (0: each found once, for all engines)
    snapshots: int = 0
    job_id: str = ""


@dataclass(frozen=True)
class EnrolItem:
    """One gallery image to enrol: a file to upload, or an object already in the store."""

    subject_id: str
    path: Path | None = None
    key: str | None = None  # an object key in the store (a booking system that uploads its own photos)
    booking_date: str | None = None  # YYYY-MM-DD, kept with the subject's record (the sheet shows newest first)
    booking_number: str | None = None  # the booking system's number for this photo, shown on the sheet

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"key:{self.key}"


def folder_items(root: Path) -> list[tuple[str, Path]]:
    """``<root>/<subject>/<image>`` -> [(subject, path)], sorted."""
    items = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for img in sorted(subject_dir.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                items.append((subject_dir.name, img))
    return items


MANIFEST_COLUMNS = ("subject_id", "image")


def manifest_items(path: Path) -> list[EnrolItem]:
    """A booking system's manifest: CSV with a header ``subject_id,image[,booking_date][,booking_number]``
    (never demographic labels: they would not be read). ``image`` is a
    file path (relative to the manifest's folder) or ``key:<object key>`` for an image already in the
    store. Raises ``INVALID_MESSAGE`` naming the line of the first malformed row."""
    import csv
    import datetime as dt

    items: list[EnrolItem] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(
                Code.INVALID_MESSAGE, f"{path}: the header must name {', '.join(MANIFEST_COLUMNS)}; missing {missing}"
            )
        for line, row in enumerate(reader, start=2):
            subject = (row.get("subject_id") or "").strip()
            image = (row.get("image") or "").strip()
            booking = (row.get("booking_date") or "").strip() or None
            number = (row.get("booking_number") or "").strip() or None
            if number is not None and (len(number) > 64 or not number.isprintable()):
                raise InputError(
                    Code.INVALID_MESSAGE, f"{path}:{line}: booking_number must be 1-64 printable characters"
                )
            if not subject or not image:
                raise InputError(Code.INVALID_MESSAGE, f"{path}:{line}: subject_id and image are both needed")
            if booking is not None:
                try:
                    dt.date.fromisoformat(booking)
                except ValueError as exc:
                    raise InputError(
                        Code.INVALID_MESSAGE, f"{path}:{line}: booking_date {booking!r} is not YYYY-MM-DD"
                    ) from exc
            if image.startswith("key:"):
                items.append(EnrolItem(subject, key=image[4:], booking_date=booking, booking_number=number))
            else:
                file = Path(image) if Path(image).is_absolute() else path.parent / image
                items.append(EnrolItem(subject, path=file, booking_date=booking, booking_number=number))
    return items


def enrol_job_id(items: list[EnrolItem], engines: Iterable[str]) -> str:
    """The same list of items for the same engines is the same job: a rerun resumes it."""
    h = hashlib.sha256(",".join(engines).encode())
    for it in items:
        h.update(f"\n{it.subject_id}|{it.source}".encode())
    return h.hexdigest()[:32]


def refuse_probes(s: Settings, store: ObjectStore, images: list[tuple[str, bytes]], *, actor: str) -> None:
    """Raise ``PROBE_ENROL_REFUSED`` (audited) if any image is a probe, stored or ever submitted."""
    eng = db.get_engine(s)
    probes = []
    for subject, data in images:
        sha = hashlib.sha256(data).hexdigest()
        if store.size(f"probes/{sha}") is not None or audit.is_known_probe(eng, sha):
            probes.append({"subject_id": subject, "sha256": sha})
    if probes:
        audit.append(
            eng,
            audit.AuditEvent(
                action=audit.GALLERY_ENROL,
                outcome="refused",
                code=Code.PROBE_ENROL_REFUSED.value,
                actor=actor,
                probe_sha256=probes[0]["sha256"],
                details={"probes": probes[:100]},
            ),
        )
        raise InputError(
            Code.PROBE_ENROL_REFUSED, f"{len(probes)} image(s) are probe images and may never be enrolled: {probes[:3]}"
        )


def run_batches(
    r,
    job: str,
    todo: Sequence[T],
    *,
    dispatch: Callable[[list[tuple[int, T]]], dict[str, Any]],
    absorb: Callable[[str, dict], None],
    batch: int,
    window: int,
    deadline: float,
    progress: Callable[[int, int], None] | None = None,
    snapshot: Callable[[], None] | None = None,
    snapshot_every: int = 0,
    final_snapshot: bool = True,
) -> tuple[int, int]:
    """The resumable batch loop of bulk enrolment and reindex: ``todo`` in batches of ``batch``, at most
    ``window`` in flight. A batch whose every task answered is marked in the job's Redis bitmap
    (``keys.enrol_job_done``, 1 bit an item, by position), and a rerun of the same job skips it.

    ``dispatch(chunk)`` sends a batch (``[(position, item)]``, the items not done yet) and returns its
    Celery results by name; ``absorb(name, answer)`` takes each answer. ``snapshot()`` is called after
    about every ``snapshot_every`` items finished and, with ``final_snapshot``, at the end (if any
    finished). Returns (items
    skipped as done by an earlier run, items finished now)."""
    from collections import deque

    done_key = keys.enrol_job_done(job)
    inflight: deque[tuple[list[int], dict[str, Any]]] = deque()
    skipped = finished = since_snapshot = snapshots = 0

    def collect() -> None:
        nonlocal finished, since_snapshot, snapshots
        positions, results = inflight.popleft()
        for name, res in results.items():
            absorb(name, res.get(timeout=max(1.0, deadline - time.monotonic()), propagate=True))
            res.forget()
        pipe = r.pipeline()
        for pos in positions:
            pipe.setbit(done_key, pos, 1)
        pipe.expire(done_key, 30 * 24 * 3600)
        pipe.execute()
        finished += len(positions)
        since_snapshot += len(positions)
        if snapshot and snapshot_every and since_snapshot >= snapshot_every:
            snapshot()
            snapshots += 1
            since_snapshot = 0
        if progress:
            progress(skipped + finished, len(todo))

    for start in range(0, len(todo), batch):
        whole = list(enumerate(todo[start : start + batch], start=start))
        pipe = r.pipeline()
        for pos, _ in whole:
            pipe.getbit(done_key, pos)
        done_bits = pipe.execute()
        chunk = [(pos, it) for (pos, it), bit in zip(whole, done_bits, strict=True) if not bit]
        skipped += len(whole) - len(chunk)
        if not chunk:
            if progress:
                progress(skipped + finished, len(todo))
            continue
        inflight.append(([pos for pos, _ in chunk], dispatch(chunk)))
        while len(inflight) >= window:
            collect()
    while inflight:
        collect()
    if snapshot and final_snapshot and (since_snapshot or snapshots == 0) and finished:
        snapshot()
    return skipped, finished


def enrol(
    s: Settings,
    store: ObjectStore,
    items: Iterable[tuple[str, Path] | EnrolItem],
    *,
    batch: int = 16,
    timeout: float = 3600.0,
    progress: Callable[[int, int], None] | None = None,
    actor: str = "operator",
    window: int = 32,
    snapshot_every: int = 0,
) -> EnrolReport:
    """Enrol gallery images into every configured engine, through the workers.

    Streams the items in batches (no more than ``window`` batches in flight, so memory stays flat for a
    manifest of millions): each batch is checked against probe images, uploaded (content-addressed:
    an image already stored is not sent again), recorded with its subjects, and sent to the enrolment
    queue, where an intake worker finds each face once and hands it to every engine's enrolment.
    Resumable: a batch enrolled in every engine is marked in a Redis bitmap for this job (the same items
    for the same engines, :func:`enrol_job_id`), and a rerun skips it; engines skip templates they hold.
    ``snapshot_every``: ask the gallery worker for a snapshot (which trims the logs) after about this many
    images (0: never; the CLI's default is 100,000) and at the end.
    """
    from celery.result import AsyncResult

    from ..broker.app import ENROL_QUEUE, GALLERY_QUEUE, TASK_ENROL_DETECT, TASK_SNAPSHOT

    t0 = time.monotonic()
    r = redis_lib.Redis.from_url(s.redis_url)
    app = make_app(s.redis_url)
    todo = [it if isinstance(it, EnrolItem) else EnrolItem(it[0], path=Path(it[1])) for it in items]
    engines = list(s.engines)
    job = enrol_job_id(todo, engines)
    report = EnrolReport(images=len(todo), job_id=job)
    subjects_seen: set[str] = set()

    def dispatch(chunk: list[tuple[int, EnrolItem]]) -> dict[str, AsyncResult]:
        records, _ = _store_batch(s, store, r, chunk, report, actor=actor)
        subjects_seen.update(rec["subject_id"] for rec in records)
        task_ids = {e: uuid.uuid4().hex for e in engines}
        app.send_task(
            TASK_ENROL_DETECT, kwargs={"items": records, "engines": engines, "task_ids": task_ids}, queue=ENROL_QUEUE
        )
        return {e: AsyncResult(task_ids[e], app=app) for e in engines}

    def absorb(engine: str, out: dict) -> None:
        report.enrolled[engine] = report.enrolled.get(engine, 0) + out["enrolled"]
        report.detected_in_engine += out.get("detected_here", 0)
        if out["failed"]:
            report.failed.setdefault(engine, []).extend(out["failed"])

    def snap() -> None:
        app.send_task(TASK_SNAPSHOT, queue=GALLERY_QUEUE)
        report.snapshots += 1

    report.skipped, _ = run_batches(
        r,
        job,
        todo,
        dispatch=dispatch,
        absorb=absorb,
        batch=batch,
        window=window,
        deadline=time.monotonic() + timeout,
        progress=progress,
        snapshot=snap if snapshot_every else None,
        snapshot_every=snapshot_every,
    )
    report.seconds = time.monotonic() - t0
    audit.record(
        s,
        audit.AuditEvent(
            action=audit.GALLERY_ENROL,
            outcome="ok",
            actor=actor,
            details={
                "images": report.images,
                "subjects": len(subjects_seen),
                "enrolled": report.enrolled,
                "failed": {e: len(f) for e, f in report.failed.items()},
                "skipped_as_done": report.skipped,
                "job": job,
                "subject_ids": sorted(subjects_seen)[:1000],
            },
        ),
    )
    log.info(
        "gallery.enrolled",
        images=report.images,
        enrolled=report.enrolled,
        skipped=report.skipped,
        failed={e: len(f) for e, f in report.failed.items()},
        seconds=round(report.seconds, 1),
        images_per_s=round((report.images - report.skipped) / max(report.seconds, 1e-9), 1),
    )
    return report


def _store_batch(
    s: Settings, store: ObjectStore, r, chunk: list[tuple[int, EnrolItem]], report: EnrolReport, *, actor: str
) -> tuple[list[dict], list[int]]:
    """Upload a batch's files (refusing probe images first), check its object keys, record its subjects.
    Returns the records to enrol and the manifest positions the batch covers (failures included: an
    image that is missing is reported, not retried forever)."""

    def missing(it: EnrolItem, image: str) -> None:
        miss = {"subject_id": it.subject_id, "image_key": image, "code": Code.IMAGE_MISSING.value}
        for engine in s.engines:
            report.failed.setdefault(engine, []).append(miss)

    files: list[tuple[int, EnrolItem, bytes]] = []
    for pos, it in chunk:
        if it.path is None:
            continue
        try:
            files.append((pos, it, it.path.read_bytes()))
        except OSError:  # a manifest naming a file that is not there (or not readable): reported, not fatal
            missing(it, str(it.path))
    refuse_probes(s, store, [(it.subject_id, data) for _, it, data in files], actor=actor)
    records: list[dict] = []
    dates: dict[str, str] = {}
    numbers: dict[str, str] = {}
    for _, it, data in files:
        key = put_content(store, "gallery", data)
        records.append({"subject_id": it.subject_id, "image_key": key})
        if it.booking_date:
            dates[key] = it.booking_date
        if it.booking_number:
            numbers[key] = it.booking_number
    for _, it in chunk:
        if it.key is None:
            continue
        if store.size(it.key) is None:
            missing(it, it.key)
            continue
        records.append({"subject_id": it.subject_id, "image_key": it.key})
        if it.booking_date:
            dates[it.key] = it.booking_date
        if it.booking_number:
            numbers[it.key] = it.booking_number
    _record_subjects(r, records, dates, numbers)
    return records, [pos for pos, _ in chunk]


def _record_subjects(r, records: list[dict], dates: dict[str, str], numbers: dict[str, str] | None = None) -> None:
    """Each subject's record: its images and, where the booking system gave them, each image's booking
    date and number."""
    numbers = numbers or {}
    subjects: dict[str, list[str]] = {}
    for rec in records:
        subjects.setdefault(rec["subject_id"], []).append(rec["image_key"])
    if not subjects:
        return
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    names = list(subjects)
    olds = r.hmget(keys.GALLERY_SUBJECTS, names)  # one round trip, not one per subject
    pipe = r.pipeline()
    for subject, old in zip(names, olds, strict=True):
        prev = json.loads(old) if old else {}
        imgs = subjects[subject]
        doc = {"images": sorted(set(prev.get("images", [])) | set(imgs)), "enrolled_at": now}
        for field_name, given in (("booking_dates", dates), ("booking_numbers", numbers)):
            merged = {**prev.get(field_name, {}), **{k: given[k] for k in imgs if k in given}}
            if merged:
                doc[field_name] = merged
        pipe.hset(keys.GALLERY_SUBJECTS, subject, json.dumps(doc))
    pipe.execute()


def expunge(s: Settings, store: ObjectStore, subject: str, *, reason: str, actor: str = "operator") -> dict:
    """Remove a subject from every engine's gallery (every version of it present: a reindex may be under
    way), the object store and the metadata.

    Audited (``gallery.expunge``, with the reason) before anything is removed. Then its images go, then
    its record, and only then the ``remove`` entries: an add is written only while the record exists
    (``workers.replica.log_add_entries``), so an enrolment or reindex in flight cannot write the subject
    back, into any version. Running it again after a failure finishes the job."""
    from .replica import log_remove

    r = redis_lib.Redis.from_url(s.redis_url)
    raw = r.hget(keys.GALLERY_SUBJECTS, subject)
    images = json.loads(raw)["images"] if raw else []
    versions = {e: sorted(keys.as_str(v) for v in r.hkeys(keys.gallery_versions(e))) for e in s.engines}
    audit.record(
        s,
        audit.AuditEvent(
            action=audit.GALLERY_EXPUNGE,
            outcome="ok",
            actor=actor,
            details={
                "subject_id": subject,
                "reason": reason,
                "images": len(images),
                "known": bool(raw),
                "engines": list(s.engines),
                "shards": {e: s.shards_of(e) for e in s.engines},
                "versions": versions,
            },
        ),
    )
    for key in images:
        store.delete(key)
    r.hdel(keys.GALLERY_SUBJECTS, subject)
    removed = {e: log_remove(r, e, subject, reason, shards=s.shards_of(e)) for e in s.engines}
    log.info("gallery.expunged", subject=subject, images=len(images), reason=reason, templates=removed)
    return {"subject_id": subject, "images_deleted": len(images), "engines": list(s.engines), "known": bool(raw)}


# ---- reindex: a new engine version's gallery built from the stored images --------------------------------


class GalleryRefused(Exception):
    """A gallery operation the operator must set up first (no reindex worker, a version still served);
    the CLI prints its message."""


@dataclass
class ReindexReport:
    engine: str
    version: str  # the version the reindex workers embed with
    images: int = 0
    enrolled: int = 0  # templates written to the new version's log by this run
    skipped: int = 0  # images a previous run of the same job finished (the job's bitmap)
    held: int = 0  # images the new version held already (a run of another job, e.g. before an expunge)
    expunged_meanwhile: int = 0  # images whose subject was expunged while they were being embedded
    failed: list[dict] = field(default_factory=list)  # [{subject_id, image_key, code}]
    seconds: float = 0.0
    snapshots: list[dict] = field(default_factory=list)  # the new version's snapshot pointers (one a shard)
    job_id: str = ""

    @property
    def images_per_s(self) -> float:
        """Images this run sent to be embedded (not those skipped or held already), per second of the
        whole run (final snapshot included)."""
        return (self.images - self.skipped - self.held) / max(self.seconds, 1e-9)


def live_versions(r, kind: str, engine: str) -> dict[str, str]:
    """Live workers of one kind (``engine``, ``shard``, ``reindex``) for an engine: node -> the engine
    version it runs (from its heartbeat)."""
    from ..broker import liveness

    if kind == "shard":
        sets = [keys.as_str(k) for k in r.scan_iter(keys.shard_alive_pattern(engine), count=100)]
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


def reindex(
    s: Settings,
    engine: str,
    *,
    batch: int = 32,
    window: int = 8,
    snapshot_every: int = 0,
    timeout: float = 24 * 3600.0,
    progress: Callable[[int, int], None] | None = None,
    actor: str = "operator",
) -> ReindexReport:
    """Rebuild one engine's templates from the gallery's stored images with the engine version that its
    reindex workers run (``quorum worker ENGINE --reindex``), into that version's own logs (one per
    shard), while the workers of the current version go on searching theirs.

    The images are those of the subjects' records (``keys.GALLERY_SUBJECTS``), sent in batches to the
    reindex queue (``broker.app.reindex_queue``), where the reindex workers find each face and embed it
    (nothing is embedded here). Resumable as bulk enrolment is (:func:`run_batches`: the job's bitmap),
    and the workers skip what the new version holds. An add is written only while its subject's record
    exists, so an expunge during the reindex wins. Snapshots of the new version (each shard) are
    written by a reindex worker after about every ``snapshot_every`` images and at the end. Audited
    (``gallery.reindex``) at the start and at the end."""
    from celery.result import AsyncResult

    from ..broker.app import TASK_ENROL, reindex_queue

    if engine not in s.engines:
        raise GalleryRefused(f"{engine} is not a configured engine ({', '.join(s.engines)})")
    t0 = time.monotonic()
    r = redis_lib.Redis.from_url(s.redis_url)
    app = make_app(s.redis_url)
    workers = live_versions(r, "reindex", engine)
    versions = sorted(set(workers.values()))
    if len(versions) != 1:
        found = "no reindex worker is running" if not versions else f"reindex workers run versions {versions}"
        raise GalleryRefused(
            f"reindex of {engine}: {found}: start `quorum worker {engine} --reindex` with the new engine version "
            "(one version only)",
        )
    (version,) = versions
    items = gallery_items(r)
    job = enrol_job_id([EnrolItem(sj, key=k) for sj, k in items], [f"reindex:{engine}@{keys.version_slug(version)}"])
    report = ReindexReport(engine=engine, version=version, images=len(items), job_id=job)
    shards = s.shards_of(engine)
    details = {"engine": engine, "version": version, "shards": shards, "job": job, "reindex_workers": len(workers)}
    audit.record(
        s,
        audit.AuditEvent(
            action=audit.GALLERY_REINDEX, outcome="started", actor=actor, details={**details, "images": len(items)}
        ),
    )
    queue = reindex_queue(engine)

    from .replica import enrolled_member

    def dispatch(chunk: list[tuple[int, tuple[str, str]]]) -> dict[str, AsyncResult]:
        # What the new version holds already (an earlier run of another job: the gallery changed since)
        # is not sent; the workers check again before embedding.
        held = r.smismember(keys.gallery_enrolled(engine), [enrolled_member(sj, k, version) for _, (sj, k) in chunk])
        payload = [{"subject_id": sj, "image_key": k} for (_, (sj, k)), h in zip(chunk, held, strict=True) if not h]
        report.held += len(chunk) - len(payload)
        if not payload:
            return {}
        return {"enroll": app.send_task(TASK_ENROL, kwargs={"engine": engine, "items": payload}, queue=queue)}

    def absorb(_: str, out: dict) -> None:
        if out.get("version") != version:
            raise GalleryRefused(f"a reindex worker embedded with {out.get('version')}, not {version}: stopped")
        report.enrolled += out["enrolled"]
        report.held += out["skipped"]
        report.expunged_meanwhile += out.get("expunged_meanwhile", 0)
        report.failed.extend(out["failed"])

    def snap() -> None:
        report.snapshots = snapshot_version(app, engine, shards, queue, wait=False)

    report.skipped, _ = run_batches(
        r,
        job,
        items,
        dispatch=dispatch,
        absorb=absorb,
        batch=batch,
        window=window,
        deadline=time.monotonic() + timeout,
        progress=progress,
        snapshot=snap if snapshot_every else None,
        snapshot_every=snapshot_every,
        final_snapshot=False,  # the one below, waited for
    )
    report.snapshots = snapshot_version(app, engine, shards, queue, wait=True, timeout=timeout)
    report.seconds = time.monotonic() - t0
    audit.record(
        s,
        audit.AuditEvent(
            action=audit.GALLERY_REINDEX,
            outcome="ok",
            actor=actor,
            details={
                **details,
                "images": report.images,
                "enrolled": report.enrolled,
                "skipped_as_done": report.skipped,
                "held_already": report.held,
                "expunged_meanwhile": report.expunged_meanwhile,
                "failed": len(report.failed),
                "seconds": round(report.seconds, 1),
                "snapshots": [p["index_key"] for p in report.snapshots],
            },
        ),
    )
    log.info(
        "gallery.reindexed",
        engine=engine,
        version=version,
        images=report.images,
        enrolled=report.enrolled,
        skipped=report.skipped,
        failed=len(report.failed),
        seconds=round(report.seconds, 1),
        images_per_s=round(report.images_per_s, 1),
    )
    return report


def snapshot_version(app, engine: str, shards: int, queue: str, *, wait: bool, timeout: float = 1800.0) -> list[dict]:
    """Ask the workers on ``queue`` (a reindex queue: the version they run) to snapshot every shard of
    ``engine``; with ``wait``, the pointers written."""
    from ..broker.app import TASK_SNAPSHOT

    sent = [app.send_task(TASK_SNAPSHOT, kwargs={"engines": [engine], "shard": i}, queue=queue) for i in range(shards)]
    if not wait:
        return []
    return [p for res in sent for p in res.get(timeout=timeout)["snapshots"]]


def gallery_status(s: Settings, store: ObjectStore) -> list[dict]:
    """Per engine: the versions its gallery holds (templates counted at enrolment and expunge; each
    shard's newest snapshot), and the versions its live workers run (searching, per shard, reindexing)."""
    from .replica import snapshot_prefix

    r = redis_lib.Redis.from_url(s.redis_url)
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
        out.append({"engine": engine, "shards": shards, "versions": versions})
    return out


def drop_version(s: Settings, store: ObjectStore, engine: str, version: str, *, actor: str = "operator") -> dict:
    """Delete an engine version's gallery state once no worker runs it: its logs, snapshots and pointers,
    its members of ``keys.gallery_enrolled`` and its count (audited as ``gallery.drop_version``)."""
    from .replica import snapshot_prefix

    r = redis_lib.Redis.from_url(s.redis_url)
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
