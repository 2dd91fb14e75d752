"""Accountability commands: ``quorum db | registry | audit | report | disposition | case | probes``.

Every command that changes something is audited under the operator's name: ``--actor``, else
``QUORUM_OPERATOR``, else the login name. Errors with a stable code exit with status 2.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from functools import wraps
from pathlib import Path

import click

from quorum.config import settings
from quorum.errors import QuorumError

actor_option = click.option("--actor", default=None, help="who does this (default: $QUORUM_OPERATOR or login)")


def operator_name(actor: str | None = None) -> str:
    return actor or os.environ.get("QUORUM_OPERATOR") or getpass.getuser()


def _emit(text: str, out: Path | None) -> None:
    """Write ``text`` to ``out`` when given, else to standard output."""
    if out:
        out.write_text(text)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)


def _engine():
    from quorum import db

    return db.get_engine(settings())


def _coded(fn):
    """Print a Quorum error as ``CODE: message`` and exit 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuorumError as err:
            click.echo(f"{err.code.value}: {err.message}", err=True)
            sys.exit(2)
    return wrapper


# ---- db ------------------------------------------------------------------------------------------

@click.group("db")
def db_group() -> None:
    """The registry and audit database (SQLite by default, PostgreSQL via QUORUM_DATABASE_URL)."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Run pending migrations (they also run automatically on first use)."""
    from quorum import db

    s = settings()
    eng = db.get_engine(s, migrate=False)
    db.upgrade(eng)
    click.echo(f"{db.database_url(s).split('@')[-1]}: at revision {db.current_revision(eng)}")


# ---- registry ------------------------------------------------------------------------------------

@click.group("registry")
def registry_group() -> None:
    """Member agencies, users, offence codes and purposes."""


@registry_group.group("agency")
def agency_group() -> None:
    """Member agencies."""


@agency_group.command("add")
@click.argument("agency_id")
@click.option("--name", required=True)
@click.option("--quota", "daily_quota", default=0, show_default=True, help="searches per UTC day (0: unlimited)")
@actor_option
@_coded
def agency_add(agency_id: str, name: str, daily_quota: int, actor: str | None) -> None:
    """Register an agency; prints its signing secret and Redis password ONCE."""
    from quorum import registry

    c = registry.add_agency(_engine(), agency_id, name, daily_quota=daily_quota, actor=operator_name(actor))
    click.echo(f"agency {agency_id} registered. Give these to the agency now; they are not shown again.")
    click.echo(f"signing secret (HMAC-SHA256): {c.secret}")
    click.echo(f"redis user: {c.redis_user}  password: {c.redis_password}")
    click.echo("then re-render the Redis ACL: quorum registry redis-acl --out <aclfile> && redis-cli ACL LOAD")


@agency_group.command("suspend")
@click.argument("agency_id")
@click.option("--reason", required=True)
@actor_option
@_coded
def agency_suspend(agency_id: str, reason: str, actor: str | None) -> None:
    from quorum import registry

    registry.set_agency_status(_engine(), agency_id, "suspended", actor=operator_name(actor), reason=reason)
    click.echo(f"agency {agency_id} suspended")


@agency_group.command("activate")
@click.argument("agency_id")
@click.option("--reason", default="")
@actor_option
@_coded
def agency_activate(agency_id: str, reason: str, actor: str | None) -> None:
    from quorum import registry

    registry.set_agency_status(_engine(), agency_id, "active", actor=operator_name(actor), reason=reason)
    click.echo(f"agency {agency_id} active")


@agency_group.command("quota")
@click.argument("agency_id")
@click.argument("daily_quota", type=int)
@actor_option
@_coded
def agency_quota(agency_id: str, daily_quota: int, actor: str | None) -> None:
    from quorum import registry

    registry.set_agency_quota(_engine(), agency_id, daily_quota, actor=operator_name(actor))
    click.echo(f"agency {agency_id}: {daily_quota or 'unlimited'} searches per day")


@agency_group.command("rotate")
@click.argument("agency_id")
@actor_option
@_coded
def agency_rotate(agency_id: str, actor: str | None) -> None:
    """New signing secret and Redis password (printed once); the old ones stop working."""
    from quorum import registry

    c = registry.rotate_credentials(_engine(), agency_id, actor=operator_name(actor))
    click.echo(f"signing secret (HMAC-SHA256): {c.secret}")
    click.echo(f"redis user: {c.redis_user}  password: {c.redis_password}")


@registry_group.group("user")
def user_group() -> None:
    """Users: investigator, supervisor, auditor, operator."""


