"""broker.redis_errors.connect: a client whose commands, pipelines and scripts turn Redis being away
into BROKER_UNAVAILABLE (retryable), so no code below the workers handles redis' own exceptions."""

from __future__ import annotations

import socket

import pytest

from quorum.broker.redis_errors import BoundaryRedis, connect
from quorum.core.errors import Code, ServiceError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.fixture
def away() -> BoundaryRedis:
    return connect(f"redis://127.0.0.1:{_closed_port()}/0", socket_connect_timeout=0.5)


def test_a_command_to_a_redis_that_is_away_is_broker_unavailable(away: BoundaryRedis) -> None:
    with pytest.raises(ServiceError) as err:
        away.get("k")
    assert err.value.code == Code.BROKER_UNAVAILABLE and err.value.retryable


def test_a_pipeline_and_a_script_are_translated_too(away: BoundaryRedis) -> None:
    pipe = away.pipeline(transaction=True)
    pipe.set("a", 1)
    pipe.incr("b")
    with pytest.raises(ServiceError) as err:
        pipe.execute()
    assert err.value.code == Code.BROKER_UNAVAILABLE
    script = away.register_script("return 1")
    with pytest.raises(ServiceError) as err:
        script()
    assert err.value.code == Code.BROKER_UNAVAILABLE
