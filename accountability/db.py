"""The relational database behind the registry, the audit trail, dispositions and case holds.

One schema for both back ends: PostgreSQL in deployment (``QUORUM_DATABASE_URL=
postgresql+psycopg://user@host/db``), SQLite as the embedded default (``<home>/quorum.db`` when the
setting is empty). The tables are declared once here (SQLAlchemy Core) and created by the Alembic
migrations in ``quorum/migrations/``; :func:`get_engine` runs any pending migration the first time a
process opens a database (``quorum db upgrade`` does it on demand).

Serialising writers. Several processes append to the audit chain at once (the gateway, the fusion
and intake workers, the CLI). Every write transaction therefore takes a database-wide write lock:

* PostgreSQL: ``pg_advisory_xact_lock(WRITE_LOCK_KEY)``, held until the transaction ends;
* SQLite: every transaction starts with ``BEGIN IMMEDIATE`` (the database's single write lock),
  with a 30 s busy timeout and WAL journal so readers are not blocked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Connection

from ..core.config import Settings

WRITE_LOCK_KEY = 0x51554F52  # "QUOR": the advisory lock every PostgreSQL writer takes

metadata = MetaData()

agencies = Table(
    "agencies",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("name", Text, nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),  # active | suspended
    Column("member", Boolean, nullable=False, server_default="1"),
    Column("daily_quota", Integer, nullable=False, server_default="0"),  # 0: unlimited
    Column("secret", Text, nullable=False),  # HMAC key of the agency's submissions
    Column("redis_password_sha256", Text, nullable=False, server_default=""),
    Column("created_at", String(32), nullable=False),
)

users = Table(
    "users",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("agency_id", String(128), nullable=False, index=True),
    Column("role", String(16), nullable=False),  # investigator | supervisor | auditor | operator
    Column("cert_id", Text, nullable=True),
    Column("cert_expires", Date, nullable=True),
    Column("active", Boolean, nullable=False, server_default="1"),
    Column("created_at", String(32), nullable=False),
)

offences = Table(
    "offences",
    metadata,
    Column("code", String(32), primary_key=True),
    Column("description", Text, nullable=False, server_default=""),
)

purposes = Table(
    "purposes",
    metadata,
    Column("code", String(64), primary_key=True),
    Column("allowed", Boolean, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
)

registry_meta = Table(
    "registry_meta",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),  # bumped by every registry change
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("ts", String(32), nullable=False, index=True),  # ISO 8601 UTC, microseconds, "Z"
    Column("actor", Text, nullable=False),
    Column("agency", Text, nullable=False),
    Column("action", String(64), nullable=False),
    Column("request_id", Text, nullable=False),
    Column("case_number", Text, nullable=False),
    Column("offence_code", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("probe_sha256", Text, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("code", String(64), nullable=False),
    Column("details", Text, nullable=False),  # canonical JSON
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_log_request_action", "request_id", "action"),  # migration 0002
)

case_holds = Table(
    "case_holds",
    metadata,
    Column("agency_id", String(128), primary_key=True),
    Column("case_number", String(64), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("held_by", Text, nullable=False),
    Column("held_at", String(32), nullable=False),
)

dispositions = Table(
    "dispositions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("request_id", String(128), nullable=False, index=True),
    Column("agency_id", String(128), nullable=False),
    Column("case_number", Text, nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("candidate", Text, nullable=False, server_default=""),
    Column("note", Text, nullable=False, server_default=""),
    Column("status", String(16), nullable=False),  # final | pending | confirmed
    Column("recorded_at", String(32), nullable=False),
    Column("confirmed_by", Text, nullable=False, server_default=""),
    Column("confirmed_at", String(32), nullable=False, server_default=""),
)


def database_url(s: Settings) -> str:
    """``QUORUM_DATABASE_URL``, or SQLite at ``<home>/quorum.db``."""
    if getattr(s, "database_url", ""):
        return s.database_url
    return f"sqlite:///{Path(s.home) / 'quorum.db'}"


def is_postgres(conn: Connection | Engine) -> bool:
    return conn.dialect.name == "postgresql"


_engines: dict[str, Engine] = {}
_redis_urls: dict[Engine, str] = {}  # engine -> the Redis that keeps its audit head (accountability.audit_head)
_lock = threading.Lock()


def _sqlite_engine(url: str) -> Engine:
    path = url.split("sqlite:///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    eng = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(eng, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # let BEGIN below (not pysqlite) open transactions
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout = 30000")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.close()

    @event.listens_for(eng, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return eng


def get_engine(target: Settings | str, *, migrate: bool = True) -> Engine:
    """The process's engine for a database (cached per URL); pending migrations run on first use."""
    url = target if isinstance(target, str) else database_url(target)
    with _lock:
        eng = _engines.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                eng = _sqlite_engine(url)
            else:
                eng = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
            if migrate:
                upgrade(eng)
            _engines[url] = eng
        if not isinstance(target, str) and target.redis_url:
            _redis_urls[eng] = target.redis_url
        return eng


def redis_url_for(eng: Engine) -> str:
    """The Redis whose audit head this database's writers advance: the settings' ``redis_url`` of the
    last :func:`get_engine` call with settings for it; empty for an engine opened by URL alone."""
    with _lock:
        return _redis_urls.get(eng, "")


def dispose_all() -> None:
    """Forget every cached engine (tests; after fork)."""
    with _lock:
        for eng in _engines.values():
            eng.dispose()
        _engines.clear()
        _redis_urls.clear()


_AFTER_COMMIT = "quorum.after_commit"


@contextmanager
def write_tx(eng: Engine) -> Iterator[Connection]:
    """A transaction holding the database-wide write lock (see the module docstring). Callables given
    to :func:`after_commit` run once it has committed (not if it rolled back)."""
    hooks: list[Callable[[], None]] = []
    with eng.begin() as conn:
        if is_postgres(conn):
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITE_LOCK_KEY})
        conn.info[_AFTER_COMMIT] = hooks
        try:
            yield conn
        finally:
            conn.info.pop(_AFTER_COMMIT, None)
    for fn in hooks:
        fn()


def after_commit(conn: Connection, fn: Callable[[], None]) -> None:
    """Run ``fn`` once the :func:`write_tx` transaction of ``conn`` has committed."""
    hooks = conn.info.get(_AFTER_COMMIT)
    if hooks is None:
        raise RuntimeError("after_commit outside db.write_tx")
    hooks.append(fn)


def _alembic_config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).resolve().parent / "migrations"))
    cfg.attributes["connection"] = conn
    return cfg


def upgrade(eng: Engine, revision: str = "head") -> None:
    """Run pending migrations, serialised against other processes doing the same."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)  # no chatter on every process start
    from alembic import command

    with write_tx(eng) as conn:
        command.upgrade(_alembic_config(conn), revision)


def current_revision(eng: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with eng.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
