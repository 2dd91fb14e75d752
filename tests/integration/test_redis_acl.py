"""The second wall: a real redis-server loaded with the ACL file rendered from the registry
(`quorum registry redis-acl`). Agency A can write its own intake stream and read its own results,
and nothing of agency B's; a suspended agency cannot log in at all."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.broker.keys import as_str
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    home = tmp_path_factory.mktemp("acl")
    db.dispose_all()
    eng = db.get_engine(f"sqlite:///{home / 'quorum.db'}")
    creds = {a: registry.add_agency(eng, a, a.upper()) for a in ("a", "b", "c")}
    registry.set_agency_status(eng, "c", "suspended", reason="test")
    aclfile = home / "users.acl"
    aclfile.write_text(registry.render_redis_acl(eng))
    port = free_port()
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed"
    subprocess.run(
        [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(home),
            "--pidfile",
            str(home / "redis.pid"),
            "--logfile",
            str(home / "redis.log"),
            "--aclfile",
            str(aclfile),
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline, (home / "redis.log").read_text()[-2000:]
            time.sleep(0.05)
    admin = redis.Redis(host="127.0.0.1", port=port)
    for agency in ("a", "b"):  # what the services would have published
        admin.xadd(keys.results_stream(agency), {"type": "error", "request_id": "r1", "payload": "{}"})
        admin.set(keys.result_key(agency, "r1"), f"result of {agency}")
    yield port, creds, admin
    with contextlib.suppress(redis.RedisError):
        admin.shutdown(nosave=True)
    db.dispose_all()


def _as(port, creds, agency) -> redis.Redis:
    c = creds[agency]
    return redis.Redis(
        host="127.0.0.1", port=port, username=c.redis_user, password=c.redis_password, retry=Retry(NoBackoff(), 0)
    )


def test_agency_can_do_its_own_business(acl_redis):
    port, creds, admin = acl_redis
    a = _as(port, creds, "a")
    assert a.ping()
    a.xadd(keys.intake_stream("a"), {"payload": "{}"})
    assert admin.xlen(keys.intake_stream("a")) == 1
    assert a.get(keys.result_key("a", "r1")) == b"result of a"
    assert a.mget([keys.result_key("a", "r1")]) == [b"result of a"]
    assert a.xread({keys.results_stream("a"): "0"})
    # The Python client works with exactly these rights.
    url = f"redis://{creds['a'].redis_user}:{creds['a'].redis_password}@127.0.0.1:{port}/0"
    client = QuorumClient(url, "a", "u1", secret="not-checked-here")
    entry = client.submit_raw('{"hello": 1}')
    assert admin.xlen(keys.intake_stream("a")) == 2
    assert client.redis.get(keys.result_key("a", "r1")) == b"result of a"
    # What the client needs after a Redis restart: is my request claimed, is my entry still waiting?
    admin.set(keys.request_key("a", "r1"), "1-1")
    assert client.redis.mget([keys.request_key("a", "r1")]) == [b"1-1"]
    assert [as_str(e) for e, _ in client.redis.xrange(keys.intake_stream("a"), entry, entry)] == [entry]
    assert client.resubmit_lost(["r1"], {}) == []  # (it has no payload of r1 to send: nothing to do)


@pytest.mark.parametrize(
    "attempt",
    [
        lambda r: r.xadd(keys.intake_stream("b"), {"payload": "{}"}),  # write another agency's intake
        lambda r: r.get(keys.result_key("b", "r1")),  # read another agency's result
        lambda r: r.mget([keys.result_key("b", "r1")]),
        lambda r: r.xread({keys.results_stream("b"): "0"}),  # read another agency's result stream
        lambda r: r.xread({keys.intake_stream("a"): "0"}),  # read its own intake (XRANGE only)
        lambda r: r.xrange(keys.intake_stream("b")),  # look into another agency's intake
        lambda r: r.get(keys.request_key("b", "r1")),  # another agency's request claims
        lambda r: r.xadd(keys.results_stream("a"), {"forged": "result"}),  # forge its own result
        lambda r: r.set(keys.result_key("a", "r2"), "forged"),
        lambda r: r.delete(keys.intake_stream("a")),
        lambda r: r.keys("*"),
        lambda r: r.hgetall(keys.GALLERY_SUBJECTS),
        lambda r: r.flushall(),
        lambda r: r.config_get("*"),
    ],
)
def test_agency_cannot_touch_anything_else(acl_redis, attempt):
    port, creds, admin = acl_redis
    with pytest.raises(redis.exceptions.NoPermissionError):
        attempt(_as(port, creds, "a"))
    assert admin.get(keys.result_key("a", "r2")) is None
    assert admin.exists(keys.intake_stream("b")) == 0


def test_wrong_password_and_suspended_agency_cannot_log_in(acl_redis):
    port, creds, _ = acl_redis
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(
            host="127.0.0.1",
            port=port,
            username=creds["a"].redis_user,
            password=creds["b"].redis_password,
            retry=Retry(NoBackoff(), 0),
        ).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        _as(port, creds, "c").ping()
