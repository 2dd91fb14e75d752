"""The registry: member agencies, users, offence codes and purposes, in the database (``accountability.db``).

Operators manage it from the CLI (``quorum registry ...``); every change is audited in the same
transaction that makes it and bumps ``registry_meta.version``, which lets the gateway keep a cached
:class:`~accountability.policy.RegistrySnapshot` and reload it only when something changed
(:class:`SnapshotCache`: one indexed read per message).

Secrets. ``add_agency`` creates the agency's HMAC secret (stored here sealed with a key kept outside
the database, since the gateway needs it to verify signatures: ``accountability.sealing``; shown
once) and a Redis password for the agency's ACL user (only its SHA-256 is stored: ``render_redis_acl``
writes it as ``#<sha256>``).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection

from ..broker import keys
from ..core.config import Settings
from ..core.errors import Code, InputError, ServiceError, require_id
from ..core.files import atomic_write
from ..schemas.ids import IdKind, problem
from . import audit, db
from .audit import AuditEvent
from .policy import ROLES, Agency, RegistrySnapshot, User
from .sealing import SecretBox

log = structlog.get_logger()


@dataclass(frozen=True)
class AgencyCredentials:
    agency_id: str
    secret: str  # HMAC-SHA256 key for signing submissions
    redis_user: str
    redis_password: str


def redis_user(agency_id: str) -> str:
    return f"agency-{agency_id}"


def _bump(conn: Connection) -> None:
    conn.execute(
        update(db.registry_meta).where(db.registry_meta.c.id == 1).values(version=db.registry_meta.c.version + 1)
    )


def _audit(conn: Connection, action: str, actor: str, agency: str = "", **details) -> None:
    audit.append_in(conn, AuditEvent(action=action, outcome="ok", actor=actor, agency=agency, details=details))


def _exists(conn: Connection, table, col, value) -> bool:
    return conn.execute(select(col).where(col == value)).first() is not None


# ---- agencies -------------------------------------------------------------------------------------


def add_agency(
    eng: Engine, agency_id: str, name: str, *, daily_quota: int = 0, member: bool = True, actor: str = "operator"
) -> AgencyCredentials:
    require_id(IdKind.AGENCY, agency_id)  # INVALID_ID, nothing stored: the id names Redis keys and its ACL user
    creds = AgencyCredentials(agency_id, secrets.token_hex(32), redis_user(agency_id), secrets.token_urlsafe(24))
    with db.write_tx(eng) as conn:
        if _exists(conn, db.agencies, db.agencies.c.id, agency_id):
            raise InputError(Code.INVALID_MESSAGE, f"agency {agency_id!r} exists already")
        conn.execute(
            db.agencies.insert().values(
                id=agency_id,
                name=name,
                status="active",
                member=member,
                daily_quota=daily_quota,
                secret=SecretBox.for_engine(eng).seal(creds.secret),
                redis_password_sha256=hashlib.sha256(creds.redis_password.encode()).hexdigest(),
                created_at=audit.now_iso(),
            )
        )
        _bump(conn)
        _audit(conn, "registry.agency.add", actor, agency_id, name=name, daily_quota=daily_quota, member=member)
    return creds


def set_agency_status(eng: Engine, agency_id: str, status: str, *, actor: str = "operator", reason: str = "") -> None:
    if status not in {"active", "suspended"}:
        raise ValueError(status)
    with db.write_tx(eng) as conn:
        n = conn.execute(update(db.agencies).where(db.agencies.c.id == agency_id).values(status=status)).rowcount
        if not n:
            raise InputError(Code.UNKNOWN_AGENCY, f"no agency {agency_id!r}")
        _bump(conn)
        _audit(
            conn,
            f"registry.agency.{'suspend' if status == 'suspended' else 'activate'}",
            actor,
            agency_id,
            reason=reason,
        )


def set_agency_quota(eng: Engine, agency_id: str, daily_quota: int, *, actor: str = "operator") -> None:
    with db.write_tx(eng) as conn:
        if not conn.execute(
            update(db.agencies).where(db.agencies.c.id == agency_id).values(daily_quota=daily_quota)
        ).rowcount:
            raise InputError(Code.UNKNOWN_AGENCY, f"no agency {agency_id!r}")
        _bump(conn)
        _audit(conn, "registry.agency.quota", actor, agency_id, daily_quota=daily_quota)


def rotate_credentials(eng: Engine, agency_id: str, *, actor: str = "operator") -> AgencyCredentials:
    creds = AgencyCredentials(agency_id, secrets.token_hex(32), redis_user(agency_id), secrets.token_urlsafe(24))
    with db.write_tx(eng) as conn:
        if not conn.execute(
            update(db.agencies)
            .where(db.agencies.c.id == agency_id)
            .values(
                secret=SecretBox.for_engine(eng).seal(creds.secret),
                redis_password_sha256=hashlib.sha256(creds.redis_password.encode()).hexdigest(),
            )
        ).rowcount:
            raise InputError(Code.UNKNOWN_AGENCY, f"no agency {agency_id!r}")
        _bump(conn)
        _audit(conn, "registry.agency.rotate", actor, agency_id)
    return creds


def agency_secret(eng: Engine, agency_id: str) -> str | None:
    with eng.connect() as conn:
        row = conn.execute(select(db.agencies.c.secret).where(db.agencies.c.id == agency_id)).first()
    return SecretBox.for_engine(eng).open(row.secret) if row else None


def reseal_secrets(eng: Engine, *, actor: str = "operator") -> int:
    """Seal every agency secret with the newest key of the key file (after ``sealing.add_new_key``);
    bumps the registry version so gateways reload. Returns how many were resealed."""
    box = SecretBox.for_engine(eng)
    with db.write_tx(eng) as conn:
        rows = list(conn.execute(select(db.agencies.c.id, db.agencies.c.secret)))
        for row in rows:
            conn.execute(update(db.agencies).where(db.agencies.c.id == row.id).values(secret=box.reseal(row.secret)))
        _bump(conn)
        _audit(conn, "registry.secrets.reseal", actor, "", agencies=len(rows))
    return len(rows)


# ---- users ------------------------------------------------------------------------------------------


def add_user(
    eng: Engine,
    user_id: str,
    agency_id: str,
    role: str,
    *,
    cert_id: str | None = None,
    cert_expires: date | None = None,
    actor: str = "operator",
) -> None:
    require_id(IdKind.USER, user_id)
    if role not in ROLES:
        raise InputError(Code.ROLE_NOT_ALLOWED, f"role must be one of {ROLES}")
    with db.write_tx(eng) as conn:
        if not _exists(conn, db.agencies, db.agencies.c.id, agency_id):
            raise InputError(Code.UNKNOWN_AGENCY, f"no agency {agency_id!r}")
        if _exists(conn, db.users, db.users.c.id, user_id):
            raise InputError(Code.INVALID_MESSAGE, f"user {user_id!r} exists already")
        conn.execute(
            db.users.insert().values(
                id=user_id,
                agency_id=agency_id,
                role=role,
                cert_id=cert_id,
                cert_expires=cert_expires,
                active=True,
                created_at=audit.now_iso(),
            )
        )
        _bump(conn)
        _audit(
            conn,
            "registry.user.add",
            actor,
            agency_id,
            user=user_id,
            role=role,
            cert_id=cert_id,
            cert_expires=cert_expires.isoformat() if cert_expires else None,
        )


def certify_user(eng: Engine, user_id: str, cert_id: str, expires: date, *, actor: str = "operator") -> None:
    with db.write_tx(eng) as conn:
        row = conn.execute(select(db.users.c.agency_id).where(db.users.c.id == user_id)).first()
        if row is None:
            raise InputError(Code.USER_UNKNOWN, f"no user {user_id!r}")
        conn.execute(update(db.users).where(db.users.c.id == user_id).values(cert_id=cert_id, cert_expires=expires))
        _bump(conn)
        _audit(
            conn,
            "registry.user.certify",
            actor,
            row.agency_id,
            user=user_id,
            cert_id=cert_id,
            cert_expires=expires.isoformat(),
        )


def set_user_active(eng: Engine, user_id: str, active: bool, *, actor: str = "operator") -> None:
    with db.write_tx(eng) as conn:
        row = conn.execute(select(db.users.c.agency_id).where(db.users.c.id == user_id)).first()
        if row is None:
            raise InputError(Code.USER_UNKNOWN, f"no user {user_id!r}")
        conn.execute(update(db.users).where(db.users.c.id == user_id).values(active=active))
        _bump(conn)
        _audit(conn, f"registry.user.{'activate' if active else 'deactivate'}", actor, row.agency_id, user=user_id)


# ---- offences and purposes ------------------------------------------------------------------------


def add_offence(eng: Engine, code: str, description: str = "", *, actor: str = "operator") -> None:
    with db.write_tx(eng) as conn:
        if _exists(conn, db.offences, db.offences.c.code, code):
            return
        conn.execute(db.offences.insert().values(code=code, description=description))
        _bump(conn)
        _audit(conn, "registry.offence.add", actor, code=code, description=description)


def set_purpose(eng: Engine, code: str, allowed: bool, description: str = "", *, actor: str = "operator") -> None:
    with db.write_tx(eng) as conn:
        row = conn.execute(select(db.purposes).where(db.purposes.c.code == code)).first()
        if row is not None and bool(row.allowed) == allowed and (not description or row.description == description):
            return
        if row is None:
            conn.execute(db.purposes.insert().values(code=code, allowed=allowed, description=description))
        else:
            conn.execute(
                update(db.purposes)
                .where(db.purposes.c.code == code)
                .values(allowed=allowed, description=description or row.description)
            )
        _bump(conn)
        _audit(conn, "registry.purpose.set", actor, code=code, allowed=allowed, description=description)


# ---- reading ------------------------------------------------------------------------------------------


def version(eng: Engine) -> int:
    with eng.connect() as conn:
        return int(conn.execute(select(db.registry_meta.c.version).where(db.registry_meta.c.id == 1)).scalar_one())


def snapshot(eng: Engine) -> RegistrySnapshot:
    with eng.connect() as conn:
        ver = int(conn.execute(select(db.registry_meta.c.version).where(db.registry_meta.c.id == 1)).scalar_one())
        agencies = {
            r.id: Agency(r.id, r.name, r.status, bool(r.member), int(r.daily_quota))
            for r in conn.execute(select(db.agencies))
        }
        users = {
            r.id: User(r.id, r.agency_id, r.role, r.cert_id, r.cert_expires, bool(r.active))
            for r in conn.execute(select(db.users))
        }
        offences = frozenset(r.code for r in conn.execute(select(db.offences.c.code)))
        prows = list(conn.execute(select(db.purposes)))
    return RegistrySnapshot(
        ver, agencies, users, offences, {r.code: bool(r.allowed) for r in prows}, {r.code: r.description for r in prows}
    )


class SnapshotCache:
    """The gateway's view of the registry: reloaded whenever ``registry_meta.version`` moves."""

    def __init__(self, eng: Engine, min_interval_s: float = 0.0) -> None:
        self.eng = eng
        self.min_interval_s = min_interval_s
        self._snap: RegistrySnapshot | None = None
        self._secrets: dict[str, str] = {}
        self._checked = 0.0

    def get(self) -> RegistrySnapshot:
        now = time.monotonic()
        if self._snap is None or now - self._checked >= self.min_interval_s:
            if self._snap is None or version(self.eng) != self._snap.version:
                # Both or neither: a snapshot kept without its secrets would refuse every agency as
                # unknown when the secrets could not be opened (a wrong key file), instead of failing.
                snap, secrets = snapshot(self.eng), secrets_by_agency(self.eng)
                self._snap, self._secrets = snap, secrets
            self._checked = now
        return self._snap

    def secret(self, agency_id: str) -> str | None:
        """The agency's signing secret, as of the last :meth:`get`."""
        return self._secrets.get(agency_id)


