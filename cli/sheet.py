"""``quorum sheet REQUEST_ID``: the candidate sheet of a finished search, as one self-contained HTML file.

The probe with its faces boxed, the candidates' enrolled images in rank order with each engine's rank
and score, the investigative-lead notice at top and bottom (``review.sheet``). Writing it is audited
(``search.viewed``). ``quorum search ... --sheet FILE`` writes the same sheet when the list comes back.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..core.config import settings
from .common import CliError, os_operator


def check_out(out: Path, option: str = "--out") -> None:
    """Fail before any work (and any audit record) when the sheet could not be written there."""
    folder = out.resolve().parent
    if not folder.is_dir():
        raise CliError(f"{option}: folder {folder} does not exist")
    if out.is_dir():
        raise CliError(f"{option}: {out} is a folder; name the HTML file to write")


def write(
    request_id: str,
    out: Path,
    *,
    on_behalf_of: str = "",
    agency: str | None = None,
    via: str = "cli",
    err: bool = False,
) -> None:
    """Write the sheet and say where, with what it holds. Audited as this machine's operator
    (``os_operator``), for ``on_behalf_of`` when named (a user of the search's agency)."""
    from ..review.gather import write_sheet

    check_out(out)
    try:
        sheet = write_sheet(
            settings(), request_id, out, actor=os_operator(), agency=agency, via=via, on_behalf_of=on_behalf_of
        )
    except OSError as exc:
        raise CliError(f"could not write {out}: {exc.strerror or exc}") from exc
    removed = f", {sheet.removed} removed from the gallery" if sheet.removed else ""
    click.echo(
        f"wrote {out} (candidate sheet of request {request_id}: {sheet.candidates} candidates{removed})", err=err
    )


@click.command("sheet")
@click.argument("request_id")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="the HTML file to write (default: sheet-REQUEST_ID.html here)",
)
@click.option("--agency", default=None, help="the agency that searched (needed only when two used the same id)")
@click.option(
    "--for",
    "--actor",
    "on_behalf_of",
    default="",
    help="the registered user of the search's agency this sheet is for (audited as on behalf of; the actor "
    "recorded is always this machine's account)",
)
def sheet(request_id: str, out: Path | None, agency: str | None, on_behalf_of: str) -> None:
    """Write the candidate sheet of search REQUEST_ID (a self-contained HTML file; the view is audited)."""
    write(request_id, out or Path(f"sheet-{request_id}.html"), on_behalf_of=on_behalf_of, agency=agency)


COMMANDS = (sheet,)
