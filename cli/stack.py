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

The redis-server ``up`` starts is not open (:mod:`core.local_redis`): ``default`` is off, each agency and
each service has its own ACL user, and each process logs in as its role's user (the gateway as
``gateway``, the workers as ``worker``, the supervisor as ``admin``), reading its URL from a 0600 file.
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

from ..broker import keys, liveness
from ..broker.app import ROLE_QUEUES, parse_reindex_role, parse_shard_role, shard_role
from ..broker.sentinel import open_redis
from ..core import local_redis
from ..core.config import Settings
from ..core.files import atomic_write
from .common import redacted

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


def _runs_engine(roles: tuple[str, ...], engine: str) -> bool:
    """Whether one of ``roles`` loads ``engine``: its worker, a shard of it, or its reindex worker."""
    return any(r == engine or r.startswith(engine + ".") for r in roles)


def _known_role(s: Settings, role: str) -> bool:
    return role in ROLES or role in shard_roles(s)


def settings_env(s: Settings, *, redis_url_file: Path | None = None) -> dict[str, str]:
    """The environment that makes a child process see exactly the settings of this one; with
    ``redis_url_file``, the child reads its Redis URL (its own user's credentials) from that file
    (``QUORUM_REDIS_URL_FILE``) instead of this process's URL."""
    env = dict(os.environ)
    fields = type(s).model_fields
    for name in fields:
        value = getattr(s, name)
        if isinstance(value, tuple):
            value = ",".join(f"{x[0]}={x[1]}" if isinstance(x, tuple) else x for x in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        env["QUORUM_" + name.upper()] = str(value)
        if f"{name}_file" not in fields:  # the value is set: a QUORUM_<NAME>_FILE beside it would be refused
            env.pop(f"QUORUM_{name.upper()}_FILE", None)
    if redis_url_file is not None:
        env.pop("QUORUM_REDIS_URL")
        env["QUORUM_REDIS_URL_FILE"] = str(redis_url_file)
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
        self._started_redis = False  # by this object's last start_redis (what a failed ``up`` stops)

    # ---- redis ------------------------------------------------------------------------------
    def _redis_answer(self, url: str | None = None) -> str:
        """``ok`` (PING answered), ``refused`` (a Redis answers but refuses these credentials: NOAUTH,
        WRONGPASS) or ``down`` (nothing answers)."""
        client = open_redis(url or self.s.redis_url, socket_connect_timeout=0.5)
        try:
            client.ping()
        except redis_lib.AuthenticationError:
            return "refused"
        except redis_lib.ResponseError:  # NOPERM: it answers, this user just may not PING
            return "ok"
        except redis_lib.RedisError:
            return "down"
        finally:
            client.close()
        return "ok"

    def _redis_reachable(self) -> bool:
        return self._redis_answer() != "down"

    def _use_local_admin(self) -> None:
        """Log in as the local Redis's admin user from now on (it was started after these settings were read)."""
        admin = local_redis.service_url(self.home, self.s.redis_url, local_redis.ADMIN)
        if admin and admin != self.s.redis_url:
            self.s = self.s.model_copy(update={"redis_url": admin})

    def owns_redis(self) -> bool:
        """Whether the configured Redis is the one this home's stack started (and it runs)."""
        return local_redis.owns(self.home, self.s.redis_url)

    def start_redis(self) -> bool:
        """Start a local redis-server for the configured URL if none answers. True if started.

        The server started has an ACL file (``<home>/run/redis.acl``, rendered from the registry): one user
        per agency, one per service with its rights (``accountability.registry.SERVICE_ACL``), ``default``
        off; the service users' passwords are made once under ``<home>/secrets`` (:mod:`core.local_redis`).
        A Redis that answers is used as it is, one that refuses a login without credentials included (it
        is not started a second time on the same port)."""
        self._use_local_admin()  # settings made without load_settings: still this home's admin on its server
        answer = self._redis_answer()
        if answer == "ok":
            if self.owns_redis():  # started by an earlier `up` of this home: keep its ACL file current
                from ..accountability.registry import sync_local_redis

                self._heal_topology()
                sync_local_redis(self.s)
            return False
        if answer == "refused":
            raise RuntimeError(
                f"a Redis answers at {local_redis.server_address(self.s.redis_url)} but refuses these credentials "
                "(NOAUTH/WRONGPASS), and it is not the one this home's stack started: give its user and password "
                "in QUORUM_REDIS_URL, or choose another port"
            )
        url = urlparse(self.s.redis_url)
        if url.hostname not in {"127.0.0.1", "localhost", "::1"}:
            raise RuntimeError(f"Redis at {redacted(self.s.redis_url)} does not answer, and it is not local to start")
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        from ..accountability import db
        from ..accountability.registry import write_local_acl

        passwords = local_redis.ensure_passwords(self.home)
        aclfile = write_local_acl(db.get_engine(self.s), self.home, passwords)
        port = url.port or 6379
        args = self._redis_args(port, data, local_redis.pid_file(self.home), "redis", aclfile)
        subprocess.run([exe, *args, *self._replication_auth(passwords)], check=True)
        # Recorded at once (``down`` stops it even if it never answers); from now on this home's
        # commands log in as its admin user.
        local_redis.record_started(self.home, self.s.redis_url)
        self._started_redis = True
        log.info(
            "stack.redis_started",
            server=local_redis.server_address(self.s.redis_url),
            aclfile=str(aclfile),
            users=",".join(local_redis.SERVICE_USERS),
            passwords=str(local_redis.passwords_file(self.home)),
        )
        for _ in range(100):
            if self._redis_answer(local_redis.service_url(self.home, self.s.redis_url, local_redis.ADMIN)) == "ok":
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start; see " + str(self.log_dir / "redis.log"))
        if self.s.local_sentinel:
            self._start_topology(exe, port, aclfile, passwords[local_redis.ADMIN])
        self._use_local_admin()
        return True

    def _redis_args(self, port: int, data: Path, pidfile: Path, name: str, aclfile: Path) -> list[str]:
        """redis-server's arguments for a data node of this home (the primary, or the replica)."""
        data.mkdir(parents=True, exist_ok=True)
        return [
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--daemonize",
            "yes",
            "--pidfile",
            str(pidfile),
            "--dir",
            str(data),
            "--logfile",
            str(self.log_dir / f"{name}.log"),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--aclfile",
            str(aclfile),
            *local_redis.limit_args(self.s),
        ]

    def _start_topology(self, exe: str, port: int, aclfile: Path, admin_password: str) -> None:
        """A replica at ``port``+1 and three sentinels at +2..+4 beside the primary just started, the
        sentinels logging in as ``admin`` (its ACL user on both data nodes); waits until they see the
        replica and each other. From then on every URL handed out names the sentinels."""
        topo = local_redis.topology_dir(self.home)
        local_redis.record_topology(self.home, port, port + 1, [port + 2, port + 3, port + 4])
        replica = self._redis_args(port + 1, topo / "replica", topo / "replica.pid", "redis-replica", aclfile)
        auth = ["--masteruser", local_redis.ADMIN, "--masterauth", admin_password]
        subprocess.run([exe, *replica, "--replicaof", "127.0.0.1", str(port), *auth], check=True)
        sentinel_exe = shutil.which("redis-sentinel")
        if not sentinel_exe:
            raise RuntimeError("redis-sentinel is not installed (apt-get install -y redis-sentinel)")
        for i, sport in enumerate((port + 2, port + 3, port + 4)):
            conf = topo / f"sentinel-{i}.conf"
            m = local_redis.SENTINEL_MASTER
            conf.write_text(
                f"port {sport}\nbind 127.0.0.1\ndaemonize yes\npidfile {topo / f'sentinel-{i}.pid'}\n"
                f"logfile {self.log_dir / f'redis-sentinel-{i}.log'}\ndir {topo}\n"
                f"sentinel monitor {m} 127.0.0.1 {port} 2\nsentinel auth-user {m} {local_redis.ADMIN}\n"
                f"sentinel auth-pass {m} {admin_password}\nsentinel down-after-milliseconds {m} 2000\n"
                f"sentinel failover-timeout {m} 10000\n"
            )
            conf.chmod(0o600)  # it holds the admin password
            subprocess.run([sentinel_exe, str(conf)], check=True)
        deadline = time.monotonic() + 60
        while not self._topology_settled(port):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the local sentinels did not see the replica; see {self.log_dir}/redis-sentinel-*.log"
                )
            time.sleep(0.2)
        log.info("stack.redis_sentinel_started", primary=port, replica=port + 1, sentinels=f"{port + 2}-{port + 4}")

    def _replication_auth(self, passwords: dict[str, str]) -> list[str]:
        """With Sentinel, each data node may become a replica (after a failover): it then logs in to the
        new primary as ``admin``."""
        if not self.s.local_sentinel:
            return []
        return ["--masteruser", local_redis.ADMIN, "--masterauth", passwords[local_redis.ADMIN]]

    def _heal_topology(self) -> list[str]:
        """Start again whatever of this home's topology is not running (a primary a failover replaced comes
        back as a replica: the sentinels reconfigure it). Names what was started."""
        topo = local_redis.topology(self.home)
        exe = shutil.which("redis-server")
        if topo is None or exe is None:
            return []
        from ..accountability import db
        from ..accountability.registry import write_local_acl

        passwords = local_redis.read_passwords(self.home)
        aclfile = write_local_acl(db.get_engine(self.s), self.home, passwords)
        d = local_redis.topology_dir(self.home)
        started = []
        nodes = (
            (topo["primary"], self.home / "redis", local_redis.pid_file(self.home), "redis"),
            (topo["replica"], d / "replica", d / "replica.pid", "redis-replica"),
        )
        for port, data, pidfile, name in nodes:
            if not self._alive(pidfile):
                args = self._redis_args(port, data, pidfile, name, aclfile)
                subprocess.run([exe, *args, *self._replication_auth(passwords)], check=True)
                started.append(name)
        sentinel_exe = shutil.which("redis-sentinel") or "redis-sentinel"
        for i in range(len(topo["sentinels"])):
            if not self._alive(d / f"sentinel-{i}.pid"):
                subprocess.run([sentinel_exe, str(d / f"sentinel-{i}.conf")], check=True)
                started.append(f"sentinel-{i}")
        if started:
            log.info("stack.redis_topology_healed", started=",".join(started))
        return started

    def _topology_settled(self, port: int) -> bool:
        try:
            for sport in (port + 2, port + 3, port + 4):
                c = redis_lib.Redis(port=sport, socket_connect_timeout=0.5)
                if len(c.sentinel_slaves(local_redis.SENTINEL_MASTER)) < 1:
                    return False
                if len(c.sentinel_sentinels(local_redis.SENTINEL_MASTER)) < 2:
                    return False
            return True
        except redis_lib.RedisError:
            return False

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
        url_file = None
        if self.owns_redis():  # each process logs in as its own user (core.local_redis.role_user)
            user = local_redis.role_user(role)
            url_file = local_redis.write_url_file(self.home, self.s.redis_url, user)
        env = settings_env(self.s, redis_url_file=url_file)
        env["QUORUM_METRICS_PORT"] = str(metrics_port)
        if role == SUPERVISOR:
            args = [sys.executable, "-m", "quorum.cli", "stack-supervise"]
        elif role == "gateway":
            args = [sys.executable, "-m", "quorum.cli", "gateway"]
            # A stable consumer name: a restarted gateway takes back its own pending entries at once
            # instead of waiting for another to find them idle.
            env["QUORUM_GATEWAY_CONSUMER"] = f"{socket.gethostname()}-gateway-{i}"
        elif shard := parse_shard_role(role):
            args = [sys.executable, "-m", "quorum.cli", "worker", shard[0], "--shard", f"{shard[1]}/{shard[2]}"]
        elif reindexing := parse_reindex_role(role):  # not part of `up`: started for a reindex
            args = [sys.executable, "-m", "quorum.cli", "worker", reindexing, "--reindex"]
        else:
            args = [sys.executable, "-m", "quorum.cli", "worker", role]
        with open(self.log_dir / f"{role}-{i}.log", "ab") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
        write_pidfile(pidfile, proc.pid)
        return proc.pid

    def up(
        self,
        roles: tuple[str, ...] | None = None,
        *,
        metrics_base: int = 0,
        timeout: float = 180.0,
        supervise: bool = True,
    ) -> None:
        """Start ``roles`` (default: the whole stack) and wait until each takes work.

        First a preflight: every model package the configured engines and detector open is installed
        (``ENGINE_NOT_INSTALLED`` names the command that installs what is missing), before anything
        starts. An ``up`` that then fails (a process that exits while starting, not ready in time, an
        interrupt) stops everything it started, its redis-server included, so the port is free again."""
        from ..core.engines import require_models

        roles = stack_roles(self.s) if roles is None else roles
        needs_detector = any(r == "intake" or parse_reindex_role(r) for r in roles)
        require_models(
            tuple(e for e in self.s.engines if _runs_engine(roles, e)), self.s.detector if needs_detector else None
        )
        started: list[str] = []
        self._started_redis = False
        try:
            self.start_redis()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics_base").write_text(str(metrics_base))
            for role in (*roles, SUPERVISOR) if supervise else roles:
                if not self._alive(self._pidfile(role)):
                    started.append(role)
                self.start_process(role)
            self.wait_ready(roles, timeout=timeout)
        except BaseException:
            self._undo_up(started)
            raise

    def _undo_up(self, started: list[str]) -> None:
        """Stop what a failed ``up`` started: the supervisor first (or it restarts the rest), the processes,
        and the redis-server if this ``up`` started it."""
        for role in sorted(started, key=lambda r: r != SUPERVISOR):
            self.stop_process(role)
        if self._started_redis:
            self._stop_redis()
        log.warning("stack.up_failed_stopped", roles=",".join(started), redis=self._started_redis)

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
            rotate_logs(self.log_dir, max_bytes=self.s.log_max_bytes, backups=self.s.log_backups)
            stop.wait(interval_s)
        log.info("stack.supervisor_stopped")

    def wait_ready(self, roles: tuple[str, ...], timeout: float = 180.0) -> None:
        from ..broker.app import make_app

        app = make_app(self.s.redis_url)
        r = open_redis(self.s.redis_url)
        want = {r_ for r_ in roles if r_ != "gateway"}
        deadline = time.monotonic() + timeout
        while True:
            for role in roles:
                if not self._alive(self._pidfile(role)):
                    tail = (self.log_dir / f"{role}-0.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the {role} process exited during start:\n{tail}")
            try:
                replies = app.control.ping(timeout=1.0) or []
            except (redis_lib.ConnectionError, OSError):
                # A connection kept by this process from a Redis since restarted (a `down` and `up` in one
                # process: kombu's pidbox keeps it) fails once, then reconnects.
                replies = []
            ready = {next(iter(rep)).split("@", 1)[0] for rep in replies}
            gateway_ok = "gateway" not in roles or liveness.live(r, keys.GATEWAY_ALIVE) > 0
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
        if self._stop_redis():
            stopped.append("redis")
        return stopped

    def _stop_redis(self) -> bool:
        """Stop the redis-server this home's stack started (and its replica and sentinels), if it runs.
        True if something was running."""
        marker = local_redis.started_file(self.home)
        if not marker.exists():
            return False
        files = local_redis.topology_pid_files(self.home) if local_redis.topology(self.home) else []
        pids = [pid for f in [*reversed(files[1:]), local_redis.pid_file(self.home)] if (pid := self._alive(f))]
        for pid in pids:  # the sentinels first (or they fail over to the replica), then replica and primary
            _terminate(pid)
        marker.unlink(missing_ok=True)
        (local_redis.topology_dir(self.home) / "topology.json").unlink(missing_ok=True)
        return bool(pids)

    def status(self) -> dict[str, str]:
        out = {"redis": "up" if self._redis_reachable() else "down"}
        for role in (*stack_roles(self.s), SUPERVISOR):  # what this stack runs (configured engines, shards)
            out[role] = "running" if self._alive(self._pidfile(role)) else "stopped"
        return out


def rotate_logs(log_dir: Path, *, max_bytes: int, backups: int) -> list[Path]:
    """Rotate each process log past ``max_bytes``: ``x.log`` is copied to ``x.log.1`` (older copies move up,
    ``backups`` kept) and emptied in place. Its process keeps writing to the same open file: every
    process log is opened for appending, so its next line lands at the new end. Returns the logs rotated."""
    rotated = []
    for path in sorted(log_dir.glob("*.log")):
        try:
            if path.stat().st_size <= max_bytes:
                continue
            for n in range(backups - 1, 0, -1):
                older = path.with_name(f"{path.name}.{n}")
                if older.exists():
                    os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
            shutil.copyfile(path, path.with_name(f"{path.name}.1"))
            os.truncate(path, 0)
            rotated.append(path)
        except OSError as exc:  # a log that cannot be rotated now is tried again on the next round
            log.warning("stack.log_rotation_failed", log=str(path), error=str(exc))
    return rotated


def write_pidfile(path: Path, pid: int) -> None:
    """Write a pid file at once (a new file renamed over it): the supervisor must never read one that is
    still empty, which it would take for a dead process and start a second one."""
    atomic_write(path, str(pid))


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
