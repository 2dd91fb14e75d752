"""Which workers are alive: heartbeats in one sorted set per engine (or shard), read with one command.

A live worker's heartbeat thread sets its node's score in the set (``broker.keys.engine_alive`` /
``shard_alive``) to the Redis server's time plus a few beat intervals; fusion asks whether any score
lies in the future. Redis's clock is used on both sides, so workers' clocks do not matter, and the
lookup is one ZCOUNT on one key (a heartbeat key per worker would need a SCAN of the whole keyspace).
"""

from __future__ import annotations

from typing import Any


def server_time(redis: Any) -> float:
    seconds, micros = redis.time()
    return float(seconds) + float(micros) / 1e6


def heartbeat(redis: Any, key: str, node: str, *, ttl_s: float) -> None:
    """``node`` is alive for ``ttl_s`` more seconds; entries that ran out are dropped."""
    now = server_time(redis)
    pipe = redis.pipeline(transaction=True)
    pipe.zadd(key, {node: now + ttl_s})
    pipe.zremrangebyscore(key, "-inf", now)
    pipe.expire(key, max(1, int(ttl_s * 2)))
    pipe.execute()


def live(redis: Any, key: str) -> int:
    """How many workers' heartbeats in ``key`` still hold."""
    return int(redis.zcount(key, server_time(redis), "+inf"))


def leave(redis: Any, key: str, node: str) -> None:
    """A worker stopping on purpose: gone at once rather than when its heartbeat runs out."""
    redis.zrem(key, node)
