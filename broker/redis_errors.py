"""Redis errors translated at the boundary, as the object store translates S3's.

Callers above ``broker`` never see Redis being away as ``redis.exceptions``: a connection refused, a
timeout, a server that is loading its data or out of memory, a read-only replica — each becomes
``ServiceError(BROKER_UNAVAILABLE)``, retryable, and the caller decides what to do from the flag.

Two ways in: every client Quorum opens is a :class:`BoundaryRedis` (:func:`connect`), whose commands,
pipelines and scripts translate those errors themselves, so stages, the gallery and enrolment need no
code of their own for it; and :func:`redis_boundary` around a block that must also translate Redis's
other errors (a protocol error while creating a consumer group, say). Errors that are answers rather
than absence (``NOPERM``, ``WRONGTYPE``, a ``WATCH`` that failed) pass through unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis
from redis import exceptions as rexc

from ..core.errors import Code, ServiceError
from .keys import as_str

# Redis is away, or cannot take writes now: worth trying again later.
UNAVAILABLE = (
    rexc.ConnectionError,  # refused, reset, loading its data (BusyLoadingError), too many clients
    rexc.TimeoutError,
    rexc.ReadOnlyError,  # a replica (or a primary just demoted by a failover)
    rexc.OutOfMemoryError,  # maxmemory reached
    rexc.TryAgainError,
)


# ... except credentials refused (NOAUTH, WRONGPASS): a setting to fix, not an absence; they pass unchanged.
REFUSED = (rexc.AuthenticationError, rexc.AuthorizationError)


def _translated(call, doing: str, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except REFUSED:
        raise
    except UNAVAILABLE as exc:
        raise ServiceError(Code.BROKER_UNAVAILABLE, f"redis {doing}: {type(exc).__name__}: {exc}") from exc


class BoundaryPipeline(redis.client.Pipeline):
    def execute(self, raise_on_error: bool = True):
        return _translated(super().execute, "pipeline", raise_on_error)

    def immediate_execute_command(self, *args, **options):
        return _translated(super().immediate_execute_command, str(args[0]), *args, **options)


class BoundaryRedis(redis.Redis):
    """A Redis client whose every command translates Redis being away into ``BROKER_UNAVAILABLE``."""

    def execute_command(self, *args, **options):
        return _translated(super().execute_command, str(args[0]), *args, **options)

    def pipeline(self, transaction: bool = True, shard_hint=None) -> BoundaryPipeline:
        return BoundaryPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def connect(url: str, **kwargs) -> BoundaryRedis:
    """The Redis client for ``url`` (``redis://`` or ``rediss://``, with its user and password, or
    ``redis+sentinel://``: the primary its sentinels name, followed through a failover, broker.sentinel);
    ``kwargs`` as ``redis.Redis.from_url`` takes them."""
    from .sentinel import open_redis

    client = open_redis(url, BoundaryRedis, **kwargs)
    assert isinstance(client, BoundaryRedis)
    return client


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
