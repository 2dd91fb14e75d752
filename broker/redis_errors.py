"""Redis errors translated at the boundary, as the object store translates S3's.

Callers above ``broker`` never see ``redis.exceptions``: a connection refused, a timeout, a server
that is loading its data or out of memory, a read-only replica — each becomes
``ServiceError(BROKER_UNAVAILABLE)``, retryable, and the caller decides what to do from the flag.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis import exceptions as rexc

from ..core.errors import Code, ServiceError
from .keys import as_str


@contextmanager
def redis_boundary(doing: str) -> Iterator[None]:
    """Run a block of Redis calls; any Redis error leaves it as ``BROKER_UNAVAILABLE``."""
    try:
        yield
    except rexc.RedisError as exc:
        raise ServiceError(Code.BROKER_UNAVAILABLE, f"redis {doing}: {type(exc).__name__}: {exc}") from exc


def ensure_group(r: redis.Redis, stream: str, group: str) -> bool:
    """Create a consumer group on ``stream`` (and the stream) unless it exists; True if created.

    Asks the server which groups exist rather than parsing an error's text; a group created by
    another process between the two calls is found on the second look.
    """
    with redis_boundary(f"creating group {group} on {stream}"):
        if _has_group(r, stream, group):
            return False
        try:
            r.xgroup_create(stream, group, id="0", mkstream=True)
            return True
        except rexc.ResponseError:
            if _has_group(r, stream, group):  # another gateway won the race
                return False
            raise


def _has_group(r: redis.Redis, stream: str, group: str) -> bool:
    if not r.exists(stream):
        return False
    for info in r.xinfo_groups(stream):
        fields = {as_str(k): v for k, v in dict(info).items()}
        if as_str(fields.get("name", "")) == group:
            return True
    return False
