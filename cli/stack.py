"""The local stack behind ``quorum up`` / ``quorum down``: Redis and one process per role.

With no configuration everything runs on this machine: a ``redis-server`` on the port of
``QUORUM_REDIS_URL`` (started only when nothing answers there and the URL is local), the embedded
disk store (or the S3 server configured), the gateway and one Celery worker per queue. State lives
under ``QUORUM_HOME`` (``run/`` pid files, ``logs/`` one log per process); ``down`` stops exactly
what ``up`` started, using those pid files.

``up`` also starts a supervisor (``quorum stack-supervise``, pid file ``supervisor-0.pid``), as
compose's restart policy does for a deployment: a process whose pid file is still there but whose
process is gone (it crashed, or was killed) is started again, with a back-off that doubles up to 30 s
while it keeps dying. A process stopped on purpose (``stop_process`` removes its pid file) stays stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import redis as redis_lib
import structlog

from broker import keys
from broker.app import ROLE_QUEUES, parse_reindex_role, parse_shard_role, shard_role
from core.config import Settings

log = structlog.get_logger()

ROLES = ("gateway", *ROLE_QUEUES)  # every role there is (each has its fixed metrics port offset)
SUPERVISOR = "supervisor"


def stack_roles(s: Settings) -> tuple[str, ...]:
    """The processes a stack runs: the gateway, intake, one worker per configured engine (and one per
    shard of a sharded engine: ``sface.0of3`` ...), fusion, gallery."""
    base = tuple(r for r in ROLES if r in ("gateway", "intake", "fusion", "gallery") or r in s.engines)
    return base + shard_roles(s)


def shard_roles(s: Settings) -> tuple[str, ...]:
    return tuple(
        shard_role(e, i, s.shards_of(e)) for e in s.engines if s.shards_of(e) > 1 for i in range(s.shards_of(e))
    )


def _known_role(s: Settings, role: str) -> bool:
    return role in ROLES or role in shard_roles(s)


def settings_env(s: Settings) -> dict[str, str]:
    """The environment that makes a child process see exactly the settings of this one."""
    env = dict(os.environ)
    for name in type(s).model_fields:
        value = getattr(s, name)
        if isinstance(value, tuple):
            value = ",".join(f"{x[0]}={x[1]}" if isinstance(x, tuple) else x for x in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        env["QUORUM_" + name.upper()] = str(value)
    env.pop("QUORUM_SETTINGS", None)  # already folded into the values above
    env["PYTHONUNBUFFERED"] = "1"
    # Engines run one per process; keep each from spawning a thread per core on a small machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Stack:
    def __init__(self, s: Settings) -> None:
        self.s = s
        self.home = Path(s.home)
        self.run_dir = self.home / "run"
        self.log_dir = self.home / "logs"

    # ---- redis ------------------------------------------------------------------------------
    def _redis_reachable(self) -> bool:
        try:
            return bool(redis_lib.Redis.from_url(self.s.redis_url, socket_connect_timeout=0.5).ping())
        except redis_lib.RedisError:
            return False

    def start_redis(self) -> bool:
        """Start a local redis-server for the configured URL if none answers. True if started."""
        if self._redis_reachable():
            return False
        url = urlparse(self.s.redis_url)
        if url.hostname not in {"127.0.0.1", "localhost", "::1"}:
            raise RuntimeError(f"Redis at {self.s.redis_url} does not answer, and it is not local to start")
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(url.port or 6379),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.run_dir / "redis.pid"),
                "--dir",
                str(data),
                "--logfile",
                str(self.log_dir / "redis.log"),
                "--save",
                "",
                "--appendonly",
                "yes",
            ],
            check=True,
        )
        for _ in range(100):
            if self._redis_reachable():
                return True
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start; see " + str(self.log_dir / "redis.log"))

    # ---- processes --------------------------------------------------------------------------
    def _pidfile(self, role: str, i: int = 0) -> Path:
        return self.run_dir / f"{role}-{i}.pid"

    def _alive(self, pidfile: Path) -> int | None:
        try:
            pid = int(pidfile.read_text())
            os.kill(pid, 0)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        try:  # a zombie (PID 1 here does not reap) is not alive
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return None
        except OSError:
            return None
        return pid

    def _metrics_port(self, role: str, i: int) -> int:
        """The /metrics port ``up`` assigned to a role (0: none), so a restarted process keeps it."""
        try:
            base = int((self.run_dir / "metrics_base").read_text())
        except (FileNotFoundError, ValueError):
            return 0
        if not base or i != 0:
            return 0
        if role in ROLES:
            return base + ROLES.index(role)
        shards = shard_roles(self.s)
        return base + len(ROLES) + shards.index(role) if role in shards else 0

    def start_process(self, role: str, i: int = 0, *, metrics_port: int | None = None) -> int:
        if metrics_port is None:
            metrics_port = self._metrics_port(role, i)
        pidfile = self._pidfile(role, i)
        pid = self._alive(pidfile)
        if pid:
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = settings_env(self.s)
        env["QUORUM_METRICS_PORT"] = str(metrics_port)
        if role == SUPERVISOR:
            args = [sys.executable, "-m", "cli", "stack-supervise"]
        elif role == "gateway":
            args = [sys.executable, "-m", "cli", "gateway"]
            # A stable consumer name: a restarted gateway takes back its own pending entries at once
            # instead of waiting for another to find them idle.
            env["QUORUM_GATEWAY_CONSUMER"] = f"{socket.gethostname()}-gateway-{i}"
        elif shard := parse_shard_role(role):
            args = [sys.executable, "-m", "cli", "worker", shard[0], "--shard", f"{shard[1]}/{shard[2]}"]
        elif reindexing := parse_reindex_role(role):  # not part of `up`: started for a reindex
            args = [sys.executable, "-m", "cli", "worker", reindexing, "--reindex"]
        else:
            args = [sys.executable, "-m", "cli", "worker", role]
        with open(self.log_dir / f"{role}-{i}.log", "ab") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        pidfile.write_text(str(proc.pid))
        return proc.pid

    def up(
        self,
        roles: tuple[str, ...] | None = None,
        *,
        metrics_base: int = 0,
        timeout: float = 180.0,
        supervise: bool = True,
    ) -> None:
        roles = stack_roles(self.s) if roles is None else roles
        started_redis = self.start_redis()
        if started_redis:
            (self.run_dir / "redis.started").write_text("1")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "metrics_base").write_text(str(metrics_base))
        for role in roles:
            self.start_process(role)
        if supervise:
            self.start_process(SUPERVISOR)
        self.wait_ready(roles, timeout=timeout)

    def supervise(
        self,
        stop: threading.Event | None = None,
        *,
        interval_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_s: float = 60.0,
    ) -> None:
        """Restart every process whose pid file outlived its process, until ``stop`` is set.

        A process that dies again within ``stable_s`` of a restart waits twice as long before the next
        (1 s, 2 s, 4 s ... ``max_backoff_s``), so a process that cannot start does not spin the machine.
        """
        stop = stop or threading.Event()
        backoff: dict[str, float] = {}
        not_before: dict[str, float] = {}
        started_at: dict[str, float] = {}
        log.info("stack.supervisor_started", home=str(self.home))
        while not stop.is_set():
            now = time.monotonic()
            for pidfile in sorted(self.run_dir.glob("*-*.pid")):
                role, _, i = pidfile.stem.rpartition("-")
                if not _known_role(self.s, role) or not i.isdigit():
                    continue
                if self._alive(pidfile):
                    if now - started_at.get(pidfile.stem, now) > stable_s:
                        backoff.pop(pidfile.stem, None)
                    continue
                if not pidfile.exists() or now < not_before.get(pidfile.stem, 0.0):
                    continue  # stopped on purpose meanwhile, or backing off
                wait = backoff.get(pidfile.stem, 0.0)
                backoff[pidfile.stem] = min(max_backoff_s, wait * 2 or 1.0)
                not_before[pidfile.stem] = now + backoff[pidfile.stem]
                started_at[pidfile.stem] = now
                pid = self.start_process(role, int(i))
                log.warning(
                    "stack.process_restarted", role=role, index=int(i), pid=pid, next_backoff_s=backoff[pidfile.stem]
                )
            _reap_children()
            stop.wait(interval_s)
        log.info("stack.supervisor_stopped")

    def wait_ready(self, roles: tuple[str, ...], timeout: float = 180.0) -> None:
        from broker.app import make_app

        app = make_app(self.s.redis_url)
        r = redis_lib.Redis.from_url(self.s.redis_url)
        want = {r_ for r_ in roles if r_ != "gateway"}
        deadline = time.monotonic() + timeout
        while True:
            for role in roles:
                if not self._alive(self._pidfile(role)):
                    tail = (self.log_dir / f"{role}-0.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the {role} process exited during start:\n{tail}")
            replies = app.control.ping(timeout=1.0) or []
            ready = {next(iter(rep)).split("@", 1)[0] for rep in replies}
            gateway_ok = "gateway" not in roles or any(True for _ in r.scan_iter(keys.GATEWAY_ALIVE_PREFIX + "*"))
            if want <= ready and gateway_ok:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not ready after {timeout}s: waiting for {sorted(want - ready)}"
                    + ("" if gateway_ok else " and the gateway")
                )
            time.sleep(0.5)

    def stop_process(self, role: str, i: int = 0) -> bool:
        """Stop one process (SIGTERM, then SIGKILL after a grace period). True if it was running."""
        pidfile = self._pidfile(role, i)
        pid = self._alive(pidfile)
        # The pid file goes before the signal: the supervisor restarts a dead process whose pid file is
        # still there, so removing it after the process exits would race a restart of what was stopped.
        pidfile.unlink(missing_ok=True)
        if pid:
            _terminate(pid)
        return pid is not None

    def down(self) -> list[str]:
        stopped = []
        if self.stop_process(SUPERVISOR):  # first, or it would restart what is stopped next
            stopped.append(f"{SUPERVISOR}-0")
        for pidfile in sorted(self.run_dir.glob("*.pid")) if self.run_dir.exists() else []:
            if pidfile.name == "redis.pid":
                continue
            role, _, i = pidfile.stem.rpartition("-")
            if self.stop_process(role, int(i)):
                stopped.append(pidfile.stem)
        marker = self.run_dir / "redis.started"
        if marker.exists():
            pid = self._alive(self.run_dir / "redis.pid")
            if pid:
                _terminate(pid)
                stopped.append("redis")
            marker.unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, str]:
        out = {"redis": "up" if self._redis_reachable() else "down"}
        for role in (*stack_roles(self.s), SUPERVISOR):  # what this stack runs (configured engines, shards)
            out[role] = "running" if self._alive(self._pidfile(role)) else "stopped"
        return out


def _reap_children() -> None:
    """Collect the exit status of processes this one started (or they linger as zombies)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except (ProcessLookupError, OSError):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