def secrets_by_agency(eng: Engine) -> dict[str, str]:
    with eng.connect() as conn:
        rows = list(conn.execute(select(db.agencies.c.id, db.agencies.c.secret)))
    box = SecretBox.for_engine(eng)
    return {r.id: box.open(r.secret) for r in rows}


# ---- Redis ACL ----------------------------------------------------------------------------------------


# Celery's own keys on the Redis broker and result backend (kombu): the queues (broker.app.ALL_QUEUES and
# the shard queues; kombu's priority variants append to the name: tests/unit/test_deploy_cli.py checks),
# the bindings, the unacked bookkeeping, task results and the remote-control (pidbox) queues.
_CELERY_KEYS = (
    "~intake* ~enrol* ~engine.* ~shard.* ~fusion* ~gallery* ~_kombu.* ~unacked* "
    "~celery-task-meta-* ~celery-taskset-meta-* ~*.celery.pidbox* &*"
)
# The rights of each service user (``quorum deploy init`` makes one password each). ``gateway`` reads the
# agencies' intake streams and keeps nonces, quotas and the rejection stream; the workers never touch
# those; neither may run administrative commands (ACL, CONFIG, FLUSHALL, KEYS, DEBUG, SHUTDOWN...).
# ``admin`` is the operator's (ACL LOAD after an agency change, backups); ``exporter`` is redis_exporter's
# (its documented minimum); ``review`` is the reviewers' web app's; ``healthcheck`` may only PING (the
# compose health check; no password).
SERVICE_ACL: dict[str, str] = {
    "gateway": f"~quorum:* {_CELERY_KEYS} +@all -@admin -@dangerous",
    "worker": (
        "~quorum:job:* ~quorum:results:* ~quorum:result:* ~quorum:request:* ~quorum:gallery:* ~quorum:alive:* "
        f"~{keys.TASK_OVERRUNS} ~{keys.DEADLINES} ~{keys.AUDIT_HEAD} {_CELERY_KEYS} "
        "+@all -@admin -@dangerous"
    ),
    # `quorum review` (the reviewers' web app): reads results and the gallery's subject records, keeps its
    # sign-in tokens and sessions, and moves the audit head (accountability.audit_head) past the records it
    # writes; nothing else.
    "review": (
        f"%R~{keys.result_key('*', '*')} %R~{keys.GALLERY_SUBJECTS} ~quorum:review:* ~{keys.AUDIT_HEAD} "
        "-@all +get +mget +hget +hmget +hset +set +getdel +del +evalsha +eval +script|load +ping +hello "
        "+client|setname"
    ),
    "admin": "~* &* +@all",
    "exporter": (
        "-@all +client +ping +info +config|get +cluster|info +slowlog +latency +memory +select +get +scan "
        "+xinfo +type +pfcount +strlen +llen +scard +zcard +hlen +xlen +eval %R~*"
    ),
}


