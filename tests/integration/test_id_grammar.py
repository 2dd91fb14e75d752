"""The id grammar on a real local stack (its own redis-server, started with the ACL file rendered from the
registry; SFace only): agency ids that would widen or break the ACL are refused by `quorum registry agency
add` with INVALID_ID and reach neither the registry nor Redis; the ACL rendered from a registry holding such
ids (stored before the grammar) loads in a fresh redis-server; a change that cannot reach Redis is
reported, retried by `redis-acl --apply`, and shown by the gateway's quorum_redis_acl_stale; hostile
subject ids in `quorum enroll` fail with INVALID_ID while the rest of the batch enrols."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.cli.stack import ROLES, Stack, settings_env
from quorum.core import local_redis
from quorum.core.config import load_settings
from quorum.evaluation.ci_split import read_split
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

RLO = "\u202e"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("ids")
    port = free_port()
    base = free_port(span=len(ROLES))
    s = load_settings(env={}, home=str(home), redis_url=f"redis://127.0.0.1:{port}/0", engines="sface")
    st = Stack(s)
    try:
        st.up(timeout=300, metrics_base=base)
        assert st.owns_redis()
        yield st.s, port, base + ROLES.index("gateway")
    finally:
        st.down()


def _admin(s, port: int) -> redis.Redis:
    pw = local_redis.read_passwords(s.home)["admin"]
    return redis.Redis(port=port, username="admin", password=pw, retry=Retry(NoBackoff(), 0), socket_timeout=10)


def _quorum(s, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _password(out: str) -> str:
    m = re.search(r"password: (\S+)", out)
    assert m, out
    return m.group(1)


def _agency_users(r: redis.Redis) -> set[str]:
    return {u.decode() for u in r.execute_command("ACL", "USERS") if u.decode().startswith("agency-")}


def test_agency_ids_that_would_widen_or_break_the_acl_are_refused(stack):
    s, port, _ = stack
    admin = _admin(s, port)
    for bad in ("lasd:east", "a b", "LASD", "lasd*"):
        out = _quorum(s, "registry", "agency", "add", bad, "--name", "X")
        assert out.returncode == 2, (out.stdout, out.stderr)
        assert "INVALID_ID" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "signing secret" not in out.stdout
    assert registry.snapshot(db.get_engine(s)).agencies == {}
    assert _agency_users(admin) == set()
    # ... and the registry changes after them still reach Redis: add, then suspend.
    out = _quorum(s, "registry", "agency", "add", "lasd", "--name", "LASD")
    assert out.returncode == 0, out.stderr
    assert admin.acl_getuser("agency-lasd")["enabled"] is True
    assert _quorum(s, "registry", "agency", "suspend", "lasd", "--reason", "test").returncode == 0
    assert admin.acl_getuser("agency-lasd")["enabled"] is False
    assert _quorum(s, "registry", "agency", "activate", "lasd").returncode == 0
    # A neighbour whose id starts like lasd's: lasd's password reads neither its results nor its intake.
    lasd = _password(_quorum(s, "registry", "agency", "rotate", "lasd").stdout)
    assert _quorum(s, "registry", "agency", "add", "lasd-east", "--name", "East").returncode == 0
    admin.set(keys.result_key("lasd-east", "r1"), "east's candidates")
    admin.set(keys.result_key("lasd", "r1"), "lasd's candidates")
    as_lasd = redis.Redis(port=port, username="agency-lasd", password=lasd, retry=Retry(NoBackoff(), 0))
    assert as_lasd.get(keys.result_key("lasd", "r1")) == b"lasd's candidates"
    for attempt in (
        lambda: as_lasd.get(keys.result_key("lasd-east", "r1")),
        lambda: as_lasd.xread({keys.results_stream("lasd-east"): "0"}),
        lambda: as_lasd.xadd(keys.intake_stream("lasd-east"), {"payload": "{}"}),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def _legacy_agency(eng, agency_id: str) -> None:
    """A row stored before add_agency enforced the grammar."""
    with db.write_tx(eng) as conn:
        conn.execute(
            db.agencies.insert().values(
                id=agency_id,
                name="legacy",
                status="active",
                member=True,
                daily_quota=0,
                secret="x",
                redis_password_sha256="ab" * 32,
                created_at="2026-01-01T00:00:00Z",
            )
        )


def test_stored_bad_ids_leave_the_acl_loadable_and_confined(stack, tmp_path):
    s, port, _ = stack
    eng = db.get_engine(s)
    admin = _admin(s, port)
    for bad in ("lasd:east", "a b"):
        _legacy_agency(eng, bad)
    # What the old code had put in Redis for lasd:east (its user could read under lasd's results' prefix).
    admin.execute_command("ACL", "SETUSER", "agency-lasd:east", "on", ">pw", "~quorum:result:lasd:east:*", "+get")
    out = _quorum(s, "registry", "redis-acl", "--apply")
    assert out.returncode == 0, out.stderr
    assert "warning: agency 'lasd:east' has no Redis user" in out.stderr and "'a b'" in out.stderr
    assert "agency-lasd:east" not in _agency_users(admin)  # revoked, not left as it was
    assert _agency_users(admin) >= {"agency-lasd", "agency-lasd-east"}
    # The local stack's ACL file, rendered from this registry, loads in a fresh redis-server.
    aclfile = local_redis.acl_file(s.home)
    assert "lasd:east" not in aclfile.read_text() and "a b" not in aclfile.read_text()
    fresh_port = free_port()
    exe = shutil.which("redis-server")
    assert exe
    pidfile = tmp_path / "redis.pid"
    subprocess.run(
        [exe, "--bind", "127.0.0.1", "--port", str(fresh_port), "--daemonize", "yes", "--pidfile", str(pidfile),
         "--dir", str(tmp_path), "--save", "", "--logfile", str(tmp_path / "redis.log"), "--aclfile", str(aclfile)],
        check=True,
    )  # fmt: skip
    try:
        fresh = None
        for _ in range(100):
            try:
                fresh = _admin(s, fresh_port)
                fresh.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert fresh is not None and fresh.ping(), (tmp_path / "redis.log").read_text()[-2000:]
        assert _agency_users(fresh) == {"agency-lasd", "agency-lasd-east"}
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def _gauge(port: int) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r"^quorum_redis_acl_stale (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _wait_gauge(port: int, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _gauge(port) != value:
        assert time.monotonic() < deadline, f"quorum_redis_acl_stale never {value}: {_gauge(port)}"
        time.sleep(1)


def test_a_change_that_cannot_reach_redis_is_reported_retried_and_alerted(stack):
    s, port, gateway_metrics = stack
    admin = _admin(s, port)
    assert _quorum(s, "registry", "redis-acl", "--apply").returncode == 0
    _wait_gauge(gateway_metrics, 0.0)
    pid = int(local_redis.pid_file(s.home).read_text())
    os.kill(pid, signal.SIGSTOP)  # Redis hangs: connections open, nothing answers
    try:
        out = _quorum(s, "registry", "agency", "suspend", "lasd-east", "--reason", "test", timeout=90)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "REDIS_ACL_NOT_APPLIED" in out.stderr and "redis-acl --apply" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert registry.snapshot(db.get_engine(s)).agencies["lasd-east"].status == "suspended"  # the change is saved
    assert admin.acl_getuser("agency-lasd-east")["enabled"] is True  # ... and Redis does not have it yet
    assert registry.AclWatch(s, admin).stale()
    _wait_gauge(gateway_metrics, 1.0)  # the gateway says so (alert QuorumRedisAclStale)
    out = _quorum(s, "registry", "redis-acl", "--apply")  # the retry
    assert out.returncode == 0, out.stderr
    assert admin.acl_getuser("agency-lasd-east")["enabled"] is False
    assert not registry.AclWatch(s, admin).stale()
    _wait_gauge(gateway_metrics, 0.0)


def test_hostile_subject_ids_fail_with_invalid_id_and_the_rest_enrols(stack, data_dir, tmp_path):
    s, port, _ = stack
    rows = [r for r in read_split(data_dir / "ci") if r.role == "gallery"][:8]
    hostile = ['"><script>', "../../", f"evil{RLO}gnp.exe", "\u0410aron_Peirsol", "a b", ".hidden"]
    lines = ["subject_id,image"]
    lines += [f"{r.identity},{r.path}" for r in rows[:2]]
    lines += [f'"{sid}",{r.path}' for sid, r in zip(hostile, rows[2:], strict=True)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = _quorum(s, "enroll", "--manifest", str(manifest), "--snapshot-every", "0", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and RLO not in out.stdout
    assert "templates added: {'sface': 2}" in out.stdout, out.stdout
    assert out.stdout.count("INVALID_ID") == len(hostile), out.stdout
    subjects = {k.decode() for k in _admin(s, port).hkeys(keys.GALLERY_SUBJECTS)}
    assert {r.identity for r in rows[:2]} <= subjects
    assert not subjects & set(hostile)
