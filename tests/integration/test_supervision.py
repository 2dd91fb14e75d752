"""The local stack restarts a crashed process (as compose's restart policy does), and only a crashed one."""

from __future__ import annotations

import os
import signal
import time

import pytest

from quorum.cli.stack import SUPERVISOR, Stack
from quorum.core.config import load_settings
from tests.integration.servers import RedisServer

pytestmark = pytest.mark.integration


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def small_stack(tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    stack = Stack(load_settings(env={}, home=str(tmp_path / "home"), redis_url=redis_server.url))
    try:
        stack.up(roles=("fusion",), timeout=120)
        yield stack
    finally:
        stack.down()
        redis_server.stop()


def test_killed_process_is_restarted_and_answers(small_stack: Stack) -> None:
    from quorum.broker.app import make_app

    pidfile = small_stack._pidfile("fusion")
    assert small_stack._alive(small_stack._pidfile(SUPERVISOR)), "up starts the supervisor"
    first = int(pidfile.read_text())
    os.kill(first, signal.SIGKILL)
    second = _wait(lambda: (pid := small_stack._alive(pidfile)) and pid != first and pid, 20, "a new fusion pid")
    app = make_app(small_stack.s.redis_url)
    _wait(
        lambda: any("fusion@" in next(iter(r)) for r in app.control.ping(timeout=1.0) or []),
        60,
        "the restarted fusion worker to answer a ping",
    )
    # Killed again at once: restarted again, after a longer back-off (it was not stable yet).
    os.kill(second, signal.SIGKILL)
    third = _wait(lambda: (pid := small_stack._alive(pidfile)) and pid != second and pid, 20, "a third fusion pid")
    assert third not in {first, second}


def test_process_stopped_on_purpose_stays_stopped(small_stack: Stack) -> None:
    assert small_stack.stop_process("fusion")
    time.sleep(3.5)  # the supervisor looks every second
    assert small_stack.status()["fusion"] == "stopped"
    assert small_stack.status()[SUPERVISOR] == "running"
    stopped = small_stack.down()
    assert f"{SUPERVISOR}-0" in stopped
    assert small_stack.status()[SUPERVISOR] == "stopped"
