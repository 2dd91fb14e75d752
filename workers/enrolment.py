"""Gallery administration from the operator's side: enrol a folder, expunge a subject.

Enrolment uploads each image to the object store under ``gallery/<sha256>``, records the subject,
and sends batched ``quorum.engine.enroll`` tasks to every engine's queue; the engine workers embed
the faces and append templates to each engine's gallery log, which every replica applies.

Both are audited (``accountability.audit``: ``gallery.enrol``, ``gallery.expunge``). A probe image is never
enrolled: an image whose SHA-256 names a stored probe (``probes/<sha256>``) or any probe ever
submitted (the audit trail) makes the whole enrolment fail with ``PROBE_ENROL_REFUSED``, audited,
before anything is stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
import structlog

from accountability import audit, db
from broker import keys
from broker.app import TASK_ENROLL, engine_queue, make_app
from core.config import Settings
from core.errors import Code, InputError
from core.objectstore import ObjectStore, put_content

log = structlog.get_logger()

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def folder_items(root: Path) -> list[tuple[str, Path]]:
    """``<root>/<subject>/<image>`` -> [(subject, path)], sorted."""
    items = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        for img in sorted(subject_dir.iterdir()):
            if img.suffix.lower() in IMAGE_SUFFIXES:
                items.append((subject_dir.name, img))
    return items


@dataclass
class EnrolReport:
    images: int = 0
    enrolled: dict[str, int] = field(default_factory=dict)  # engine -> templates added
    failed: dict[str, list[dict]] = field(default_factory=dict)  # engine -> [{subject_id, image_key, code}]
    seconds: float = 0.0


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
    items: Iterable[tuple[str, Path]],
    *,
    batch: int = 16,
    timeout: float = 3600.0,
    progress: Callable[[int, int], None] | None = None,
    actor: str = "operator",
) -> EnrolReport:
    t0 = time.monotonic()
    r = redis_lib.Redis.from_url(s.redis_url)
    app = make_app(s.redis_url)
    records: list[dict] = []
    subjects: dict[str, list[str]] = {}
    images = [(subject, Path(path).read_bytes()) for subject, path in items]
    refuse_probes(s, store, images, actor=actor)
    for subject, data in images:
        key = put_content(store, "gallery", data)
        records.append({"subject_id": subject, "image_key": key})
        subjects.setdefault(subject, []).append(key)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    names = list(subjects)
    olds = r.hmget(keys.GALLERY_SUBJECTS, names) if names else []  # one round trip, not one per subject
    pipe = r.pipeline()
    for subject, old in zip(names, olds, strict=True):
        imgs = subjects[subject]
        prev = json.loads(old)["images"] if old else []
        pipe.hset(
            keys.GALLERY_SUBJECTS, subject, json.dumps({"images": sorted(set(prev) | set(imgs)), "enrolled_at": now})
        )
    pipe.execute()
    pending = []
    for engine in s.engines:
        for i in range(0, len(records), batch):
            chunk = records[i : i + batch]
            res = app.send_task(TASK_ENROLL, kwargs={"engine": engine, "items": chunk}, queue=engine_queue(engine))
            pending.append((engine, len(chunk), res))
    total = sum(n for _, n, _ in pending)
    report = EnrolReport(images=len(records))
    done = 0
    deadline = time.monotonic() + timeout
    for engine, n, res in pending:
        out = res.get(timeout=max(1.0, deadline - time.monotonic()), propagate=True)
        report.enrolled[engine] = report.enrolled.get(engine, 0) + out["enrolled"]
        if out["failed"]:
            report.failed.setdefault(engine, []).extend(out["failed"])
        res.forget()
        done += n
        if progress:
            progress(done, total)
    report.seconds = time.monotonic() - t0
    audit.record(
        s,
        audit.AuditEvent(
            action=audit.GALLERY_ENROL,
            outcome="ok",
            actor=actor,
            details={
                "images": report.images,
                "subjects": len(subjects),
                "enrolled": report.enrolled,
                "failed": {e: len(f) for e, f in report.failed.items()},
                "subject_ids": sorted(subjects)[:1000],
            },
        ),
    )
    log.info(
        "gallery.enrolled",
        images=report.images,
        enrolled=report.enrolled,
        failed={e: len(f) for e, f in report.failed.items()},
        seconds=round(report.seconds, 1),
    )
    return report


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
