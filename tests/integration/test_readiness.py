"""Healthy means ready to take work: a real `quorum worker` / `quorum gateway` process serves /metrics
as soon as it starts, but /ready (what `quorum health`, the compose health check, asks) answers 200 only
once the process takes work: a worker once its model and gallery are loaded and Celery consumes its
queue, the gateway once it reads the intake streams. Redis is started late to hold them in between."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.servers import RedisServer, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def status(port: int, path: str) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def health(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", "health", "--port", str(port)], capture_output=True, text=True, timeout=60
    )


def start(args: list[str], home: Path, redis_url: str, metrics_port: int) -> tuple[subprocess.Popen, Path]:
    env = {
        **os.environ,
        "QUORUM_HOME": str(home),
        "QUORUM_REDIS_URL": redis_url,
        "QUORUM_METRICS_PORT": str(metrics_port),
        "QUORUM_ENGINES": "sface",
    }
    for var in ("QUORUM_SETTINGS", "QUORUM_DATABASE_URL", "QUORUM_S3_ENDPOINT"):
        env.pop(var, None)
    log = home / "process.log"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quorum.cli", *args], env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    return proc, log


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for(check, timeout: float, log: Path, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:.0f} s\n{log.read_text()[-3000:]}")


@pytest.mark.parametrize("args", [["worker", "fusion"], ["gateway"]], ids=["fusion-worker", "gateway"])
def test_not_ready_until_it_can_take_work(tmp_path, args):
    redis_server = RedisServer(tmp_path / "redis")  # its port is chosen; the server is not started yet
    metrics_port = free_port()
    proc, log = start(args, tmp_path / "home", redis_server.url, metrics_port)
    try:
        wait_for(lambda: status(metrics_port, "/metrics") == 200, 120, log, "/metrics did not answer")
        time.sleep(2)  # whatever it does without Redis, it is not ready
        assert status(metrics_port, "/ready") == 503
        assert "quorum_ready 0.0" in urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        unready = health(metrics_port)
        assert unready.returncode == 1 and "not ready" in unready.stderr
        redis_server.start()
        wait_for(lambda: status(metrics_port, "/ready") == 200, 120, log, "not ready after Redis came up")
        ready = health(metrics_port)
        assert ready.returncode == 0 and ready.stdout.strip() == "ready"
    finally:
        stop(proc)
        redis_server.stop()


def test_engine_worker_is_ready_only_with_its_model_and_gallery_loaded(tmp_path):
    redis_server = RedisServer(tmp_path / "redis").start()
    metrics_port = free_port()
    proc, log = start(["worker", "sface"], tmp_path / "home", redis_server.url, metrics_port)
    try:
        seen: set[int | None] = set()

        def ready() -> bool:
            seen.add(status(metrics_port, "/ready"))
            return 200 in seen

        wait_for(ready, 300, log, "sface worker not ready")
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert 'quorum_gallery_templates{engine="sface"}' in text  # set after the gallery was loaded
        assert "quorum_ready 1.0" in text
        out = log.read_text()
        assert "gallery.replica_ready" in out and "engine_loaded" in out
        assert health(metrics_port).returncode == 0
    finally:
        stop(proc)
        redis_server.stop()


def test_health_without_a_process_fails_cleanly():
    proc = health(free_port())
    assert proc.returncode == 1 and "not serving" in proc.stderr
