"""``quorum case hold | release | list`` and ``quorum probes purge``: how long probe images are kept.

A held case's probe images survive the retention purge; every hold, release and deletion is audited.
"""

from __future__ import annotations

import json

import click

from ..core.config import settings
from .common import actor_option, db_engine, operator_name


@click.group("case")
def case_group() -> None:
    """Case holds: a held case's probe images survive the retention purge."""


@case_group.command("hold")
@click.argument("case_number")
@click.option("--agency", required=True)
@click.option("--reason", required=True)
@actor_option
def case_hold(case_number: str, agency: str, reason: str, actor: str | None) -> None:
    from ..accountability import retention

    retention.hold(db_engine(), agency, case_number, reason=reason, actor=operator_name(actor))
    click.echo(f"case {case_number} ({agency}) on hold")


@case_group.command("release")
@click.argument("case_number")
@click.option("--agency", required=True)
@click.option("--reason", default="")
@actor_option
def case_release(case_number: str, agency: str, reason: str, actor: str | None) -> None:
    from ..accountability import retention

    retention.release(db_engine(), agency, case_number, reason=reason, actor=operator_name(actor))
    click.echo(f"case {case_number} ({agency}) released")


@case_group.command("list")
def case_list() -> None:
    from ..accountability import retention

    for h in retention.holds(db_engine()):
        click.echo(json.dumps(h))


@click.group("probes")
def probes_group() -> None:
    """Probe images in the object store."""


@probes_group.command("purge")
@click.option("--days", default=None, type=int, help="retention (default: QUORUM_PROBE_RETENTION_DAYS)")
@click.option("--dry-run", is_flag=True)
@actor_option
def probes_purge(days: int | None, dry_run: bool, actor: str | None) -> None:
    """Delete probe images past retention unless their case is on hold (each deletion audited), and the
    kept copies of answers past QUORUM_RESULT_TTL_S."""
    from ..accountability import retention
    from ..core.objectstore import open_store

    s = settings()
    rep = retention.purge(
        db_engine(),
        open_store(s),
        s.probe_retention_days if days is None else days,
        actor=operator_name(actor),
        dry_run=dry_run,
    )
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {len(rep.deleted)}; kept {rep.kept} within retention, {len(rep.held)} held by a case, "
        f"{len(rep.unreferenced)} never submitted"
    )
    kept = retention.purge_results(db_engine(), open_store(s), s.result_ttl_s, dry_run=dry_run)
    click.echo(
        f"answers kept in the store: {verb} {len(kept.deleted)} past QUORUM_RESULT_TTL_S; kept {kept.kept}"
        + (f", {len(kept.unanswered)} without an audited answer (left alone)" if kept.unanswered else "")
    )


COMMANDS = (case_group, probes_group)
