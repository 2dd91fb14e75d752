"""Gallery administration from the operator's side: enrol a folder, expunge a subject.

Enrolment uploads each image to the object store under ``gallery/<sha256>``, records the subject,
and sends batched ``quorum.engine.enroll`` tasks to every engine's queue; the engine workers embed
the faces and append templates to each engine's gallery log, which every replica applies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis as redis_lib
import structlog

from broker import keys
from broker.app import engine_queue, make_app
from quorum.config import Settings
from quorum.objectstore import ObjectStore, put_content

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


def enrol(s: Settings, store: ObjectStore, items: Iterable[tuple[str, Path]], *, batch: int = 16,
          timeout: float = 3600.0, progress: Callable[[int, int], None] | None = None) -> EnrolReport:
    t0 = time.monotonic()
    r = redis_lib.Redis.from_url(s.redis_url)
    app = make_app(s.redis_url)
    records: list[dict] = []
    subjects: dict[str, list[str]] = {}
    for subject, path in items:
        key = put_content(store, "gallery", Path(path).read_bytes())
        records.append({"subject_id": subject, "image_key": key})
        subjects.setdefault(subject, []).append(key)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    pipe = r.pipeline()
    for subject, imgs in subjects.items():
        old = r.hget(keys.GALLERY_SUBJECTS, subject)
        prev = json.loads(old)["images"] if old else []
        pipe.hset(keys.GALLERY_SUBJECTS, subject,
                  json.dumps({"images": sorted(set(prev) | set(imgs)), "enrolled_at": now}))
    pipe.execute()
    pending = []
    for engine in s.engines:
        for i in range(0, len(records), batch):
            chunk = records[i:i + batch]
            res = app.send_task("quorum.engine.enroll", args=[engine, chunk], queue=engine_queue(engine))
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
    log.info("gallery.enrolled", images=report.images, enrolled=report.enrolled,
             failed={e: len(f) for e, f in report.failed.items()}, seconds=round(report.seconds, 1))
    return report


def expunge(s: Settings, store: ObjectStore, subject: str, *, reason: str) -> dict:
    """Remove a subject from every engine's gallery (via the log), the object store and the metadata."""
    from workers.gallery import log_remove

    r = redis_lib.Redis.from_url(s.redis_url)
    raw = r.hget(keys.GALLERY_SUBJECTS, subject)
    images = json.loads(raw)["images"] if raw else []
    for engine in s.engines:
        log_remove(r, engine, subject, reason)
        done_key = f"quorum:gallery:enrolled:{engine}"
        stale = [m for m in r.sscan_iter(done_key, match=f"{subject}|*") if m.decode().split("|", 1)[0] == subject]
        if stale:
            r.srem(done_key, *stale)
    for key in images:
        store.delete(key)
    r.hdel(keys.GALLERY_SUBJECTS, subject)
    log.info("gallery.expunged", subject=subject, images=len(images), reason=reason)
    return {"subject_id": subject, "images_deleted": len(images), "engines": list(s.engines), "known": bool(raw)}
