"""``quorum disposition record | confirm | list``: what happened after a search.

A lead pursued needs a second certified user's confirmation (see ``accountability.dispositions``). The
CLI acts as its operator (``cli.common.os_operator``: the machine's account, audited as the actor) on
behalf of ``--user``, under the review app's rules: a candidate must be on the search's sheet, and one
operator cannot both record and confirm a lead (``SECOND_PERSON_REQUIRED``), whatever users they name.
"""

from __future__ import annotations

import json

import click

from ..core.config import settings
from .common import db_engine, os_operator


@click.group("disposition")
def disposition_group() -> None:
    """What happened after a search (a lead needs a second person's confirmation)."""


def _shown(eng, request_id: str, user_id: str) -> dict[str, int]:
    """The candidates the sheet of the user's agency's search shows (as the review app offers them)."""
    from ..accountability.registry import snapshot
    from ..broker.redis_errors import connect
    from ..core.objectstore import open_store
    from ..review.gather import shown_candidates

    s = settings()
    user = snapshot(eng).users.get(user_id)
    return shown_candidates(s, connect(s.redis_url), eng, request_id, user.agency_id if user else None, open_store(s))


@disposition_group.command("record")
@click.argument("request_id")
@click.option(
    "--outcome",
    required=True,
    type=click.Choice(["no_lead", "lead_pursued", "candidate_excluded", "inconclusive", "not_reviewed"]),
)
@click.option("--candidate", default="", help="the subject id concerned (lead_pursued, candidate_excluded)")
@click.option("--note", default="")
@click.option("--user", "user_id", required=True, help="the certified user the decision is recorded for")
def disposition_record(request_id: str, outcome: str, candidate: str, note: str, user_id: str) -> None:
    from ..accountability import dispositions

    eng = db_engine()
    shown = _shown(eng, request_id, user_id) if candidate else None
    d = dispositions.record(
        eng, request_id, outcome, user_id, candidate=candidate, note=note, actor=os_operator(), via="cli", shown=shown
    )
    click.echo(dispositions.to_json(d))
    if d.status == "pending":
        click.echo(
            f"awaiting confirmation by a second certified user, through another operator or the review app: "
            f"quorum disposition confirm {d.id} --user <other user>"
        )


@disposition_group.command("confirm")
@click.argument("disposition_id", type=int)
@click.option("--user", "user_id", required=True, help="the certified user confirming, recorded as on behalf of")
def disposition_confirm(disposition_id: int, user_id: str) -> None:
    from ..accountability import dispositions

    d = dispositions.confirm(db_engine(), disposition_id, user_id, actor=os_operator(), via="cli")
    click.echo(dispositions.to_json(d))


@disposition_group.command("list")
@click.option("--request", "request_id", default=None)
@click.option("--agency", default=None)
def disposition_list(request_id: str | None, agency: str | None) -> None:
    from ..accountability import dispositions

    for d in dispositions.list_for(db_engine(), request_id=request_id, agency=agency):
        click.echo(json.dumps(d, default=str))


COMMANDS = (disposition_group,)