# ``default`` off: every connection must log in (NOAUTH), and no one can log in as ``default`` (off, and no
# password). Its rights are not for clients but for Redis's own: the AOF replay at start runs as ``default``,
# and Redis 7.0 checks the commands of each MULTI/EXEC in the AOF again against that user's rights
# (redis/redis#14541), so a ``default`` with ``-@all`` silently drops every transaction and script of the
# AOF at each restart (the gallery, jobs, kombu's bookkeeping): seen on the local stack.
DEFAULT_USER_OFF = "user default off resetpass resetkeys resetchannels ~* &* +@all"


def render_service_acl(services: Mapping[str, str]) -> str:
    """The services' ACL lines (``{user: sha256 of its password}``; rights from :data:`SERVICE_ACL`), a
    ``healthcheck`` user that may only PING, and ``default`` off (:data:`DEFAULT_USER_OFF`)."""
    unknown = set(services) - set(SERVICE_ACL)
    if unknown:
        raise ValueError(f"no Redis rights defined for service user(s) {sorted(unknown)}; known: {sorted(SERVICE_ACL)}")
    lines = [f"user {u} on #{digest} resetkeys resetchannels {SERVICE_ACL[u]}" for u, digest in services.items()]
    lines.append("user healthcheck on nopass resetkeys resetchannels -@all +ping")
    lines.append(DEFAULT_USER_OFF)
    return "\n".join(lines) + "\n"


