"""The local stack's own Redis is not open (core.local_redis): a stack that starts its redis-server itself
runs it with an ACL file where ``default`` is off, each agency has its user and each process logs in as
its role's service user (accountability.registry.SERVICE_ACL, the rights compose uses too). The whole
pipeline runs under those rights: enrolment, a search through the agency's own user, restart."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.stack import SUPERVISOR, Stack, stack_roles
from quorum.core import local_redis
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.schemas.messages import CandidateList
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

GALLERY = 8  # ci gallery images enrolled (sface only: the test is about rights, not accuracy)


def _redis(port: int, **kw) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), socket_timeout=10, **kw)


@pytest.fixture(scope="module")
def acl_stack(tmp_path_factory, data_dir):
    from quorum.gallery.enrol import enrol

    home = tmp_path_factory.mktemp("acl-stack")
    port = free_port()
    s = load_settings(env={}, home=str(home), redis_url=f"redis://127.0.0.1:{port}/0", engines="sface")
    assert s.redis_url == f"redis://127.0.0.1:{port}/0"  # nothing runs there yet: used as it is
    st = Stack(s)
    try:
        st.up(timeout=300)
        assert st.owns_redis() and local_redis.url_user(st.s.redis_url) == "admin"
        s = st.s
        rows = read_split(data_dir / "ci")
        enrolled = [r for r in rows if r.role == "gallery"][:GALLERY]
        enrol(s, open_store(s), [(r.identity, r.path) for r in enrolled])
        eng = db.get_engine(s)
        creds = {}
        for agency in ("lapd", "sfpd"):  # added while the stack runs: their users must reach Redis now
            creds[agency] = registry.add_agency(eng, agency, agency.upper())
            registry.provision(
                eng, agency, users={f"{agency}-inv": "investigator"}, offences=("PC211",), purposes=("investigation",)
            )
        assert registry.sync_local_redis(s) == ["agency-lapd", "agency-sfpd"]
        known = {r.identity for r in enrolled}
        probes = [r.path for r in rows if r.role == "probe" and r.identity in known]
        yield s, st, port, creds, probes
    finally:
        st.down()


def _agency_url(port: int, c) -> str:
    return local_redis.with_credentials(f"redis://127.0.0.1:{port}/0", c.redis_user, c.redis_password)


def _search(url: str, agency: str, secret: str, probe: Path) -> tuple[QuorumClient, str, object]:
    client = QuorumClient(url, agency, f"{agency}-inv", secret)
    rid = client.submit(probe, case_number="ACL-1", offence_code="PC211", purpose="investigation")
    return client, rid, client.wait(rid, timeout=120)


def test_a_connection_without_credentials_is_refused(acl_stack):
    s, _, port, _, _ = acl_stack
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # what any local process can do
        sock.sendall(b"HGETALL quorum:gallery:subjects\r\nKEYS *\r\nAUTH default x\r\n")
        data = b""
        while data.count(b"\r\n") < 3:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
    lines = data.decode().splitlines()
    assert lines[0].startswith("-NOAUTH") and lines[1].startswith("-NOAUTH"), lines
    assert lines[2].startswith("-WRONGPASS"), lines
    with pytest.raises(redis.AuthenticationError):
        _redis(port).get(keys.GALLERY_SUBJECTS)
    # ... while the stack's admin (the operator's commands in this home) reads the gallery it enrolled.
    assert _redis(port, username="admin", password=local_redis.read_passwords(s.home)["admin"]).hlen(
        keys.GALLERY_SUBJECTS
    )


def test_the_agency_user_searches_and_reads_only_its_own(acl_stack):
    s, _, port, creds, probes = acl_stack
    eng = db.get_engine(s)
    lapd_url = _agency_url(port, creds["lapd"])
    client, rid, result = _search(lapd_url, "lapd", registry.agency_secret(eng, "lapd") or "", probes[0])
    assert isinstance(result, CandidateList), result
    assert result.candidates
    assert client.redis.get(keys.result_key("lapd", rid))
    # The fusion worker wrote the search's last audit record, as `worker`, and moved the audit head in Redis
    # past it (accountability.audit_head): its rights cover the head.
    from quorum.accountability import audit, audit_head

    answered = max(int(r["seq"]) for r in audit.query(eng, request_id=rid, action=audit.SEARCH_RESULT))
    head = audit_head.OutsideHead(s.redis_url)
    deadline = time.monotonic() + 10
    while (head.read() or audit_head.Head(0, "", "")).seq < answered:
        assert time.monotonic() < deadline, (head.read(), answered)
        time.sleep(0.2)
    # sfpd's user cannot see lapd's answer, nor the gallery, nor write lapd's intake.
    sfpd = redis.Redis.from_url(_agency_url(port, creds["sfpd"]), retry=Retry(NoBackoff(), 0))
    for attempt in (
        lambda: sfpd.get(keys.result_key("lapd", rid)),
        lambda: sfpd.xread({keys.results_stream("lapd"): "0"}),
        lambda: sfpd.xadd(keys.intake_stream("lapd"), {"payload": "{}"}),
        lambda: sfpd.hgetall(keys.GALLERY_SUBJECTS),
        lambda: sfpd.keys("*"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_an_operator_command_in_the_same_home_logs_in_as_admin(acl_stack):
    s, _, port, _, probes = acl_stack
    plain = f"redis://127.0.0.1:{port}/0"
    admin_url = load_settings(env={}, home=s.home, redis_url=plain).redis_url
    assert local_redis.url_user(admin_url) == "admin"
    # another home (or another server) is left as configured
    assert load_settings(env={}, home=s.home + "-other", redis_url=plain).redis_url == plain
    _, _, result = _search(admin_url, "lapd", registry.agency_secret(db.get_engine(s), "lapd") or "", probes[-1])
    assert isinstance(result, CandidateList), result


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat_ = (d / "stat").read_text()
                ppid = int(stat_.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = {pid}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _local_ports(pids: set[int], server_port: int) -> set[int]:
    """The local ports of the TCP connections these processes hold to ``server_port``."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
                    if m:
                        inodes.add(m.group(1))
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote, inode = f[1], f[2], f[9]
        if inode in inodes and int(remote.split(":")[1], 16) == server_port:
            ports.add(int(local.split(":")[1], 16))
    return ports


