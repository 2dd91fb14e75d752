"""Session fixtures: real Redis, real S3 (radosgw), and the Quorum stack as real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quorum.cli.stack import ROLES, Stack, stack_roles
from quorum.core.config import load_settings
from tests.integration.servers import RedisServer, S3Server, free_port


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("radosgw")).start()
    yield server
    server.stop()


def _stack(tmp_path_factory, name, metrics_base=0, **overrides):
    home = tmp_path_factory.mktemp(name)
    redis_server = RedisServer(home / "redis").start()
    s = load_settings(env={}, home=str(home), redis_url=redis_server.url, **overrides)
    stack = Stack(s)
    try:
        stack.up(timeout=300, metrics_base=metrics_base)
    except Exception:
        stack.down()
        redis_server.stop()
        raise
    return s, stack, redis_server


@dataclass
class OwnStack:
    """A stack a fault test may break: its own redis-server (AOF on), settings, processes, an agency."""

    s: Any
    stack: Stack
    redis_server: RedisServer
    client: Any  # broker.client.QuorumClient of the agency
    probes: list[Path]  # ci probes of people enrolled in the gallery


@contextmanager
def own_stack(home: Path, data_dir: Path, *, agency: str, gallery: int, **overrides: Any) -> Iterator[OwnStack]:
    """Start a stack of its own under ``home`` (``overrides``: settings), enrol the first ``gallery`` ci
    gallery images, register ``agency`` with one investigator, and stop it all on the way out. The
    services open agency secrets with the key file this process uses, as a deployment points every
    service at one file."""
    from quorum.accountability import db, registry, sealing
    from quorum.broker.client import QuorumClient
    from quorum.core.objectstore import open_store
    from quorum.evaluation.ci_split import read_split
    from quorum.gallery.enrol import enrol

    redis_server = RedisServer(home / "redis", aof=True).start()
    s = load_settings(env={}, home=str(home), redis_url=redis_server.url, **overrides)
    s = s.model_copy(update={"secrets_key_file": str(sealing.key_file_for(db.get_engine(s)))})
    st = Stack(s)
    try:
        st.up(timeout=300)
        rows = read_split(data_dir / "ci")
        enrolled = [r for r in rows if r.role == "gallery"][:gallery]
        enrol(s, open_store(s), [(r.identity, r.path) for r in enrolled])
        user = f"{agency}-inv"
        secret = registry.provision(
            db.get_engine(s), agency, users={user: "investigator"}, offences=("PC211",), purposes=("investigation",)
        )
        known = {r.identity for r in enrolled}
        probes = [r.path for r in rows if r.role == "probe" and r.identity in known]
        yield OwnStack(s, st, redis_server, QuorumClient(s.redis_url, agency, user, secret), probes)
    finally:
        st.down()
        redis_server.stop()


@pytest.fixture(scope="session")
def s3_stack(tmp_path_factory, s3_server):
    """The full stack on a real S3 server, logging JSON; the main accuracy run uses it."""
    s, stack, redis_server = _stack(
        tmp_path_factory,
        "stack-s3",
        log_json=True,
        s3_endpoint=s3_server.env["S3_ENDPOINT"],
        s3_access_key=s3_server.env["S3_ACCESS_KEY"],
        s3_secret_key=s3_server.env["S3_SECRET_KEY"],
        s3_bucket="quorum-test",
    )
    yield s
    stack.down()
    redis_server.stop()


@pytest.fixture(scope="session")
def _disk(tmp_path_factory):
    base = free_port(span=len(ROLES))
    s, stack, redis_server = _stack(tmp_path_factory, "stack-disk", metrics_base=base, fusion_deadline_s=8.0)
    # The processes this stack runs (the configured engines, not every engine there is) and their ports.
    yield s, {role: base + ROLES.index(role) for role in stack_roles(s)}
    stack.down()
    redis_server.stop()


@pytest.fixture(scope="session")
def disk_stack(_disk):
    """The stack on the embedded disk store, with a short fusion deadline for the degraded tests."""
    return _disk[0]


@pytest.fixture(scope="session")
def disk_metrics_ports(_disk):
    """Each process of the disk stack serves /metrics on its own loopback port: role -> port."""
    return _disk[1]


@pytest.fixture(scope="session")
def member_client(disk_stack):
    """Factory: register (idempotently) a member agency with a certified investigator, offence PC211 and
    the purpose "investigation", and return a client that signs with the agency's secret."""
    from quorum.accountability import db, registry
    from quorum.broker.client import QuorumClient

    def make(agency: str, user: str | None = None) -> QuorumClient:
        user = user or f"{agency}-inv"  # user ids are global: one agency each
        secret = registry.provision(
            db.get_engine(disk_stack),
            agency,
            users={user: "investigator"},
            offences=("PC211",),
            purposes=("investigation",),
        )
        return QuorumClient(disk_stack.redis_url, agency, user, secret)

    return make