@user_group.command("add")
@click.argument("user_id")
@click.option("--agency", required=True)
@click.option("--role", required=True, type=click.Choice(["investigator", "supervisor", "auditor", "operator"]))
@click.option("--cert", "cert_id", default=None, help="face-search training certificate id")
@click.option("--cert-expires", type=click.DateTime(["%Y-%m-%d"]), default=None)
@actor_option
@_coded
def user_add(user_id: str, agency: str, role: str, cert_id: str | None, cert_expires, actor: str | None) -> None:
    from quorum import registry

    registry.add_user(_engine(), user_id, agency, role, cert_id=cert_id,
                      cert_expires=cert_expires.date() if cert_expires else None, actor=operator_name(actor))
    click.echo(f"user {user_id} ({role}, {agency}) registered")


@user_group.command("certify")
@click.argument("user_id")
@click.option("--cert", "cert_id", required=True)
@click.option("--expires", type=click.DateTime(["%Y-%m-%d"]), required=True)
@actor_option
@_coded
def user_certify(user_id: str, cert_id: str, expires, actor: str | None) -> None:
    from quorum import registry

    registry.certify_user(_engine(), user_id, cert_id, expires.date(), actor=operator_name(actor))
    click.echo(f"user {user_id}: certificate {cert_id} valid through {expires.date()}")


@user_group.command("deactivate")
@click.argument("user_id")
@actor_option
@_coded
def user_deactivate(user_id: str, actor: str | None) -> None:
    from quorum import registry

    registry.set_user_active(_engine(), user_id, False, actor=operator_name(actor))
    click.echo(f"user {user_id} deactivated")


@registry_group.command("offence")
@click.argument("code")
@click.option("--description", default="")
@actor_option
@_coded
def offence_add(code: str, description: str, actor: str | None) -> None:
    """Add an offence code."""
    from quorum import registry

    registry.add_offence(_engine(), code, description, actor=operator_name(actor))
    click.echo(f"offence {code} registered")


@registry_group.command("purpose")
@click.argument("code")
@click.option("--allowed/--refused", required=True)
@click.option("--description", default="")
@actor_option
@_coded
def purpose_set(code: str, allowed: bool, description: str, actor: str | None) -> None:
    """Declare a purpose allowed or refused."""
    from quorum import registry

    registry.set_purpose(_engine(), code, allowed, description, actor=operator_name(actor))
    click.echo(f"purpose {code}: {'allowed' if allowed else 'refused'}")


@registry_group.command("list")
def registry_list() -> None:
    """Print the registry (no secrets)."""
    from quorum import registry

    snap = registry.snapshot(_engine())
    click.echo(f"registry version {snap.version}")
    for a in snap.agencies.values():
        click.echo(f"agency  {a.id:<20} {a.status:<10} quota={a.daily_quota or 'unlimited'}  {a.name}")
    for u in snap.users.values():
        click.echo(f"user    {u.id:<20} {u.agency_id:<16} {u.role:<12} cert={u.cert_id or '-'} "
                   f"expires={u.cert_expires or '-'}{'' if u.active else '  INACTIVE'}")
    for code in sorted(snap.offences):
        click.echo(f"offence {code}")
    for code, allowed in sorted(snap.purposes.items()):
        click.echo(f"purpose {code:<24} {'allowed' if allowed else 'REFUSED'}")


@registry_group.command("redis-acl")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--service-user", default="", help="also define the services' user and turn 'default' off")
@click.option("--service-password-sha256", default="")
def redis_acl(out: Path | None, service_user: str, service_password_sha256: str) -> None:
    """Render the Redis ACL file (one user per agency) from the registry."""
    from quorum import registry

    text = registry.render_redis_acl(_engine(), service_user=service_user,
                                     service_password_sha256=service_password_sha256)
    _emit(text, out)


# ---- audit -----------------------------------------------------------------------------------------

