"""Expunging a subject: out of every engine's gallery, the object store and the metadata (audited)."""

from __future__ import annotations

import json

import structlog

from ..accountability import audit
from ..broker import keys
from ..broker.redis_errors import connect
from ..core.config import Settings
from ..core.objectstore import ObjectStore
from ..workers.replica import log_remove

log = structlog.get_logger()


def expunge(s: Settings, store: ObjectStore, subject: str, *, reason: str, actor: str = "operator") -> dict:
    """Remove a subject from every engine's gallery (every version of it present: a reindex may be under
    way), the object store and the metadata.

    Audited (``gallery.expunge``, with the reason) before anything is removed. Then its images go, then
    its record, and only then the ``remove`` entries: an add is written only while the record exists
    (``workers.replica.log_add_entries``), so an enrolment or reindex in flight cannot write the subject
    back, into any version. Running it again after a failure finishes the job."""
    r = connect(s.redis_url)
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
