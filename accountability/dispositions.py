"""What happened after a search: the investigator's disposition, and the second look a lead needs.

Rules (each refusal is ``DISPOSITION_REFUSED`` or the user check's own code, and is audited):

* the search must exist (a ``search.result`` record for ``request_id`` with a candidate list) and the
  recording user must be an active, certified investigator or supervisor of the searching agency;
* ``outcome`` is one of :data:`OUTCOMES`; ``lead_pursued`` and ``candidate_excluded`` name the
  ``candidate`` (a subject id that was on the list);
* ``lead_pursued`` on a candidate is recorded ``pending`` and counts only once a *different*
  certified investigator or supervisor of the same agency confirms it (``confirmed``), through a
  different operator too (``SECOND_PERSON_REQUIRED``: one CLI operator cannot record and confirm it
  under two users' names); every other outcome is ``final`` at once;
* each decision is an audit record (``actor``: who acted, the reviewer signed in to ``quorum review`` or
  the CLI's operator; ``details.user``, and ``details.on_behalf_of`` when the operator acted for a user).
  This table is what the usage report counts; ``quorum audit verify`` checks every row against those
  records (an edited, added or deleted row is caught).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select, update

from ..core.errors import Code, InputError, ServiceError
from . import audit, db, policy
from .audit import AuditEvent
from .registry import snapshot

OUTCOMES = ("no_lead", "lead_pursued", "candidate_excluded", "inconclusive", "not_reviewed")
NEEDS_CANDIDATE = frozenset({"lead_pursued", "candidate_excluded"})
NEEDS_CONFIRMATION = frozenset({"lead_pursued"})


@dataclass(frozen=True)
class Disposition:
    id: int
    request_id: str
    agency_id: str
    case_number: str
    user_id: str
    outcome: str
    candidate: str
    status: str
    confirmed_by: str


def _search(conn, request_id: str) -> dict | None:
    t = db.audit_log
    row = conn.execute(
        select(t).where(t.c.request_id == request_id, t.c.action == audit.SEARCH_RESULT).order_by(t.c.seq).limit(1)
    ).first()
    return dict(row._mapping) if row else None


def _refuse(eng: Engine, action: str, actor: str, request_id: str, err: InputError, **details) -> InputError:
    audit.append(
        eng,
        AuditEvent(
            action=action,
            outcome="refused",
            code=err.code.value,
            actor=actor,
            request_id=request_id,
            details={"reason": err.message, **details},
        ),
    )
    return err


def _who(user_id: str, actor: str, via: str) -> dict:
    """The audit details naming the decision's user, and the operator when they are not the same."""
    who = {"user": user_id, "via": via}
    if actor != user_id:
        who["on_behalf_of"] = user_id
    return who


def record(
    eng: Engine,
    request_id: str,
    outcome: str,
    user_id: str,
    *,
    candidate: str = "",
    note: str = "",
    now: datetime | None = None,
    actor: str | None = None,
    via: str = "",
    shown: Collection[str] | None = None,
) -> Disposition:
    """Record ``user_id``'s decision on a search. ``actor``: who did it, when not the user themselves (the
    CLI's operator; the user is then recorded as ``on_behalf_of``). ``shown``: the candidates the search's
    sheet shows; a ``candidate`` not among them is refused."""
    now = now or datetime.now(UTC)
    actor = actor or user_id
    who = _who(user_id, actor, via)
    snap = snapshot(eng)
    with eng.connect() as conn:
        search = _search(conn, request_id)
    action = audit.DISPOSITION_RECORDED

    def refuse(err: InputError) -> InputError:
        return _refuse(eng, action, actor, request_id, err, **who)

    if outcome not in OUTCOMES:
        raise refuse(InputError(Code.DISPOSITION_REFUSED, f"outcome must be one of {OUTCOMES}"))
    if search is None or search["outcome"] not in {"ok", "degraded"}:
        raise refuse(InputError(Code.DISPOSITION_REFUSED, f"no candidate list was published for {request_id!r}"))
    err = policy.check_user(user_id, search["agency"], snap, now.date())
    if err:
        raise refuse(err)
    if outcome in NEEDS_CANDIDATE and not candidate:
        raise refuse(InputError(Code.DISPOSITION_REFUSED, f"outcome {outcome} names a --candidate"))
    if candidate and shown is not None and candidate not in shown:
        raise refuse(InputError(Code.DISPOSITION_REFUSED, "that candidate is not on this search's sheet"))
    status = "pending" if outcome in NEEDS_CONFIRMATION and candidate else "final"
    with db.write_tx(eng) as conn:
        inserted = conn.execute(
            db.dispositions.insert().values(
                request_id=request_id,
                agency_id=search["agency"],
                case_number=search["case_number"],
                user_id=user_id,
                outcome=outcome,
                candidate=candidate,
                note=note,
                status=status,
                recorded_at=audit.now_iso(now),
            )
        ).inserted_primary_key
        if inserted is None:
            raise ServiceError(Code.AUDIT_UNAVAILABLE, "the database returned no id for the disposition")
        new_id = inserted[0]
        audit.append_in(
            conn,
            AuditEvent(
                action=action,
                outcome=status,
                actor=actor,
                agency=search["agency"],
                request_id=request_id,
                case_number=search["case_number"],
                offence_code=search["offence_code"],
                purpose=search["purpose"],
                probe_sha256=search["probe_sha256"],
                details={
                    "disposition_id": int(new_id),
                    "disposition": outcome,
                    "candidate": candidate,
                    "note": note,
                    **who,
                },
            ),
        )
    return Disposition(
        int(new_id), request_id, search["agency"], search["case_number"], user_id, outcome, candidate, status, ""
    )


