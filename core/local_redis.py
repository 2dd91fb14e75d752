"""The local stack's own Redis: its service users, their passwords, and which process logs in as which.

When ``quorum up`` starts a ``redis-server`` itself (nothing answered at ``QUORUM_REDIS_URL``), that
server is not open: it runs with an ACL file (``<home>/run/redis.acl``) in which ``default`` is off,
each agency has its user (from the registry) and each service its own least-privilege user
(``accountability.registry.SERVICE_ACL``): ``gateway``, ``worker`` (intake, engine, shard, fusion and
gallery workers), ``review`` and ``admin`` (the supervisor and the operator's commands). Their passwords
are made once and kept across restarts in ``<home>/secrets/redis-services.json`` (mode 0600, directory
0700); each child process reads the URL of its own user from ``<home>/secrets/redis-<user>.url``
(``QUORUM_REDIS_URL_FILE``), so no password is in a process's arguments or environment.

The stack records the server it started in ``<home>/run/redis.started`` (``host:port``). A command run
in the same home whose URL carries no credentials and points at that server (while it runs) logs in as
``admin`` (:func:`local_credentials`), so ``quorum enroll``, ``search``, ``status``... need no setup.

With ``QUORUM_LOCAL_SENTINEL=true`` the stack starts a Sentinel topology instead of one server: the
primary at the configured port, a replica at the next, and three sentinels at the three after it
(recorded in ``<home>/run/redis-topology/topology.json``); every URL handed out then names the sentinels
(``redis+sentinel://``, broker.sentinel), so processes and commands follow the primary through a failover.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse, urlunparse

from .files import atomic_write

# The local stack's service users; their rights are accountability.registry.SERVICE_ACL's (as compose's).
SERVICE_USERS = ("gateway", "worker", "review", "admin")
ADMIN = "admin"
SECRETS_DIR_MODE = 0o700
SECRETS_FILE_MODE = 0o600
_LOOPBACK = {"localhost": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::1": "::1"}


def secrets_dir(home: str | Path) -> Path:
    return Path(home) / "secrets"


def passwords_file(home: str | Path) -> Path:
    """The service users' passwords (JSON ``{user: password}``), mode 0600."""
    return secrets_dir(home) / "redis-services.json"


def url_file(home: str | Path, user: str) -> Path:
    """The Redis URL (with the password) of one service user: its processes' ``QUORUM_REDIS_URL_FILE``."""
    return secrets_dir(home) / f"redis-{user}.url"


def acl_file(home: str | Path) -> Path:
    """The ACL file the local redis-server loads (password hashes only)."""
    return Path(home) / "run" / "redis.acl"


def started_file(home: str | Path) -> Path:
    """Written when the stack starts its own redis-server: that server's ``host:port``."""
    return Path(home) / "run" / "redis.started"


def pid_file(home: str | Path) -> Path:
    return Path(home) / "run" / "redis.pid"


SENTINEL_MASTER = "quorum"  # the name the local sentinels monitor


def topology_dir(home: str | Path) -> Path:
    """The replica's and the sentinels' files (pid, config, data), apart from the processes' pid files."""
    return Path(home) / "run" / "redis-topology"


def topology(home: str | Path) -> dict | None:
    """The Sentinel topology this home's stack started: primary, replica and sentinel ports; None if none."""
    try:
        return json.loads((topology_dir(home) / "topology.json").read_text())
    except (OSError, ValueError):
        return None


def record_topology(home: str | Path, primary: int, replica: int, sentinels: list[int]) -> None:
    doc = {"primary": primary, "replica": replica, "sentinels": sentinels, "master": SENTINEL_MASTER}
    topology_dir(home).mkdir(parents=True, exist_ok=True)
    atomic_write(topology_dir(home) / "topology.json", json.dumps(doc))


def topology_pid_files(home: str | Path) -> list[Path]:
    """Every process of the topology: the primary, the replica, the sentinels."""
    topo = topology(home) or {"sentinels": []}
    d = topology_dir(home)
    return [pid_file(home), d / "replica.pid", *(d / f"sentinel-{i}.pid" for i in range(len(topo["sentinels"])))]


def sentinel_url(home: str | Path, user: str, password: str) -> str:
    topo = topology(home)
    assert topo is not None
    hosts = ",".join(f"127.0.0.1:{p}" for p in topo["sentinels"])
    return f"redis+sentinel://{quote(user, safe='')}:{quote(password, safe='')}@{hosts}/{topo['master']}/0"