def agency_key_patterns(agency_id: str) -> tuple[str, ...]:
    """The key patterns of an agency's Redis user, with their read/write marks (see
    :func:`render_redis_acl`). Each is the agency's own name, or its name followed by ``:`` and ``*``;
    with the id grammar (no ``:``, no glob character) none can match another agency's keys."""
    return (
        f"%W~{keys.intake_stream(agency_id)}",
        f"%R~{keys.results_stream(agency_id)}",
        f"%R~{keys.result_key(agency_id, '*')}",
        f"%R~{keys.request_key(agency_id, '*')}",
    )


def _agency_line(row: Any) -> str:
    state = "on" if row.status == "active" and row.redis_password_sha256 else "off"
    pw = f"#{row.redis_password_sha256}" if row.redis_password_sha256 else "nopass"
    return (
        f"user {redis_user(row.id)} {state} {pw} resetkeys resetchannels {' '.join(agency_key_patterns(row.id))} "
        "-@all +xadd +xread +get +mget +ping +hello +client|setname +wait "
        # a selector: XRANGE, and only XRANGE, may read its own intake stream (is my entry still there?)
        f"(%R~{keys.intake_stream(row.id)} +xrange)"
    )


def _agency_rows(eng: Engine) -> tuple[list[Any], list[tuple[str, str]]]:
    """The agencies whose Redis user may be rendered (ids inside the grammar, by id), and those refused:
    ``(id, why)``. A refused id is never written into an ACL line: a space or a control character breaks
    the file (``redis-server`` then refuses to start) and ``ACL SETUSER``, a ``:`` or a glob character
    widens a key pattern over another agency's keys. ``add_agency`` refuses such ids; these are rows
    stored before it did, or written around it."""
    with eng.connect() as conn:
        rows = list(conn.execute(select(db.agencies).order_by(db.agencies.c.id)))
    good, refused = [], []
    for row in rows:
        why = problem(IdKind.AGENCY, row.id)
        if why is None:
            good.append(row)
        else:
            refused.append((row.id, why))
            log.error("registry.acl_user_refused", agency=ascii(row.id), reason=why)
    return good, refused


