"""Database fixtures for the registry/audit unit tests: every test runs on SQLite and on the real
local PostgreSQL (a throwaway database per test session; each test starts from an empty schema).

PostgreSQL must be reachable (``QUORUM_TEST_PG``, default ``postgresql+psycopg://postgres@127.0.0.1:5432``):
the tests fail, not skip, when it is not, since CI has it.
"""

from __future__ import annotations

import os
import uuid

import pytest

from quorum.accountability import db

PG_BASE = os.environ.get("QUORUM_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


@pytest.fixture(scope="session")
def pg_database():
    import psycopg

    name = f"quorum_test_{uuid.uuid4().hex[:10]}"
    dsn = PG_BASE.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {PG_BASE} ({exc}); the registry and audit tests need it "
            "(set QUORUM_TEST_PG to a server where this user may CREATE DATABASE)"
        )
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_BASE}/{name}"
    db.dispose_all()
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def eng(request, tmp_path):
    """A migrated, empty database of each kind."""
    db.dispose_all()
    if request.param == "sqlite":
        yield db.get_engine(f"sqlite:///{tmp_path / 'quorum.db'}")
    else:
        url = request.getfixturevalue("pg_database")
        raw = db.get_engine(url, migrate=False)
        with raw.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA public CASCADE")
            conn.exec_driver_sql("CREATE SCHEMA public")
        db.dispose_all()
        yield db.get_engine(url)
    db.dispose_all()
