"""The audit trail's backup and restore, as deploy/README.md tells an operator to do it: deploy/backup.sh
(pg_dump / pg_restore) on the real local PostgreSQL, then `quorum audit verify` (chain and anchors) on the
restored database. Also the PostgreSQL roles script the compose deployment runs at first start
(deploy/postgres/init-roles.sh): the services' role owns the database and can migrate it.

PostgreSQL must be reachable (QUORUM_TEST_PG, as for tests/unit/accountability_db.py); a throwaway
database (and throwaway roles) per test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from quorum.accountability import audit, db, registry
from tests.integration.servers import RedisServer
from tests.unit.accountability_db import PG_BASE

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BACKUP = ROOT / "deploy" / "backup.sh"


def libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _pg_env() -> dict[str, str]:
    u = urlsplit(libpq(PG_BASE))
    env = {"PGHOST": u.hostname or "127.0.0.1", "PGPORT": str(u.port or 5432), "PGUSER": u.username or "postgres"}
    if u.password:
        env["PGPASSWORD"] = u.password
    return env


@pytest.fixture
def database():
    name = f"quorum_backup_{uuid.uuid4().hex[:10]}"
    dsn = libpq(PG_BASE) + "/postgres"
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is unreachable at {PG_BASE} ({exc}); set QUORUM_TEST_PG")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield name, admin
    db.dispose_all()
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(autouse=True)
def redis_head(tmp_path):
    """Each test's own redis-server: the audit head (accountability.audit_head) the CLI's writes move and
    `quorum audit verify` checks completeness against."""
    global REDIS_URL
    server = RedisServer(tmp_path / "redis").start()
    REDIS_URL = server.url
    yield server
    server.stop()


REDIS_URL = ""


def quorum(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUORUM_HOME": str(home), "QUORUM_DATABASE_URL": url, "QUORUM_OPERATOR": "test"}
    env["QUORUM_REDIS_URL"] = REDIS_URL
    env.pop("QUORUM_SETTINGS", None)
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def backup_sh(*args: str, database: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_pg_env(), "PG_EXEC": "", "PGDATABASE": database}
    return subprocess.run(["sh", str(BACKUP), *args], env=env, capture_output=True, text=True, timeout=120)


def test_audit_trail_backup_and_restore_verifies(database, tmp_path):
    name, _ = database
    url = f"{PG_BASE}/{name}"
    home = tmp_path / "home"  # the anchors live in its object store (disk here, MinIO in compose)
    db.dispose_all()
    eng = db.get_engine(url)
    registry.provision(eng, "lasd", users={"inv-1": "investigator"}, offences=("PC211",), purposes=("ci",))
    registry.add_agency(eng, "nypd", "NYPD", actor="op")
    db.dispose_all()
    anchored = quorum(home, url, "audit", "anchor")
    assert anchored.returncode == 0, anchored.stderr
    before = quorum(home, url, "audit", "verify")
    assert before.returncode == 0, before.stdout + before.stderr
    with psycopg.connect(libpq(url)) as conn:
        rows_before = conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq").fetchall()
    assert len(rows_before) >= 5

    dump = tmp_path / "postgres.dump"
    made = backup_sh("backup-postgres", str(dump), database=name)
    assert made.returncode == 0, made.stderr
    assert dump.stat().st_size > 0

    # Disaster: the database loses everything.
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    lost = quorum(home, url, "audit", "verify")
    assert lost.returncode != 0  # anchors name records the (now empty) chain no longer has

    restored = backup_sh("restore-postgres", str(dump), database=name)
    assert restored.returncode == 0, restored.stderr
    with psycopg.connect(libpq(url)) as conn:
        assert conn.execute("SELECT seq, hash FROM audit_log ORDER BY seq").fetchall() == rows_before
    after = quorum(home, url, "audit", "verify")
    assert after.returncode == 0, after.stdout + after.stderr
    assert after.stdout == before.stdout  # same records, same head, same anchors checked

    # The service keeps writing to the restored trail (the chain continues from the restored head).
    db.dispose_all()
    registry.add_agency(db.get_engine(url), "lapd", "LAPD", actor="op")
    db.dispose_all()
    assert quorum(home, url, "audit", "anchor").returncode == 0
    assert quorum(home, url, "audit", "verify").returncode == 0


def test_restoring_a_backup_older_than_the_latest_anchor_is_reported(database, tmp_path):
    """Records written after the backup are lost by the restore; the anchors say so (`truncated`)."""
    name, _ = database
    url = f"{PG_BASE}/{name}"
    home = tmp_path / "home"
    db.dispose_all()
    registry.add_agency(db.get_engine(url), "lasd", "LASD", actor="op")
    db.dispose_all()
    dump = tmp_path / "old.dump"
    assert backup_sh("backup-postgres", str(dump), database=name).returncode == 0
    registry.add_agency(db.get_engine(url), "nypd", "NYPD", actor="op")
    db.dispose_all()
    assert quorum(home, url, "audit", "anchor").returncode == 0
    assert backup_sh("restore-postgres", str(dump), database=name).returncode == 0
    report = quorum(home, url, "audit", "verify")
    assert report.returncode == 1
    assert "truncated" in report.stdout
    # The chain itself is intact; the audit head in Redis (moved by the anchor's record) says the newest
    # records are gone, until the operator records the loss.
    assert quorum(home, url, "audit", "verify", "--no-anchors", "--no-head").returncode == 0
    cut = quorum(home, url, "audit", "verify", "--no-anchors")
    assert cut.returncode == 1 and "newest records were deleted" in cut.stdout, cut.stdout + cut.stderr
    reset = quorum(home, url, "audit", "head-reset", "--reason", "restored old.dump")
    assert reset.returncode == 0, reset.stdout + reset.stderr
    after = quorum(home, url, "audit", "verify", "--no-anchors")
    assert after.returncode == 0 and "the outside head confirms the last record" in after.stdout, after.stdout
    db.dispose_all()
    (rec,) = audit.query(db.get_engine(url), action=audit.HEAD_RESET)
    assert json.loads(rec["details"])["reason"] == "restored old.dump" and json.loads(rec["details"])["replaced_seq"]


def test_init_roles_makes_the_services_role_owner_and_the_exporter_a_monitor(database, tmp_path):
    name, admin = database
    suffix = uuid.uuid4().hex[:8]
    app_role, exporter_role = f"quorum_t{suffix}", f"exporter_t{suffix}"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "postgres-app-password").write_text("app-pw\n")
    (secrets / "postgres-exporter-password").write_text("exp-pw\n")
    pg = _pg_env()
    env = {
        **os.environ,
        **pg,
        "POSTGRES_USER": pg["PGUSER"],
        "POSTGRES_DB": name,
        "QUORUM_SECRETS": str(secrets),
        "QUORUM_APP_ROLE": app_role,
        "QUORUM_EXPORTER_ROLE": exporter_role,
    }
    try:
        proc = subprocess.run(
            ["sh", str(ROOT / "deploy" / "postgres" / "init-roles.sh")], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        owner = admin.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,)).fetchone()
        assert owner == (app_role,)
        member = admin.execute("SELECT pg_has_role(%s, 'pg_monitor', 'MEMBER')", (exporter_role,)).fetchone()
        assert member == (True,)
        # The services' role migrates the schema and writes the audit trail.
        u = urlsplit(libpq(PG_BASE))
        url = f"postgresql+psycopg://{app_role}:app-pw@{u.hostname}:{u.port or 5432}/{name}"
        upgraded = quorum(tmp_path / "home", url, "db", "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr
        db.dispose_all()
        registry.add_agency(db.get_engine(url), "lasd", "LASD", actor="op")
        db.dispose_all()
        # Nothing here wrote through a writer that knows the Redis (registry by URL alone): the head is empty,
        # and verify says it cannot confirm completeness (3), the chain being intact.
        assert quorum(tmp_path / "home", url, "audit", "verify").returncode == 3
        assert quorum(tmp_path / "home", url, "audit", "verify", "--no-head").returncode == 0
    finally:
        db.dispose_all()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        for role in (app_role, exporter_role):
            admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        admin.execute(f'CREATE DATABASE "{name}"')  # the fixture drops it again


def test_redis_snapshot_restore_rebuilds_the_aof(tmp_path):
    """deploy/redis/restore-snapshot.sh on a real redis-server with AOF on, as compose runs it: the
    restored server holds the snapshot's keys and streams (consumer group and pending entries
    included), not what was written after it, and keeps them across a restart (they are in the AOF)."""
    import redis

    from tests.integration.servers import RedisServer, free_port

    server = RedisServer(tmp_path / "redis", aof=True).start()
    r = redis.Redis(port=server.port)
    r.set("quorum:job:r1", "{}")
    r.xadd("quorum:intake:lasd", {"payload": "p1"})
    r.xgroup_create("quorum:intake:lasd", "gateways", id="0")
    r.xreadgroup("gateways", "g1", {"quorum:intake:lasd": ">"})  # one pending entry
    r.bgsave()  # as deploy/backup.sh backup-redis does
    while r.info("persistence")["rdb_bgsave_in_progress"]:
        time.sleep(0.05)
    assert r.info("persistence")["rdb_last_bgsave_status"] == "ok"
    snapshot = (tmp_path / "redis" / "dump.rdb").read_bytes()
    r.set("quorum:job:r2", "{}")  # after the backup
    server.stop()
    server.wait_down()

    proc = subprocess.run(
        ["sh", str(ROOT / "deploy" / "redis" / "restore-snapshot.sh"), str(tmp_path / "redis")],
        input=snapshot,
        env={**os.environ, "RUN_AS": "", "PORT": str(free_port())},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "redis" / "appendonlydir" / "appendonly.aof.manifest").is_file()
    for _ in range(2):  # restored, then restarted once more: the data is in the AOF
        server = RedisServer(tmp_path / "redis", aof=True)
        server.start()
        r = redis.Redis(port=server.port)
        try:
            assert r.get("quorum:job:r1") == b"{}" and r.get("quorum:job:r2") is None
            assert r.xpending("quorum:intake:lasd", "gateways")["pending"] == 1
        finally:
            server.stop()
            server.wait_down()
        (tmp_path / "redis" / "dump.rdb").unlink(missing_ok=True)  # the second start reads the AOF only
