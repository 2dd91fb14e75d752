"""Real servers started by the tests themselves, on loopback: redis-server and Ceph radosgw (S3)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[2]
S3_TOOL = REPO.parent / "shared" / "tools" / "s3-radosgw"


def free_port(span: int = 1) -> int:
    """A loopback port with ``span`` consecutive free ports starting at it."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span >= 65000:
            continue
        ok = True
        for p in range(port, port + span):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no free port range")


def _wait_ping(port: int, what: str) -> None:
    """Until the server on ``port`` answers PING (5 s at most)."""
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


class RedisServer:
    def __init__(self, workdir: Path, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.aof = aof  # append-only file, fsync every second: what the local stack and compose run
        self.extra = extra  # more arguments, e.g. ("--replicaof", "127.0.0.1", "6379")

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed: apt-get install -y redis-server"
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.dir / "redis.pid"),
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes" if self.aof else "no",
                "--appendfsync",
                "everysec",
                "--logfile",
                str(self.dir / "redis.log"),
                *self.extra,
            ],
            check=True,
        )
        _wait_ping(self.port, "redis-server")
        return self

    def stop(self) -> None:
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=self.port).shutdown(nosave=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed."""
        os.kill(int((self.dir / "redis.pid").read_text()), signal.SIGKILL)

    def wait_down(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
            except redis.ConnectionError:
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not stop")


class SentinelServer:
    """One redis-sentinel on loopback watching ``master`` (quorum 2 of 3, down after 1 s)."""

    def __init__(self, workdir: Path, master: str, primary_port: int) -> None:
        self.dir, self.master, self.primary_port = workdir, master, primary_port
        self.port = free_port()

    def start(self) -> SentinelServer:
        exe = shutil.which("redis-sentinel")
        assert exe, "redis-sentinel is not installed: apt-get install -y redis-sentinel"
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"
        if not conf.exists():  # a restarted sentinel keeps what it learnt (it rewrites its file)
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize yes\npidfile {self.dir / 'sentinel.pid'}\n"
                f"logfile {self.dir / 'sentinel.log'}\ndir {self.dir}\n"
                f"sentinel monitor {self.master} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.master} 1000\n"
                f"sentinel failover-timeout {self.master} 5000\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
        subprocess.run([exe, str(conf)], check=True)
        _wait_ping(self.port, "redis-sentinel")
        return self

    def kill(self) -> None:
        os.kill(int((self.dir / "sentinel.pid").read_text()), signal.SIGKILL)

    def stop(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError, ValueError):
            self.kill()


class S3Server:
    """Ceph radosgw through ../shared/tools/s3-radosgw (see ../shared/INFRA.md)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port(span=3)
        self.env: dict[str, str] = {}

    def start(self) -> S3Server:
        assert S3_TOOL.exists(), f"{S3_TOOL} is missing"
        out = subprocess.run(
            ["bash", str(S3_TOOL), "up", str(self.dir), str(self.port)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for line in out.stdout.splitlines():
            if "=" in line and line.startswith("S3_"):
                k, v = line.split("=", 1)
                self.env[k] = v
        assert {"S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY"} <= set(self.env), out.stdout + out.stderr
        return self

    def stop(self) -> None:
        subprocess.run(["bash", str(S3_TOOL), "down", str(self.dir)], capture_output=True, timeout=120)

    # The S3 endpoint alone (radosgw), Ceph's monitor and OSD left running: a store outage as an agency
    # sees it (connections refused), and its return with every object it held.
    _RGW = "client.rgw.a"

    def stop_gateway(self) -> None:
        pidfile = self.dir / "run" / f"{self._RGW}.pid"
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise RuntimeError("radosgw did not stop")

    def start_gateway(self, timeout: float = 60.0) -> None:
        subprocess.run(["radosgw", "-c", str(self.dir / "ceph.conf"), "-n", self._RGW], check=True, timeout=60)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{self.env['S3_ENDPOINT']}/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answers (anonymous requests get 4xx): up
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"radosgw did not come back within {timeout}s")
