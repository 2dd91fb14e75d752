"""``quorum audit verify | anchor | query`` and ``quorum report usage``: the tamper-evident audit trail
and the transparency reports read from it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..core.config import settings
from .common import CliError, actor_option, db_engine, emit, operator_name


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail."""


@audit_group.command("verify")
@click.option("--no-anchors", is_flag=True, help="check the chain only, not its anchors in the object store")
@click.option(
    "--no-head", is_flag=True, help="do not check completeness against the audit head in Redis (no Redis at hand)"
)
def audit_verify(no_anchors: bool, no_head: bool) -> None:
    """Recompute the hash chain, check the anchors, the dispositions table and the audit head kept in Redis;
    exit 1 at the first broken record, 3 when the trail is intact but its completeness cannot be confirmed
    (the head in Redis is behind the last record, or Redis cannot be read)."""
    from ..accountability import audit, audit_head

    s = settings()
    head: audit_head.OutsideHead | None = None
    note = "--no-head"
    if not no_head:
        try:
            head = audit_head.for_url(s.redis_url)
            head.read()
        except Exception as exc:  # Redis away or no rights: the chain is still checked, completeness is not
            head, note = None, f"the audit head in Redis could not be read: {type(exc).__name__}: {exc}"
    rep = audit.verify(db_engine(), None if no_anchors else audit.open_anchors(s), head)
    rep.head_note = rep.head_note or (note if head is None else "")
    click.echo(rep.summary())
    sys.exit(1 if not rep.ok else 0 if rep.complete or no_head or not rep.records else 3)


@audit_group.command("head-reset")
@click.option("--reason", required=True, help="why (e.g. 'restored the 2026-12-01 backup after the disk failure')")
@actor_option
def audit_head_reset(reason: str, actor: str | None) -> None:
    """Acknowledge a trail cut short (a database restored from an older backup): record an audit.head_reset
    naming the head in Redis it replaces, and set that head to this record."""
    from ..accountability import audit, audit_head

    s = settings()
    head = audit_head.for_url(s.redis_url)
    try:
        old = head.read()
    except Exception as exc:
        raise CliError(
            f"the audit head in Redis cannot be read ({type(exc).__name__}: {exc}); nothing changed"
        ) from None
    details = {"reason": reason, "replaced_seq": old.seq if old else None, "replaced_hash": old.hash if old else ""}
    event = audit.AuditEvent(action=audit.HEAD_RESET, outcome="ok", actor=operator_name(actor), details=details)
    row = audit.append(db_engine(), event)
    head.reset(int(str(row["seq"])), str(row["hash"]), str(row["ts"]))
    click.echo(f"audit head set to seq {row['seq']} (was {old.seq if old else 'none'}): recorded as audit.head_reset")


@audit_group.command("anchor")
@actor_option
def audit_anchor(actor: str | None) -> None:
    """Write the chain head to the object store (write-once / object lock)."""
    from ..accountability import audit

    doc = audit.anchor(db_engine(), audit.open_anchors(settings()), actor=operator_name(actor))
    click.echo(json.dumps(doc) if doc else "nothing to anchor (empty chain or head already anchored)")


@audit_group.command("query")
@click.option("--agency", default=None)
@click.option("--user", "actor", default=None, help="the acting user")
@click.option("--case", "case_number", default=None)
@click.option("--request", "request_id", default=None)
@click.option("--action", default=None, help="e.g. search.submitted, or a pattern like 'registry.*'")
@click.option("--from", "since", default=None, help="ISO date or time (UTC), inclusive")
@click.option("--to", "until", default=None, help="ISO date or time (UTC), exclusive")
@click.option("--limit", default=None, type=int)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def audit_query(agency, actor, case_number, request_id, action, since, until, limit, as_json) -> None:
    """Audit records matching every filter."""
    from ..accountability import audit

    rows = audit.query(
        db_engine(),
        agency=agency,
        actor=actor,
        case_number=case_number,
        request_id=request_id,
        action=action,
        since=since,
        until=until,
        limit=limit,
    )
    for r in rows:
        if as_json:
            click.echo(json.dumps(r, default=str))
        else:
            why = "/".join(x for x in (r["case_number"], r["offence_code"], r["purpose"]) if x)
            click.echo(
                f"{r['seq']:>7} {r['ts']} {r['action']:<22} {r['outcome']:<9} {r['code']:<22} "
                f"agency={r['agency'] or '-'} user={r['actor'] or '-'} req={r['request_id'] or '-'} {why}"
            )


# ---- report ----------------------------------------------------------------------------------------


@click.group("report")
def report_group() -> None:
    """Transparency reports from the audit trail."""


@report_group.command("usage")
@click.option("--from", "since", required=True, help="ISO date (UTC), inclusive")
@click.option("--to", "until", required=True, help="ISO date (UTC), exclusive")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def report_usage(since: str, until: str, fmt: str, out: Path | None) -> None:
    """Searches per agency, purpose, offence and outcome, and the dispositions (Markdown or CSV)."""
    from ..accountability import report

    rep = report.usage(db_engine(), since, until)
    text = report.to_markdown(rep) if fmt == "md" else report.to_csv(rep)
    emit(text, out)


COMMANDS = (audit_group, report_group)