def refused_acl_agencies(eng: Engine) -> list[tuple[str, str]]:
    """Registered agencies left out of every ACL rendering because their id is outside the grammar."""
    return _agency_rows(eng)[1]


def render_redis_acl(
    eng: Engine,
    *,
    service_user: str = "",
    service_password_sha256: str = "",
    services: Mapping[str, str] | None = None,
) -> str:
    """An ACL file (``redis-server --aclfile``): one user per agency, confined to its own keys.

    Each agency user may ``XADD`` to ``quorum:intake:<agency>`` (and ``XRANGE`` it, through a
    selector: is my entry still waiting?) and read ``quorum:results:<agency>`` (``XREAD``),
    ``quorum:result:<agency>:*`` and ``quorum:request:<agency>:*`` (``GET``/``MGET``: its results, and
    whether the gateway has claimed a request id), nothing else; a suspended agency's user is ``off``.
    An agency whose id is outside the grammar (``schemas.ids``) is left out, logged
    (``registry.acl_user_refused``): its user cannot log in, and the file stays loadable and confined.
    With ``services`` (``{user: sha256}``: ``quorum deploy init``'s ``redis-services.sha256``) the file
    also defines one least-privilege user per service (:func:`render_service_acl`) and turns ``default``
    off; with ``service_user`` instead, one user for every service (all keys and commands) and ``default``
    off; with neither, the ``default`` user is left with every right (loopback deployments, tests).
    Regenerate it after every agency change and ``ACL LOAD`` it; it holds password hashes only, never
    passwords.
    """
    lines = [_agency_line(a) for a in _agency_rows(eng)[0]]  # (Redis ACL files allow no comments)
    if services:
        return "\n".join(lines) + "\n" + render_service_acl(services)
    if service_user:
        lines.append(f"user {service_user} on #{service_password_sha256} ~* &* +@all")
        lines.append(DEFAULT_USER_OFF)
    else:
        lines.append("user default on nopass ~* &* +@all")
    return "\n".join(lines) + "\n"