@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail."""


@audit_group.command("verify")
@click.option("--no-anchors", is_flag=True, help="check the chain only, not its anchors in the object store")
def audit_verify(no_anchors: bool) -> None:
    """Recompute the hash chain and check the anchors; exit 1 at the first broken record."""
    from quorum import audit

    s = settings()
    rep = audit.verify(_engine(), None if no_anchors else audit.open_anchors(s))
    click.echo(rep.summary())
    sys.exit(0 if rep.ok else 1)


@audit_group.command("anchor")
@actor_option
def audit_anchor(actor: str | None) -> None:
    """Write the chain head to the object store (write-once / object lock)."""
    from quorum import audit

    doc = audit.anchor(_engine(), audit.open_anchors(settings()), actor=operator_name(actor))
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
    from quorum import audit

    rows = audit.query(_engine(), agency=agency, actor=actor, case_number=case_number, request_id=request_id,
                       action=action, since=since, until=until, limit=limit)
    for r in rows:
        if as_json:
            click.echo(json.dumps(r, default=str))
        else:
            why = "/".join(x for x in (r["case_number"], r["offence_code"], r["purpose"]) if x)
            click.echo(f"{r['seq']:>7} {r['ts']} {r['action']:<22} {r['outcome']:<9} {r['code']:<22} "
                       f"agency={r['agency'] or '-'} user={r['actor'] or '-'} req={r['request_id'] or '-'} {why}")


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
    from quorum import report

    rep = report.usage(_engine(), since, until)
    text = report.to_markdown(rep) if fmt == "md" else report.to_csv(rep)
    _emit(text, out)


# ---- dispositions ------------------------------------------------------------------------------------

@click.group("disposition")
def disposition_group() -> None:
    """What happened after a search (a lead needs a second user's confirmation)."""


@disposition_group.command("record")
@click.argument("request_id")
@click.option("--outcome", required=True,
              type=click.Choice(["no_lead", "lead_pursued", "candidate_excluded", "inconclusive", "not_reviewed"]))
@click.option("--candidate", default="", help="the subject id concerned (lead_pursued, candidate_excluded)")
@click.option("--note", default="")
@click.option("--user", "user_id", required=True)
@_coded
def disposition_record(request_id: str, outcome: str, candidate: str, note: str, user_id: str) -> None:
    from quorum import dispositions

    d = dispositions.record(_engine(), request_id, outcome, user_id, candidate=candidate, note=note)
    click.echo(dispositions.to_json(d))
    if d.status == "pending":
        click.echo(f"awaiting confirmation by a second certified user: "
                   f"quorum disposition confirm {d.id} --user <other user>")


@disposition_group.command("confirm")
@click.argument("disposition_id", type=int)
@click.option("--user", "user_id", required=True)
@_coded
def disposition_confirm(disposition_id: int, user_id: str) -> None:
    from quorum import dispositions

    click.echo(dispositions.to_json(dispositions.confirm(_engine(), disposition_id, user_id)))


@disposition_group.command("list")
@click.option("--request", "request_id", default=None)
@click.option("--agency", default=None)
def disposition_list(request_id: str | None, agency: str | None) -> None:
    from quorum import dispositions

    for d in dispositions.list_for(_engine(), request_id=request_id, agency=agency):
        click.echo(json.dumps(d, default=str))


# ---- case holds and probe retention ------------------------------------------------------------------

@click.group("case")
def case_group() -> None:
    """Case holds: a held case's probe images survive the retention purge."""


@case_group.command("hold")
@click.argument("case_number")
@click.option("--agency", required=True)
@click.option("--reason", required=True)
@actor_option
def case_hold(case_number: str, agency: str, reason: str, actor: str | None) -> None:
    from quorum import retention

    retention.hold(_engine(), agency, case_number, reason=reason, actor=operator_name(actor))
    click.echo(f"case {case_number} ({agency}) on hold")


@case_group.command("release")
@click.argument("case_number")
@click.option("--agency", required=True)
@click.option("--reason", default="")
@actor_option
@_coded
def case_release(case_number: str, agency: str, reason: str, actor: str | None) -> None:
    from quorum import retention

    retention.release(_engine(), agency, case_number, reason=reason, actor=operator_name(actor))
    click.echo(f"case {case_number} ({agency}) released")


@case_group.command("list")
def case_list() -> None:
    from quorum import retention

    for h in retention.holds(_engine()):
        click.echo(json.dumps(h))


@click.group("probes")
def probes_group() -> None:
    """Probe images in the object store."""


@probes_group.command("purge")
@click.option("--days", default=None, type=int, help="retention (default: QUORUM_PROBE_RETENTION_DAYS)")
@click.option("--dry-run", is_flag=True)
@actor_option
def probes_purge(days: int | None, dry_run: bool, actor: str | None) -> None:
    """Delete probe images past retention unless their case is on hold (each deletion audited)."""
    from quorum import retention
    from quorum.objectstore import open_store

    s = settings()
    rep = retention.purge(_engine(), open_store(s), s.probe_retention_days if days is None else days,
                          actor=operator_name(actor), dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(rep.deleted)}; kept {rep.kept} within retention, {len(rep.held)} held by a case, "
               f"{len(rep.unreferenced)} never submitted")


ALL_GROUPS = (db_group, registry_group, audit_group, report_group, disposition_group, case_group, probes_group)
