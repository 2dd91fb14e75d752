"""Session fixtures: real Redis, real S3 (radosgw), and the Quorum stack as real worker processes."""

from __future__ import annotations

import pytest

from quorum.config import load_settings
from quorum.stack import Stack
from tests.integration.servers import RedisServer, S3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("radosgw")).start()
    yield server
    server.stop()


def _stack(tmp_path_factory, name, **overrides):
    home = tmp_path_factory.mktemp(name)
    redis_server = RedisServer(home / "redis").start()
    s = load_settings(env={}, home=str(home), redis_url=redis_server.url, **overrides)
    stack = Stack(s)
    try:
        stack.up(timeout=300)
    except Exception:
        stack.down()
        redis_server.stop()
        raise
    return s, stack, redis_server


@pytest.fixture(scope="session")
def s3_stack(tmp_path_factory, s3_server):
    """The full stack on a real S3 server; the main accuracy run uses it."""
    s, stack, redis_server = _stack(
        tmp_path_factory, "stack-s3", s3_endpoint=s3_server.env["S3_ENDPOINT"],
        s3_access_key=s3_server.env["S3_ACCESS_KEY"], s3_secret_key=s3_server.env["S3_SECRET_KEY"],
        s3_bucket="quorum-test")
    yield s
    stack.down()
    redis_server.stop()


@pytest.fixture(scope="session")
def disk_stack(tmp_path_factory):
    """The stack on the embedded disk store, with a short fusion deadline for the degraded tests."""
    s, stack, redis_server = _stack(tmp_path_factory, "stack-disk", fusion_deadline_s=8.0)
    yield s
    stack.down()
    redis_server.stop()
