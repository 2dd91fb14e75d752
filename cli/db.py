"""``quorum db upgrade``: the registry and audit database's schema."""

from __future__ import annotations

import click

from ..core.config import settings


@click.group("db")
def db_group() -> None:
    """The registry and audit database (SQLite by default, PostgreSQL via QUORUM_DATABASE_URL)."""


@db_group.command("upgrade")
def db_upgrade() -> None:
    """Run pending migrations (they also run automatically on first use)."""
    from ..accountability import db

    s = settings()
    eng = db.get_engine(s, migrate=False)
    db.upgrade(eng)
    click.echo(f"{db.database_url(s).split('@')[-1]}: at revision {db.current_revision(eng)}")


COMMANDS = (db_group,)
