"""Probe retention and case holds.

A probe image (``probes/<sha256>``) is kept ``probe_retention_days`` after the *last* search that
submitted it (the audit trail knows when: ``search.submitted`` records carry the probe's SHA-256),
unless a case that searched with it is on hold (``quorum case hold CASE --agency A``). ``quorum probes
purge`` deletes the others and audits each deletion (``probe.purged``). A probe object that no
audited submission references (uploaded but never searched) is left alone and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, delete, func, select

from ..core.errors import Code, InputError
from ..core.objectstore import ObjectStore
from . import audit, db
from .audit import AuditEvent


def hold(eng: Engine, agency_id: str, case_number: str, *, reason: str, actor: str) -> None:
    with db.write_tx(eng) as conn:
        exists = conn.execute(
            select(db.case_holds.c.case_number).where(
                db.case_holds.c.agency_id == agency_id, db.case_holds.c.case_number == case_number
            )
        ).first()
        if not exists:
            conn.execute(
                db.case_holds.insert().values(
                    agency_id=agency_id, case_number=case_number, reason=reason, held_by=actor, held_at=audit.now_iso()
                )
            )
        audit.append_in(
            conn,
            AuditEvent(
                action=audit.CASE_HOLD,
                outcome="ok",
                actor=actor,
                agency=agency_id,
                case_number=case_number,
                details={"reason": reason},
            ),
        )


def release(eng: Engine, agency_id: str, case_number: str, *, reason: str, actor: str) -> None:
    with db.write_tx(eng) as conn:
        n = conn.execute(
            delete(db.case_holds).where(
                db.case_holds.c.agency_id == agency_id, db.case_holds.c.case_number == case_number
            )
        ).rowcount
        if not n:
            raise InputError(Code.INVALID_MESSAGE, f"case {case_number!r} of {agency_id!r} is not on hold")
        audit.append_in(
            conn,
            AuditEvent(
                action=audit.CASE_RELEASE,
                outcome="ok",
                actor=actor,
                agency=agency_id,
                case_number=case_number,
                details={"reason": reason},
            ),
        )


def holds(eng: Engine) -> list[dict]:
    with eng.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(db.case_holds).order_by(db.case_holds.c.held_at))]


@dataclass
class PurgeReport:
    deleted: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    kept: int = 0  # still within retention
    unreferenced: list[str] = field(default_factory=list)


def purge(
    eng: Engine,
    store: ObjectStore,
    retention_days: int,
    *,
    now: datetime | None = None,
    actor: str = "operator",
    dry_run: bool = False,
) -> PurgeReport:
    now = now or datetime.now(UTC)
    cutoff = audit.now_iso(now - timedelta(days=retention_days))
    t, h = db.audit_log, db.case_holds
    report = PurgeReport()
    with eng.connect() as conn:
        last = {
            r.probe_sha256: r.last
            for r in conn.execute(
                select(t.c.probe_sha256, func.max(t.c.ts).label("last"))
                .where(t.c.action == audit.SEARCH_SUBMITTED, t.c.probe_sha256 != "")
                .group_by(t.c.probe_sha256)
            )
        }
        held = {
            r.probe_sha256
            for r in conn.execute(
                select(t.c.probe_sha256)
                .distinct()
                .join(h, (h.c.agency_id == t.c.agency) & (h.c.case_number == t.c.case_number))
                .where(t.c.action == audit.SEARCH_SUBMITTED)
            )
        }
    for key in store.list("probes"):
        sha = key.rsplit("/", 1)[-1]
        if sha not in last:
            report.unreferenced.append(key)
        elif sha in held:
            report.held.append(key)
        elif last[sha] >= cutoff:
            report.kept += 1
        else:
            report.deleted.append(key)
            if not dry_run:
                store.delete(key)
                audit.append(
                    eng,
                    AuditEvent(
                        action=audit.PROBE_PURGED,
                        outcome="ok",
                        actor=actor,
                        probe_sha256=sha,
                        details={"key": key, "last_search": last[sha], "retention_days": retention_days},
                    ),
                )
    return report


@dataclass
class ResultPurgeReport:
    deleted: list[str] = field(default_factory=list)
    kept: int = 0  # answered within ``result_ttl_s``
    unanswered: list[str] = field(default_factory=list)  # no search.result record: left alone


def purge_results(
    eng: Engine, store: ObjectStore, ttl_s: int, *, now: datetime | None = None, dry_run: bool = False
) -> ResultPurgeReport:
    """Delete the kept copies of answers (``results/<agency>/<request id>.json``, written when Redis let
    them go) answered more than ``ttl_s`` ago (the audit trail's ``search.result`` says when)."""
    now = now or datetime.now(UTC)
    cutoff = audit.now_iso(now - timedelta(seconds=ttl_s))
    t = db.audit_log
    report = ResultPurgeReport()
    with eng.connect() as conn:
        answered = {
            (r.agency, r.request_id): r.last
            for r in conn.execute(
                select(t.c.agency, t.c.request_id, func.max(t.c.ts).label("last"))
                .where(t.c.action == audit.SEARCH_RESULT)
                .group_by(t.c.agency, t.c.request_id)
            )
        }
    for key in store.list("results"):
        parts = key.split("/")
        if len(parts) != 3 or not parts[2].endswith(".json"):
            continue
        when = answered.get((parts[1], parts[2][: -len(".json")]))
        if when is None:
            report.unanswered.append(key)
        elif when >= cutoff:
            report.kept += 1
        else:
            report.deleted.append(key)
            if not dry_run:
                store.delete(key)
    return report
