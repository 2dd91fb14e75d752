"""Agency signing secrets sealed at rest, with a key kept outside the database.

The gateway must know each agency's HMAC secret to verify its submissions, so the secret cannot be
stored as a hash; it is stored sealed (Fernet: AES-128-CBC + HMAC-SHA256, from ``cryptography``) as
``sealed:<token>``, and the key lives in a file the database never sees (``QUORUM_SECRETS_KEY_FILE``:
one key a line, the newest first; any listed key opens a secret, the first seals).

Rotation (README "Accountability"): ``quorum registry secrets-key rotate`` puts a new key at the top
of the file and reseals every secret with it in one transaction; the registry version is bumped so
running gateways reload. The old key stays listed (services that have not reloaded can still open
what they cached) until the operator removes its line with ``--drop-old``.

A database copied without the key file yields no usable secret. A value not starting with ``sealed:``
is a secret from before sealing: it is read as it is, and ``quorum registry secrets-key rotate`` (or
any rotation of that agency's credentials) seals it.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import Engine

from ..core.config import settings
from ..core.errors import Code, ServiceError
from ..core.files import atomic_write

log = structlog.get_logger()

PREFIX = "sealed:"


def key_file_for(eng: Engine) -> Path:
    """The key file for this database: the configured one, else beside a SQLite file, else under home."""
    configured = settings().secrets_key_file
    if configured:
        return Path(configured)
    if eng.url.get_backend_name() == "sqlite" and eng.url.database not in (None, "", ":memory:"):
        return Path(str(eng.url.database)).resolve().parent / "secrets.key"
    return Path(settings().home) / "secrets.key"


def read_keys(path: Path, *, create: bool = True) -> list[bytes]:
    if not path.exists():
        if not create:
            raise ServiceError(Code.AUDIT_UNAVAILABLE, f"no secrets key file at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(Fernet.generate_key() + b"\n")
        log.warning(
            "secrets.key_created",
            path=str(path),
            hint="deployments set QUORUM_SECRETS_KEY_FILE to one file shared by every service",
        )
    keys = [line.strip() for line in path.read_bytes().splitlines() if line.strip() and not line.startswith(b"#")]
    if not keys:
        raise ServiceError(Code.AUDIT_UNAVAILABLE, f"the secrets key file {path} holds no key")
    return keys


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
        except ValueError as exc:
            raise ServiceError(Code.AUDIT_UNAVAILABLE, f"a secrets key is malformed: {exc}") from exc

    @classmethod
    def for_engine(cls, eng: Engine) -> SecretBox:
        return cls(read_keys(key_file_for(eng)))

    def seal(self, secret: str) -> str:
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored  # from before sealing
        try:
            return self._fernet.decrypt(stored[len(PREFIX) :].encode()).decode()
        except InvalidToken as exc:
            raise ServiceError(
                Code.AUDIT_UNAVAILABLE, "an agency secret cannot be opened with the keys in the secrets key file"
            ) from exc

    def reseal(self, stored: str) -> str:
        """``stored`` sealed with the newest key (a secret from before sealing is sealed)."""
        if not stored.startswith(PREFIX):
            return self.seal(stored)
        return PREFIX + self._fernet.rotate(stored[len(PREFIX) :].encode()).decode()


def add_new_key(path: Path) -> None:
    """Put a fresh key at the top of the key file (the others stay, to open what they sealed)."""
    old = read_keys(path, create=False)
    atomic_write(path, b"\n".join([Fernet.generate_key(), *old]) + b"\n", mode=0o600)


def drop_old_keys(path: Path) -> int:
    """Keep only the newest key; returns how many were removed."""
    keys = read_keys(path, create=False)
    atomic_write(path, keys[0] + b"\n", mode=0o600)
    return len(keys) - 1
