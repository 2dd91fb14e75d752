"""Alembic environment: migrations run on the connection handed over by ``accountability.db.upgrade``."""

from __future__ import annotations

from alembic import context

from quorum.accountability.db import metadata

conn = context.config.attributes.get("connection")
if conn is None:  # pragma: no cover - always driven from accountability.db
    raise RuntimeError("run migrations through `quorum db upgrade` (accountability.db.upgrade)")
context.configure(connection=conn, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
