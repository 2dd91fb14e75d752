"""Enrolment from the operator's side: upload each image to the object store under ``gallery/<sha256>``
(or take an object the booking system stored), record the subject, and send batches to the ``enrol``
queue: an intake worker finds each face once and sends it to every engine's enrolment
(``quorum.engine.enrol``); the engine workers embed the faces and append templates to each engine's
gallery log (its subject's shard's log, for a sharded engine), which every replica applies. A rerun of
the same items resumes (``gallery.batches``).

Audited (``gallery.enrol``). A probe image is never enrolled: an image whose SHA-256 names a stored probe
(``probes/<sha256>``) or any probe ever submitted (the audit trail) stops the enrolment with
``PROBE_ENROL_REFUSED``, audited, before anything of its batch is stored (earlier batches stay enrolled;
a rerun without the probe resumes after them).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from celery.result import AsyncResult

from ..accountability import audit, db
from ..broker import keys
from ..broker.app import ENROL_QUEUE, GALLERY_QUEUE, TASK_ENROL_DETECT, TASK_SNAPSHOT, make_app
from ..broker.redis_errors import connect
from ..core.config import Settings
from ..core.errors import Code, InputError
from ..core.objectstore import ObjectStore, put_content
from ..schemas.ids import IdKind, problem
from .batches import run_batches
from .items import EnrolItem, enrol_job_id

log = structlog.get_logger()


@dataclass
class EnrolReport:
    images: int = 0
    enrolled: dict[str, int] = field(default_factory=dict)  # engine -> templates added
    held: dict[str, int] = field(default_factory=dict)  # engine -> items it held already (same subject, image)
    failed: dict[str, list[dict]] = field(default_factory=dict)  # engine -> [{subject_id, image_key, code}]
    seconds: float = 0.0
    skipped: int = 0  # items a previous run of the same job enrolled already
    detected_in_engine: int = 0  # faces an engine had to find itself (0: each found once, for all engines)
    snapshots: int = 0
    job_id: str = ""


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
    t0 = time.monotonic()
    todo = [it if isinstance(it, EnrolItem) else EnrolItem(it[0], path=Path(it[1])) for it in items]
    run = _Enrolment(s, store, todo, actor)
    run.report.skipped, _ = run_batches(
        run.r,
        run.report.job_id,
        todo,
        dispatch=run.dispatch,
        absorb=run.absorb,
        batch=batch,
        window=window,
        deadline=time.monotonic() + timeout,
        progress=progress,
        snapshot=run.snapshot if snapshot_every else None,
        snapshot_every=snapshot_every,
    )
    run.report.seconds = time.monotonic() - t0
    run.record_done()
    return run.report


class _Enrolment:
    """One enrolment run: what it sends to the workers and what it takes back from them."""

    def __init__(self, s: Settings, store: ObjectStore, todo: list[EnrolItem], actor: str) -> None:
        self.s, self.store, self.actor = s, store, actor
        self.r = connect(s.redis_url)
        self.app = make_app(s.redis_url)
        self.engines = list(s.engines)
        self.report = EnrolReport(images=len(todo), job_id=enrol_job_id(todo, self.engines))
        self.subjects_seen: set[str] = set()

    def dispatch(self, chunk: list[tuple[int, EnrolItem]]) -> dict[str, AsyncResult]:
        records, _ = _store_batch(self.s, self.store, self.r, chunk, self.report, actor=self.actor)
        self.subjects_seen.update(rec["subject_id"] for rec in records)
        task_ids = {e: uuid.uuid4().hex for e in self.engines}
        kwargs = {"items": records, "engines": self.engines, "task_ids": task_ids}
        self.app.send_task(TASK_ENROL_DETECT, kwargs=kwargs, queue=ENROL_QUEUE)
        return {e: AsyncResult(task_ids[e], app=self.app) for e in self.engines}

    def absorb(self, engine: str, out: dict) -> None:
        report = self.report
        report.enrolled[engine] = report.enrolled.get(engine, 0) + out["enrolled"]
        if out.get("skipped"):
            report.held[engine] = report.held.get(engine, 0) + out["skipped"]
        report.detected_in_engine += out.get("detected_here", 0)
        if out["failed"]:
            report.failed.setdefault(engine, []).extend(out["failed"])

    def snapshot(self) -> None:
        self.app.send_task(TASK_SNAPSHOT, queue=GALLERY_QUEUE)
        self.report.snapshots += 1

    def record_done(self) -> None:
        """The run, audited (``gallery.enrol``) and logged."""
        report = self.report
        failed = {e: len(f) for e, f in report.failed.items()}
        details = {
            "images": report.images,
            "subjects": len(self.subjects_seen),
            "enrolled": report.enrolled,
            "held_already": report.held,
            "failed": failed,
            "skipped_as_done": report.skipped,
            "job": report.job_id,
            "subject_ids": sorted(self.subjects_seen)[:1000],
        }
        audit.record(
            self.s, audit.AuditEvent(action=audit.GALLERY_ENROL, outcome="ok", actor=self.actor, details=details)
        )
        log.info(
            "gallery.enrolled",
            images=report.images,
            enrolled=report.enrolled,
            held_already=report.held,
            skipped=report.skipped,
            failed=failed,
            seconds=round(report.seconds, 1),
            images_per_s=round((report.images - report.skipped) / max(report.seconds, 1e-9), 1),
        )


def _store_batch(
    s: Settings, store: ObjectStore, r, chunk: list[tuple[int, EnrolItem]], report: EnrolReport, *, actor: str
) -> tuple[list[dict], list[int]]:
    """Upload a batch's files (refusing probe images first), check its object keys, record its subjects.
    Returns the records to enrol and the manifest positions the batch covers (failures included: an
    image that is missing is reported, not retried forever)."""

    def missing(it: EnrolItem, image: str, code: Code = Code.IMAGE_MISSING) -> None:
        miss = {"subject_id": it.subject_id, "image_key": image, "code": code.value}
        for engine in s.engines:
            report.failed.setdefault(engine, []).append(miss)

    positions = [pos for pos, _ in chunk]
    chunk = _refuse_bad_ids(s, chunk, report)
    files: list[tuple[int, EnrolItem, bytes]] = []
    for pos, it in chunk:
        if it.path is None:
            continue
        try:
            files.append((pos, it, it.read_bytes()))
        except OSError:  # a manifest naming a file that is not there (or not readable): reported, not fatal
            missing(it, str(it.path))
        except InputError as err:  # an image in a transaction file that does not decode (gallery.nist)
            missing(it, it.source, err.code)
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
    return records, positions


def _refuse_bad_ids(
    s: Settings, chunk: list[tuple[int, EnrolItem]], report: EnrolReport
) -> list[tuple[int, EnrolItem]]:
    """The items whose subject id fits the grammar (``schemas.ids``); each other one is reported failed
    with ``INVALID_ID`` for every engine (its id escaped: a bidi or control character is never shown as
    such), nothing of it stored, and the rest of the batch goes on."""
    good = []
    for pos, it in chunk:
        why = problem(IdKind.SUBJECT, it.subject_id)
        if why is None:
            good.append((pos, it))
            continue
        log.warning("gallery.subject_id_refused", subject_id=ascii(it.subject_id), source=ascii(it.source), reason=why)
        refused = {
            "subject_id": ascii(it.subject_id),
            "image_key": ascii(it.source),
            "code": Code.INVALID_ID.value,
            "message": why,
        }
        for engine in s.engines:
            report.failed.setdefault(engine, []).append(refused)
    return good


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
        doc: dict[str, Any] = {"images": sorted(set(prev.get("images", [])) | set(imgs)), "enrolled_at": now}
        for field_name, given in (("booking_dates", dates), ("booking_numbers", numbers)):
            merged = {**prev.get(field_name, {}), **{k: given[k] for k in imgs if k in given}}
            if merged:
                doc[field_name] = merged
        pipe.hset(keys.GALLERY_SUBJECTS, subject, json.dumps(doc))
    pipe.execute()