def acl_rules(line: str) -> list[str]:
    """An ACL file line's words, as ``ACL SETUSER`` takes them: a selector ``( ... )`` is one word."""
    out: list[str] = []
    depth, cur = 0, ""
    for ch in line.strip():
        if ch == " " and depth == 0:
            if cur:
                out.append(cur)
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    if cur:
        out.append(cur)
    return out


def _agency_users(client: Any) -> list[str]:
    return [
        keys.as_str(u) for u in client.execute_command("ACL", "USERS") or [] if keys.as_str(u).startswith("agency-")
    ]


def apply_redis_acl(eng: Engine, redis_client: Any) -> list[str]:
    """Load every agency's Redis user into a running Redis with ``ACL SETUSER <user> reset <rules>``:
    for a server started without an ACL file, where ``ACL LOAD`` cannot work, and for the local stack's
    (:func:`sync_local_redis`), where ``ACL LOAD`` would also close every service's connections (Redis 7.0
    disconnects the clients of the users it replaces). Only the agency users are touched (never ``default``
    or a service user); an ``agency-*`` user Redis has and the registry does not render (an agency id
    outside the grammar, stored before the grammar was enforced) is deleted. One user that fails does not
    stop the others: every user is tried, then ``REDIS_ACL_NOT_APPLIED`` names those that failed. Returns
    the user names applied."""
    done: list[str] = []
    failed: dict[str, str] = {}
    for row in _agency_rows(eng)[0]:
        words = acl_rules(_agency_line(row))
        try:
            redis_client.execute_command("ACL", "SETUSER", words[1], "reset", *words[2:])
            done.append(words[1])
        except Exception as exc:  # redis' ResponseError, or BROKER_UNAVAILABLE: reported below, never silent
            failed[words[1]] = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ServiceError):
                break  # Redis is away: the other users would fail alike
    if not failed:
        for user in sorted(set(_agency_users(redis_client)) - set(done)):
            redis_client.execute_command("ACL", "DELUSER", user)
            log.warning("registry.acl_user_removed", user=ascii(user), why="not an agency the registry renders")
    if failed:
        log.error("registry.acl_not_applied", failed=failed, applied=done)
        raise ServiceError(
            Code.REDIS_ACL_NOT_APPLIED,
            f"{len(failed)} agency user(s) not applied to Redis ({'; '.join(f'{u}: {e}' for u, e in failed.items())})",
            failed=failed,
        )
    return done


def agency_acl_digest(eng: Engine) -> str:
    """SHA-256 of the agency users the registry renders now: what :data:`broker.keys.REDIS_ACL_APPLIED`
    must hold once Redis has them (the gateway exports the comparison as ``quorum_redis_acl_stale``)."""
    return hashlib.sha256("\n".join(_agency_line(a) for a in _agency_rows(eng)[0]).encode()).hexdigest()


def _pattern_words(value: Any) -> set[str]:
    words = value.split() if isinstance(value, str) else list(value or [])
    return {keys.as_str(w) for w in words}


def check_redis_acl(eng: Engine, client: Any) -> list[str]:
    """How the agency users of a running Redis (``ACL GETUSER``, as a user allowed ``@admin``) differ from
    what the registry renders: a user missing, on where it should be off or the other way, another
    password, other key patterns, or an ``agency-*`` user the registry does not render. Empty when they
    match."""
    problems = []
    wanted: set[str] = set()
    for row in _agency_rows(eng)[0]:
        user = redis_user(row.id)
        wanted.add(user)
        got = client.acl_getuser(user)
        if not got:
            problems.append(f"{user}: missing")
            continue
        on = row.status == "active" and bool(row.redis_password_sha256)
        if bool(got.get("enabled")) != on:
            problems.append(f"{user}: {'off' if on else 'on'} in Redis, {'on' if on else 'off'} in the registry")
        if set(got.get("passwords") or []) != ({row.redis_password_sha256} if row.redis_password_sha256 else set()):
            problems.append(f"{user}: another password")
        if _pattern_words(got.get("keys")) != set(agency_key_patterns(row.id)):
            problems.append(f"{user}: other key patterns ({' '.join(sorted(_pattern_words(got.get('keys'))))})")
    problems += [f"{u!a}: not in the registry" for u in sorted(set(_agency_users(client)) - wanted)]
    return problems


