"""Jinja2 rendering of review pages. Autoescaping is on for every template: subject ids, case numbers
and any other value reach the page as text, never as markup."""

from __future__ import annotations

from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from .sheet import Sheet


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("quorum.review", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["signed"] = lambda v, digits=2: "" if v is None else f"{v:+.{digits}f}"
    return env


def render(sheet: Sheet, review: dict[str, Any] | None = None) -> str:
    """The self-contained HTML of a candidate sheet (images inline, no script, no outside reference).

    ``review`` (``quorum review`` only): the signed-in user, the session's form token, the dispositions
    recorded per candidate and the decisions offered; adds the decision forms to each candidate."""
    return environment().get_template("sheet.html.j2").render(sheet=sheet, review=review)
