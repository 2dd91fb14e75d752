"""``quorum disposition record | confirm | list``: what happened after a search.

A lead pursued needs a second certified user's confirmation (see ``accountability.dispositions``).
"""

from __future__ import annotations

import json

import click

from .common import db_engine


@click.group("disposition")
def disposition_group() -> None:
    """What happened after a search (a lead needs a second user's confirmation)."""


@disposition_group.command("record")
@click.argument("request_id")
@click.option(
    "--outcome",
    required=True,
    type=click.Choice(["no_lead", "lead_pursued", "candidate_excluded", "inconclusive", "not_reviewed"]),
)
@click.option("--candidate", default="", help="the subject id concerned (lead_pursued, candidate_excluded)")
@click.option("--note", default="")
@click.option("--user", "user_id", required=True)
def disposition_record(request_id: str, outcome: str, candidate: str, note: str, user_id: str) -> None:
    from ..accountability import dispositions

    d = dispositions.record(db_engine(), request_id, outcome, user_id, candidate=candidate, note=note)
    click.echo(dispositions.to_json(d))
    if d.status == "pending":
        click.echo(
            f"awaiting confirmation by a second certified user: quorum disposition confirm {d.id} --user <other user>"
        )


@disposition_group.command("confirm")
@click.argument("disposition_id", type=int)
@click.option("--user", "user_id", required=True)
def disposition_confirm(disposition_id: int, user_id: str) -> None:
    from ..accountability import dispositions

    click.echo(dispositions.to_json(dispositions.confirm(db_engine(), disposition_id, user_id)))


@disposition_group.command("list")
@click.option("--request", "request_id", default=None)
@click.option("--agency", default=None)
def disposition_list(request_id: str | None, agency: str | None) -> None:
    from ..accountability import dispositions

    for d in dispositions.list_for(db_engine(), request_id=request_id, agency=agency):
        click.echo(json.dumps(d, default=str))


COMMANDS = (disposition_group,)