def mark_redis_acl(eng: Engine, client: Any) -> list[str]:
    """Compare the running Redis with the registry (:func:`check_redis_acl`); when they match, record
    the registry's digest under :data:`broker.keys.REDIS_ACL_APPLIED` (what the gateway's
    ``quorum_redis_acl_stale`` compares). Returns the differences (nothing recorded then)."""
    problems = check_redis_acl(eng, client)
    if problems:
        log.error("registry.acl_differs", problems=problems)
        return problems
    client.hset(
        keys.REDIS_ACL_APPLIED,
        mapping={"digest": agency_acl_digest(eng), "at": audit.now_iso(), "registry_version": version(eng)},
    )
    return []


def push_redis_acl(eng: Engine, client: Any) -> list[str]:
    """Bring a running Redis's agency users to the registry (a user allowed ``@admin``): apply them
    (:func:`apply_redis_acl`), close the connections of the users turned off (a user turned off keeps the
    connections it has, so that a suspension takes effect now), check the result and record it
    (:func:`mark_redis_acl`). Any failure is ``REDIS_ACL_NOT_APPLIED`` (retryable: the next registry
    change, ``quorum registry redis-acl --apply`` or ``quorum up`` push the whole ACL again). Returns the
    agency users applied."""
    try:
        applied = apply_redis_acl(eng, client)
        for row in _agency_rows(eng)[0]:
            if row.status != "active":
                client.execute_command("CLIENT", "KILL", "USER", redis_user(row.id))
        problems = mark_redis_acl(eng, client)
    except ServiceError as exc:
        if exc.code == Code.REDIS_ACL_NOT_APPLIED:
            raise
        raise ServiceError(Code.REDIS_ACL_NOT_APPLIED, exc.message) from exc
    except Exception as exc:  # a Redis answer (NOPERM, ...): the same report
        raise ServiceError(Code.REDIS_ACL_NOT_APPLIED, f"{type(exc).__name__}: {exc}") from exc
    if problems:
        raise ServiceError(Code.REDIS_ACL_NOT_APPLIED, f"Redis differs from the registry: {'; '.join(problems)}")
    return applied


