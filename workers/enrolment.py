"""Gallery administration from the operator's side: enrol a folder or a manifest, expunge a subject.

Enrolment uploads each image to the object store under ``gallery/<sha256>`` (or takes an object the
booking system stored), records the subject, and sends batches to the ``enrol`` queue: an intake
worker finds each face once and sends it to every engine's enrolment (``quorum.engine.enroll``); the
engine workers embed the faces and append templates to each engine's gallery log (its subject's shard's
log, for a sharded engine), which every replica applies. A rerun of the same items resumes.

Both are audited (``accountability.audit``: ``gallery.enrol``, ``gallery.expunge``). A probe image is never
enrolled: an image whose SHA-256 names a stored probe (``probes/<sha256>``) or any probe ever
submitted (the audit trail) stops the enrolment with ``PROBE_ENROL_REFUSED``, audited, before anything
of its batch is stored (earlier batches stay enrolled; a rerun without the probe resumes after them).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
import structlog

from accountability import audit, db
from broker import keys
from broker.app import make_app
from core.config import Settings
from core.errors import Code, InputError
from core.objectstore import ObjectStore, put_content

log = structlog.get_logger()

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
    from collections import deque

    from celery.result import AsyncResult

    from broker.app import ENROL_QUEUE, GALLERY_QUEUE, TASK_ENROL_DETECT, TASK_SNAPSHOT

    t0 = time.monotonic()
    r = redis_lib.Redis.from_url(s.redis_url)
    app = make_app(s.redis_url)
    todo = [it if isinstance(it, EnrolItem) else EnrolItem(it[0], path=Path(it[1])) for it in items]
    engines = list(s.engines)
    job = enrol_job_id(todo, engines)
    done_key = keys.enrol_job_done(job)
    report = EnrolReport(images=len(todo), job_id=job)
    subjects_seen: set[str] = set()
    inflight: deque[tuple[list[int], dict[str, AsyncResult]]] = deque()
    deadline = time.monotonic() + timeout
    finished = since_snapshot = 0

    def collect() -> None:
        nonlocal finished, since_snapshot
        positions, results = inflight.popleft()
        for engine, res in results.items():
            out = res.get(timeout=max(1.0, deadline - time.monotonic()), propagate=True)
            report.enrolled[engine] = report.enrolled.get(engine, 0) + out["enrolled"]
            report.detected_in_engine += out.get("detected_here", 0)
            if out["failed"]:
                report.failed.setdefault(engine, []).extend(out["failed"])
            res.forget()
        pipe = r.pipeline()
        for pos in positions:
            pipe.setbit(done_key, pos, 1)
        pipe.expire(done_key, 30 * 24 * 3600)
        pipe.execute()
        finished += len(positions)
        since_snapshot += len(positions)
        if snapshot_every and since_snapshot >= snapshot_every:
            app.send_task(TASK_SNAPSHOT, queue=GALLERY_QUEUE)
            report.snapshots += 1
            since_snapshot = 0
        if progress:
            progress(report.skipped + finished, len(todo))

    for start in range(0, len(todo), batch):
        whole = list(enumerate(todo[start : start + batch], start=start))
        pipe = r.pipeline()
        for pos, _ in whole:
            pipe.getbit(done_key, pos)
        done_bits = pipe.execute()
        chunk = [(pos, it) for (pos, it), bit in zip(whole, done_bits, strict=True) if not bit]
        report.skipped += len(whole) - len(chunk)
        if not chunk:
            if progress:
                progress(report.skipped + finished, len(todo))
            continue
        records, positions = _store_batch(s, store, r, chunk, report, actor=actor)
        subjects_seen.update(rec["subject_id"] for rec in records)
        task_ids = {e: uuid.uuid4().hex for e in engines}
        app.send_task(
            TASK_ENROL_DETECT, kwargs={"items": records, "engines": engines, "task_ids": task_ids}, queue=ENROL_QUEUE
        )
        inflight.append((positions, {e: AsyncResult(task_ids[e], app=app) for e in engines}))
        while len(inflight) >= window:
            collect()
    while inflight:
        collect()
    if snapshot_every and (since_snapshot or report.snapshots == 0) and finished:
        app.send_task(TASK_SNAPSHOT, queue=GALLERY_QUEUE)
        report.snapshots += 1
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
    """Remove a subject from every engine's gallery (via the log), the object store and the metadata.

    Audited (``gallery.expunge``, with the reason) before anything is removed."""
    from workers.gallery import log_remove

    r = redis_lib.Redis.from_url(s.redis_url)
    raw = r.hget(keys.GALLERY_SUBJECTS, subject)
    images = json.loads(raw)["images"] if raw else []
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
            },
        ),
    )
    for engine in s.engines:
        log_remove(r, engine, subject, reason, shards=s.shards_of(engine))
        done_key = keys.gallery_enrolled(engine)
        stale = [m for m in r.sscan_iter(done_key, match=f"{subject}|*") if m.decode().split("|", 1)[0] == subject]
        if stale:
            r.srem(done_key, *stale)
    for key in images:
        store.delete(key)
    r.hdel(keys.GALLERY_SUBJECTS, subject)
    log.info("gallery.expunged", subject=subject, images=len(images), reason=reason)
    return {"subject_id": subject, "images_deleted": len(images), "engines": list(s.engines), "known": bool(raw)}
