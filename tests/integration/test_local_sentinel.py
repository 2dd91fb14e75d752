"""`quorum up` with ``QUORUM_LOCAL_SENTINEL=true``: the local stack starts a Sentinel topology on loopback
(the primary, a replica, three sentinels, every data node with the ACL file), hands every process a
``redis+sentinel://`` URL of its own user, keeps searching through a failover, heals the topology on the
next ``up`` (the old primary back as a replica), and ``down`` stops all of it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis as redis_lib

from quorum.accountability import db, registry
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack
from quorum.core import local_redis
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration


def _primary_port(topo: dict) -> int:
    for sport in topo["sentinels"]:
        try:
            return int(redis_lib.Redis(port=sport).sentinel_get_master_addr_by_name(topo["master"])[1])
        except redis_lib.RedisError:
            continue
    raise AssertionError("no sentinel answers")


def _role(port: int, password: str) -> str:
    return redis_lib.Redis(port=port, username="admin", password=password).info("replication")["role"]


def test_the_local_stack_runs_behind_sentinel_and_follows_a_failover(tmp_path, data_dir):
    port = free_port(span=5)
    s = load_settings(
        env={}, home=str(tmp_path), redis_url=f"redis://127.0.0.1:{port}/0", local_sentinel=True, engines=("sface",)
    )
    stack = Stack(s)
    try:
        stack.up(timeout=300)
        topo = local_redis.topology(tmp_path)
        assert topo == {
            "primary": port,
            "replica": port + 1,
            "sentinels": [port + 2, port + 3, port + 4],
            "master": "quorum",
        }
        assert stack.s.redis_url.startswith("redis+sentinel://admin:")
        for user in ("gateway", "worker"):
            assert local_redis.url_file(tmp_path, user).read_text().startswith(f"redis+sentinel://{user}:")
        admin_pw = local_redis.read_passwords(tmp_path)["admin"]
        assert _role(port, admin_pw) == "master" and _role(port + 1, admin_pw) == "slave"
        # The replica knows the agencies' users too (the ACL is not replicated: pushed to each node).
        secret = registry.provision(
            db.get_engine(stack.s),
            "sentpd",
            users={"sentpd-inv": "investigator"},
            offences=("PC211",),
            purposes=("investigation",),
        )
        assert registry.sync_local_redis(stack.s) == ["agency-sentpd"]  # what `quorum registry ...` runs
        for node in (port, port + 1):
            users = redis_lib.Redis(port=node, username="admin", password=admin_pw).execute_command("ACL", "USERS")
            assert b"agency-sentpd" in users, node
        rows = read_split(data_dir / "ci")
        gallery = [r for r in rows if r.role == "gallery"][:6]
        enrol(stack.s, open_store(stack.s), [(r.identity, r.path) for r in gallery])
        probe = next(r for r in rows if r.role == "probe" and r.identity == gallery[0].identity)
        client = QuorumClient(stack.s.redis_url, "sentpd", "sentpd-inv", secret)

        def search(case: str):
            rid = client.submit(probe.path, case_number=case, offence_code="PC211", purpose="investigation")
            return client.wait(rid, timeout=240)

        first = search("S-1")
        assert isinstance(first, CandidateList) and first.candidates[0].subject_id == gallery[0].identity
        # The primary dies: the sentinels promote the replica, and every process follows.
        os.kill(int(local_redis.pid_file(tmp_path).read_text()), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _primary_port(topo) != port + 1:
            assert time.monotonic() < deadline, "no failover"
            time.sleep(0.5)
        after = search("S-2")
        assert isinstance(after, CandidateList) and after.candidates[0].subject_id == gallery[0].identity
        assert stack.status()["redis"] == "up"
        # The next `up` starts the dead node again: it rejoins as a replica of the new primary.
        Stack(s).up(timeout=300)
        deadline = time.monotonic() + 60
        while True:
            try:
                if _role(port, admin_pw) == "slave":
                    break
            except redis_lib.RedisError:
                pass
            assert time.monotonic() < deadline, "the old primary did not rejoin as a replica"
            time.sleep(0.5)
    finally:
        pids = local_redis.topology_pid_files(tmp_path)  # read before down removes the topology's record
        stack.down()
    assert len(pids) == 5
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "down left part of the topology running"


def _alive(pidfile) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False