def recorded_by(eng: Engine, disposition_id: int, request_id: str) -> str:
    """Who recorded a disposition, as the audit trail names them (the operator for one made with the CLI)."""
    t = db.audit_log
    q = select(t.c.actor, t.c.details).where(
        t.c.request_id == request_id, t.c.action == audit.DISPOSITION_RECORDED, t.c.outcome != "refused"
    )
    with eng.connect() as conn:
        for r in conn.execute(q):
            try:
                if int(json.loads(r.details or "{}").get("disposition_id", -1)) == disposition_id:
                    return str(r.actor)
            except (ValueError, TypeError, AttributeError):
                continue
    return ""


def confirm(
    eng: Engine,
    disposition_id: int,
    user_id: str,
    *,
    now: datetime | None = None,
    actor: str | None = None,
    via: str = "",
) -> Disposition:
    """``user_id`` confirms a pending lead of their agency. Another agency's disposition, one that does not
    exist and one that is not pending get the same answer. The two-person rule: neither the user nor the
    operator who recorded it may confirm it (``SECOND_PERSON_REQUIRED``)."""
    now = now or datetime.now(UTC)
    actor = actor or user_id
    who = _who(user_id, actor, via)
    snap = snapshot(eng)
    t = db.dispositions
    with eng.connect() as conn:
        row = conn.execute(select(t).where(t.c.id == disposition_id)).first()
    action = audit.DISPOSITION_CONFIRMED
    rid = row.request_id if row else ""
    user = snap.users.get(user_id)
    if user is None:
        raise _refuse(eng, action, actor, rid, InputError(Code.USER_UNKNOWN, f"user {user_id!r} is not registered"))
    if row is None or row.status != "pending" or row.agency_id != user.agency_id:
        raise _refuse(
            eng,
            action,
            actor,
            rid,
            InputError(Code.DISPOSITION_REFUSED, f"disposition {disposition_id} is not awaiting your confirmation"),
            **who,
        )
    err = policy.check_user(user_id, row.agency_id, snap, now.date())
    if err:
        raise _refuse(eng, action, actor, rid, err, **who)
    recorder = recorded_by(eng, disposition_id, row.request_id) or row.user_id
    if user_id == row.user_id or actor in {row.user_id, recorder}:
        raise _refuse(
            eng,
            action,
            actor,
            rid,
            InputError(
                Code.SECOND_PERSON_REQUIRED,
                "a lead must be confirmed by a second person: not the user who recorded it, nor the operator "
                "who recorded it for them",
            ),
            **who,
        )
    with db.write_tx(eng) as conn:
        conn.execute(
            update(t)
            .where(t.c.id == disposition_id, t.c.status == "pending")
            .values(status="confirmed", confirmed_by=user_id, confirmed_at=audit.now_iso(now))
        )
        audit.append_in(
            conn,
            AuditEvent(
                action=action,
                outcome="confirmed",
                actor=actor,
                agency=row.agency_id,
                request_id=row.request_id,
                case_number=row.case_number,
                details={
                    "disposition_id": disposition_id,
                    "disposition": row.outcome,
                    "candidate": row.candidate,
                    "recorded_by": row.user_id,
                    **who,
                },
            ),
        )
    return Disposition(
        row.id,
        row.request_id,
        row.agency_id,
        row.case_number,
        row.user_id,
        row.outcome,
        row.candidate,
        "confirmed",
        user_id,
    )


def list_for(eng: Engine, *, request_id: str | None = None, agency: str | None = None) -> list[dict]:
    t = db.dispositions
    q = select(t).order_by(t.c.id)
    if request_id:
        q = q.where(t.c.request_id == request_id)
    if agency:
        q = q.where(t.c.agency_id == agency)
    with eng.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def to_json(d: Disposition) -> str:
    return json.dumps(d.__dict__)