def _alive(path: Path) -> bool:
    try:
        os.kill(int(path.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def role_user(role: str) -> str:
    """The Redis user a stack process runs as: ``gateway``; ``admin`` for the supervisor (it starts
    processes, it does not touch Redis itself: the operator's user); ``review`` for the review app;
    ``worker`` for every worker role (intake, engines, shards, fusion, gallery, reindex)."""
    if role in ("gateway", "review"):
        return role
    if role == "supervisor":
        return ADMIN
    return "worker"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the start (never readable by others, not even briefly)."""
    atomic_write(path, text, mode=SECRETS_FILE_MODE)


def read_passwords(home: str | Path) -> dict[str, str]:
    """The service users' passwords, ``{}`` if there are none (yet)."""
    try:
        data = json.loads(passwords_file(home).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{passwords_file(home)} cannot be read: {type(exc).__name__}") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def ensure_passwords(home: str | Path) -> dict[str, str]:
    """The service users' passwords: made once (random, 32 bytes each), then kept across restarts.
    A user missing from the file (one added to :data:`SERVICE_USERS` since) gets one; others are kept."""
    d = secrets_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(SECRETS_DIR_MODE)
    passwords = read_passwords(home)
    missing = [u for u in SERVICE_USERS if not passwords.get(u)]
    if missing:
        passwords.update({u: secrets.token_urlsafe(32) for u in missing})
        _write_private(passwords_file(home), json.dumps(passwords, indent=1, sort_keys=True) + "\n")
    else:
        passwords_file(home).chmod(SECRETS_FILE_MODE)
    return passwords


def password_hashes(passwords: dict[str, str]) -> dict[str, str]:
    """``{user: sha256 of its password}`` for the ACL file (``render_redis_acl(services=...)``)."""
    import hashlib

    return {u: hashlib.sha256(p.encode()).hexdigest() for u, p in passwords.items()}


# ---- URLs ----------------------------------------------------------------------------------------------


def has_credentials(url: str) -> bool:
    u = urlparse(url)
    return bool(u.username or u.password)


def _hostport(u) -> str:
    host = u.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{u.port}" if u.port else host


def without_credentials(url: str) -> str:
    u = urlparse(url)
    return urlunparse(u._replace(netloc=_hostport(u))) if (u.username or u.password) else url


def with_credentials(url: str, user: str, password: str) -> str:
    u = urlparse(without_credentials(url))
    return urlunparse(u._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{_hostport(u)}"))


def url_user(url: str) -> str | None:
    u = urlparse(url)
    return unquote(u.username) if u.username else None


def server_address(url: str) -> str:
    """``host:port`` of a Redis URL, loopback names made one (``localhost`` is ``127.0.0.1``)."""
    u = urlparse(url)
    host = _LOOPBACK.get(u.hostname or "", u.hostname or "")
    return f"{host}:{u.port or 6379}"


# ---- the server this home's stack started -----------------------------------------------------------------


def record_started(home: str | Path, url: str) -> None:
    started_file(home).write_text(server_address(url))


def running_address(home: str | Path) -> str | None:
    """``host:port`` of the redis-server this home's stack started, while it runs; else None."""
    try:
        addr = started_file(home).read_text().strip()
    except OSError:
        return None
    # A topology runs while any of its processes does (its primary may be the one a failover replaced).
    alive = any(_alive(p) for p in topology_pid_files(home)) if topology(home) else _alive(pid_file(home))
    return (addr or None) if alive else None


def owns(home: str | Path, url: str) -> bool:
    """Whether ``url`` names the redis-server this home's stack started (and it runs); never a Sentinel
    URL (``redis+sentinel://``: servers of their own, the stack starts none)."""
    addr = running_address(home)
    if addr is None:
        return False
    if url.split("://", 1)[0].endswith("+sentinel"):  # our sentinels' URL (broker.sentinel's form)
        hosts = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        topo = topology(home)
        return bool(topo) and hosts == ",".join(f"127.0.0.1:{p}" for p in topo["sentinels"])  # type: ignore[index]
    return addr == server_address(url)


def service_url(home: str | Path, url: str, user: str) -> str | None:
    """``url`` logged in as the local stack's ``user``, when ``url`` is that stack's server; else None."""
    if not owns(home, url):
        return None
    password = read_passwords(home).get(user)
    if not password:
        return None
    return sentinel_url(home, user, password) if topology(home) else with_credentials(url, user, password)


def local_credentials(home: str | Path, url: str) -> str | None:
    """For a URL without credentials that names this home's running local Redis: the same URL logged in
    as ``admin`` (the operator's commands); None otherwise (the URL is used as it is)."""
    if has_credentials(url):
        return None
    return service_url(home, url, ADMIN)


def write_url_file(home: str | Path, url: str, user: str) -> Path:
    """The file a process of ``user`` reads its Redis URL from (``QUORUM_REDIS_URL_FILE``), mode 0600."""
    password = read_passwords(home)[user]
    path = url_file(home, user)
    _write_private(path, service_url(home, url, user) or with_credentials(url, user, password))
    return path


def limit_args(s: Any) -> list[str]:
    """redis-server's limits for the local stack, as docker-compose.yml sets them: memory bounded and
    never evicted (the broker and the agencies' streams live here), no single value over
    ``redis_max_bulk`` (an agency cannot write a 500 MB field)."""
    return [
        "--maxmemory",
        s.redis_maxmemory,
        "--maxmemory-policy",
        "noeviction",
        "--proto-max-bulk-len",
        s.redis_max_bulk,
    ]