def test_every_process_runs_under_its_own_user(acl_stack):
    s, st, port, _, _ = acl_stack
    admin = redis.Redis.from_url(s.redis_url)
    clients = admin.client_list()
    users = {c["user"] for c in clients}
    assert "default" not in users
    assert {"gateway", "worker"} <= users, users
    by_port = {int(c["addr"].rsplit(":", 1)[1]): c["user"] for c in clients}
    for role in stack_roles(s):
        pid = int((st.run_dir / f"{role}-0.pid").read_text())
        ports = _local_ports(_descendants(pid), port)
        assert ports, f"{role} holds no connection to Redis"
        seen = {by_port.get(p) for p in ports} - {None}
        assert seen == {local_redis.role_user(role)}, (role, seen)
    # Not one command of a service was refused by its rights over the whole pipeline (enrolment,
    # searches, heartbeats, Celery's own bookkeeping): the key patterns of SERVICE_ACL suffice.
    refused = [e for e in admin.acl_log(count=1000) if e.get("username") in local_redis.SERVICE_USERS]
    assert not refused, refused


def test_secrets_are_private_and_in_no_argument_environment_or_log(acl_stack):
    s, st, _, _, _ = acl_stack
    home = Path(s.home)
    assert stat.S_IMODE(local_redis.secrets_dir(home).stat().st_mode) == 0o700
    for f in (local_redis.passwords_file(home), *local_redis.secrets_dir(home).glob("redis-*.url")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    passwords = list(local_redis.read_passwords(home).values())
    assert len(passwords) == len(local_redis.SERVICE_USERS)
    acl = local_redis.acl_file(home).read_text()
    assert "user default off" in acl and "user agency-lapd on" in acl
    pids = {int(p.read_text()) for p in st.run_dir.glob("*-0.pid")}
    assert len(pids) == len(stack_roles(s)) + 1  # and the supervisor
    ps = subprocess.run(["ps", "-e", "e", "-ww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
    logs = "".join(f.read_text(errors="replace") for f in (home / "logs").iterdir())
    for pid in set().union(*(_descendants(p) for p in pids)):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert not any(pw.encode() in environ for pw in passwords), f"a password in the environment of {pid}"
    for pw in passwords:
        assert pw not in ps, "a password in the arguments or environment of a process"
        assert pw not in logs, "a password in the logs"
    # A worker's environment names its own URL file only; the supervisor's the admin one.
    for role, user in (("intake", "worker"), ("gateway", "gateway"), (SUPERVISOR, "admin")):
        pid = int((st.run_dir / f"{role}-0.pid").read_text())
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        assert "QUORUM_REDIS_URL" not in env
        assert env["QUORUM_REDIS_URL_FILE"] == str(local_redis.url_file(home, user))


def test_the_review_user_reads_results_and_keeps_its_sessions_only(acl_stack):
    """What `quorum review` does on the local stack (it logs in as `review`: cli/review.py)."""
    from quorum.review import signin

    s, _, port, creds, probes = acl_stack
    url = local_redis.service_url(s.home, s.redis_url, "review")
    assert url and local_redis.url_user(url) == "review"
    r = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0))
    eng = db.get_engine(s)
    _, rid, result = _search(
        _agency_url(port, creds["lapd"]), "lapd", registry.agency_secret(eng, "lapd") or "", probes[1]
    )
    assert isinstance(result, CandidateList)
    assert r.get(keys.result_key("lapd", rid))
    assert r.hmget(keys.GALLERY_SUBJECTS, [result.candidates[0].subject_id])[0]
    admin = redis.Redis.from_url(s.redis_url)
    token = signin.issue_token(admin, eng, "lapd-inv", actor="test", ttl_s=60)  # the operator's command
    session, _ = signin.sign_in(r, eng, token)
    assert signin.reviewer(r, eng, session).user_id == "lapd-inv"
    signin.sign_out(r, session)
    for attempt in (lambda: r.hgetall(keys.GALLERY_SUBJECTS), lambda: r.set(keys.result_key("lapd", rid), "x")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    # The review app writes audit records (views, decisions) and so moves the audit head: it may run the
    # head's script (an equal seq moves nothing).
    from quorum.accountability import audit_head

    head = audit_head.OutsideHead(url)
    now = head.read()
    assert now is not None and head.advance(now.seq, now.hash, now.ts) is False


def test_a_process_the_supervisor_restarts_logs_in_as_its_own_user_again(acl_stack):
    s, st, port, _, _ = acl_stack
    pidfile = st.run_dir / "fusion-0.pid"
    first = int(pidfile.read_text())
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # the supervisor (logged in as admin) starts it again, as `worker`
        pid = st._alive(pidfile)
        if pid and pid != first and _local_ports(_descendants(pid), port):
            break
        assert time.monotonic() < deadline, "fusion was not restarted with a Redis connection"
        time.sleep(0.5)
    environ = Path(f"/proc/{pid}/environ").read_text()
    assert f"QUORUM_REDIS_URL_FILE={local_redis.url_file(s.home, 'worker')}\0" in environ
    users = {
        c["user"]
        for c in redis.Redis.from_url(s.redis_url).client_list()
        if int(c["addr"].rsplit(":", 1)[1]) in _local_ports(_descendants(pid), port)
    }
    assert users == {"worker"}, users


def test_a_suspended_agency_is_locked_out_at_once(acl_stack):
    s, _, port, creds, _ = acl_stack
    eng = db.get_engine(s)
    sfpd = _redis(port, username=creds["sfpd"].redis_user, password=creds["sfpd"].redis_password)
    assert sfpd.ping()
    registry.set_agency_status(eng, "sfpd", "suspended", reason="test")
    registry.sync_local_redis(s)
    with pytest.raises(redis.RedisError):  # its open connection is closed, a new one refused
        sfpd.ping()
    with pytest.raises(redis.AuthenticationError):
        _redis(port, username=creds["sfpd"].redis_user, password=creds["sfpd"].redis_password).ping()
    assert "user agency-sfpd off" in local_redis.acl_file(s.home).read_text()  # the next start loads it so


def test_a_restart_keeps_passwords_users_and_data(acl_stack):
    """Down and up again: the same passwords, the ACL file regenerated from the registry, and the data
    of the append-only file all there (with ``default`` at -@all, Redis 7.0 dropped every MULTI/EXEC of
    the AOF at start, the gallery with them)."""
    s, st, port, creds, probes = acl_stack
    before = local_redis.read_passwords(s.home)
    admin = redis.Redis.from_url(s.redis_url)
    subjects = admin.hlen(keys.GALLERY_SUBJECTS)
    enrolled = admin.scard(keys.gallery_enrolled("sface"))
    assert subjects and enrolled
    admin.close()
    assert "redis" in st.down()
    assert not st.owns_redis()
    st.up(timeout=300)
    assert local_redis.read_passwords(s.home) == before
    admin = redis.Redis.from_url(st.s.redis_url)
    assert (admin.hlen(keys.GALLERY_SUBJECTS), admin.scard(keys.gallery_enrolled("sface"))) == (subjects, enrolled)
    assert "AOF-loading-client" not in (Path(s.home) / "logs" / "redis.log").read_text()
    with pytest.raises(redis.AuthenticationError):  # suspended before the restart: still off
        _redis(port, username=creds["sfpd"].redis_user, password=creds["sfpd"].redis_password).ping()
    _, _, result = _search(
        _agency_url(port, creds["lapd"]), "lapd", registry.agency_secret(db.get_engine(s), "lapd") or "", probes[0]
    )
    assert isinstance(result, CandidateList), result


def test_redis_memory_is_bounded_and_an_agency_cannot_write_a_huge_value(acl_stack):
    """The local stack's redis-server runs as compose's does: maxmemory set, nothing evicted, and no
    single value over 64 MB (an agency's 150 MB field is refused by Redis before it is stored)."""
    s, _, port, creds, _ = acl_stack
    admin = redis.Redis.from_url(s.redis_url)
    cfg = {k: admin.config_get(k)[k] for k in ("maxmemory", "maxmemory-policy", "proto-max-bulk-len")}
    assert cfg == {"maxmemory": str(2 * 2**30), "maxmemory-policy": "noeviction", "proto-max-bulk-len": str(64 * 2**20)}
    stream = keys.intake_stream("lapd")
    before = admin.xinfo_stream(stream)["last-generated-id"] if admin.exists(stream) else None
    agency = _redis(port, username=creds["lapd"].redis_user, password=creds["lapd"].redis_password)
    with pytest.raises((redis.ConnectionError, redis.ResponseError)):
        agency.xadd(stream, {"payload": b"x" * (150 * 2**20)})
    after = admin.xinfo_stream(stream)["last-generated-id"] if admin.exists(stream) else None
    assert after == before