def write_local_acl(eng: Engine, home: str | Path, passwords: Mapping[str, str]) -> Path:
    """The local stack's ACL file (``core.local_redis.acl_file``): the agencies' users from the registry,
    the service users ``passwords`` names (rights from :data:`SERVICE_ACL`; hashes only) and ``default`` off."""
    from ..core import local_redis

    path = local_redis.acl_file(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    services = {u: p for u, p in passwords.items() if u in local_redis.SERVICE_USERS}
    return atomic_write(path, render_redis_acl(eng, services=local_redis.password_hashes(services)))


def sync_local_redis(s: Settings) -> list[str] | None:
    """When ``s.redis_url`` is the Redis this home's local stack started (and it runs): write its ACL file
    again from the registry (the next start loads it) and push the agency users to the running server as
    its ``admin`` user (:func:`push_redis_acl`: ``REDIS_ACL_NOT_APPLIED`` when it could not). Returns the
    agency users applied; None when there is no such server (a deployment's Redis: ``quorum registry
    redis-acl``, then ``ACL LOAD``)."""

    from ..core import local_redis

    admin_url = local_redis.service_url(s.home, s.redis_url, local_redis.ADMIN)
    if admin_url is None:
        return None
    from ..broker.sentinel import data_nodes

    eng = db.get_engine(s)
    write_local_acl(eng, s.home, local_redis.read_passwords(s.home))
    # Every data node (behind Sentinel the replica too: the ACL is not replicated); the record of what was
    # applied is written on the primary (a replica refuses writes). A hung server is reported.
    primary, *replicas = data_nodes(admin_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        for replica in replicas:
            try:
                apply_redis_acl(eng, replica)
            except ServiceError:
                raise
            except Exception as exc:
                raise ServiceError(Code.REDIS_ACL_NOT_APPLIED, f"replica: {type(exc).__name__}: {exc}") from exc
        return push_redis_acl(eng, primary)
    finally:
        for client in (primary, *replicas):
            client.close()


class AclWatch:
    """In the gateway: every ``every_s``, whether the agency users Redis was last given
    (:data:`broker.keys.REDIS_ACL_APPLIED`, written by :func:`mark_redis_acl`) are what the registry
    renders now, exported as ``quorum_redis_acl_stale`` (1: a registry change, a suspension say, has not
    reached Redis; alert QuorumRedisAclStale). The gateway's Redis user cannot read the ACL itself
    (``-@admin``), so it compares digests. With no agency and nothing recorded, nothing is stale."""

    def __init__(self, s: Settings | Engine, redis_client: Any) -> None:
        self._source, self.redis = s, redis_client

    def stale(self) -> bool:
        eng = self._source if isinstance(self._source, Engine) else db.get_engine(self._source)
        applied = self.redis.hget(keys.REDIS_ACL_APPLIED, "digest")
        if applied is None:
            return bool(_agency_rows(eng)[0])
        return keys.as_str(applied) != agency_acl_digest(eng)

    def once(self) -> bool | None:
        from ..core import metrics

        try:
            stale = self.stale()
        except Exception as exc:  # the database or Redis away: the gauge keeps its value, logged
            log.warning("registry.acl_watch_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        metrics.REDIS_ACL_STALE.set(1 if stale else 0)
        if stale:
            log.warning("registry.acl_stale", hint="quorum registry redis-acl --apply, or render and ACL LOAD")
        return stale

    def run(self, every_s: float = 30.0) -> None:
        import threading

        def loop() -> None:
            while True:
                self.once()
                time.sleep(every_s)

        threading.Thread(target=loop, name="acl-watch", daemon=True).start()


# ---- convenience for the demo and tests ------------------------------------------------------------------


def provision(
    eng: Engine,
    agency_id: str,
    *,
    users: dict[str, str] | None = None,
    offences: tuple[str, ...] = (),
    purposes: tuple[str, ...] = (),
    cert_days: int = 365,
    daily_quota: int = 0,
    actor: str = "provision",
) -> str:
    """Idempotently register an agency, certified users (``{user: role}``), offence codes and allowed
    purposes; returns the agency's signing secret. For the demo and tests, not for production."""
    secret = agency_secret(eng, agency_id)
    if secret is None:
        secret = add_agency(eng, agency_id, agency_id, daily_quota=daily_quota, actor=actor).secret
    snap = snapshot(eng)
    expires = date.fromordinal(datetime.now(UTC).date().toordinal() + cert_days)
    for user, role in (users or {}).items():
        if user not in snap.users:
            add_user(eng, user, agency_id, role, cert_id=f"CERT-{user}", cert_expires=expires, actor=actor)
    for code in offences:
        if code not in snap.offences:
            add_offence(eng, code, actor=actor)
    for code in purposes:
        if not snap.purposes.get(code):
            set_purpose(eng, code, True, actor=actor)
    return secret


# ---- the demo's registrations ----------------------------------------------------------------------

DEMO_AGENCY = "demo-agency"
DEMO_USER = "demo-user"


def provision_demo(s: Settings) -> str:
    """Register the demo agency, a certified investigator, the offence code and purpose the demo
    uses (idempotent), and apply its Redis user to the local stack's Redis if that runs; returns the
    agency's signing secret."""
    secret = provision(
        db.get_engine(s),
        DEMO_AGENCY,
        users={DEMO_USER: "investigator"},
        offences=("DEMO",),
        purposes=("demo",),
        actor="demo",
    )
    sync_local_redis(s)
    return secret
