"""Which workers are alive: heartbeats in one sorted set per engine (or shard), read with one command.

A live worker's heartbeat thread sets its node's score in the set (``broker.keys.engine_alive`` /
``shard_alive``) to the Redis server's time plus a few beat intervals; fusion asks whether any score
lies in the future. Redis's clock is used on both sides, so workers' clocks do not matter, and the
lookup is one ZCOUNT on one key (a heartbeat key per worker would need a SCAN of the whole keyspace).
"""

from __future__ import annotations

from typing import Any

from .keys import as_str


def server_time(redis: Any) -> float:
    seconds, micros = redis.time()
    return float(seconds) + float(micros) / 1e6


def _versions_key(key: str) -> str:
    """Hash node -> engine version beside a liveness set (outside the sets' own key pattern)."""
    return "quorum:alive:versions:" + key.removeprefix("quorum:alive:")


INDEX_KEEP_S = 86400  # an index of liveness sets outlives them; names of sets gone are dropped on reading


def heartbeat(redis: Any, key: str, node: str, *, ttl_s: float, version: str = "", index: str = "") -> None:
    """``node`` is alive for ``ttl_s`` more seconds (running engine ``version``, if given); entries that
    ran out are dropped. ``index``: a set that lists ``key`` among its kind's liveness sets (read by
    :func:`indexed_sets`)."""
    now = server_time(redis)
    vkey = _versions_key(key)
    keep = max(1, int(ttl_s * 2))
    pipe = redis.pipeline(transaction=True)  # a node enters the set and the versions together
    pipe.zadd(key, {node: now + ttl_s})
    pipe.zremrangebyscore(key, "-inf", now)
    pipe.expire(key, keep)
    if index:
        pipe.sadd(index, key)
        pipe.expire(index, INDEX_KEEP_S)
    if version:
        pipe.hset(vkey, node, version)
        pipe.expire(vkey, keep)
    pipe.execute()
    # Versions of nodes no longer in the set (read the hash first: a node added meanwhile is in both).
    listed = redis.hkeys(vkey)
    if listed:
        gone = set(listed) - set(redis.zrange(key, 0, -1))
        if gone:
            redis.hdel(vkey, *gone)


def indexed_sets(redis: Any, index: str) -> list[str]:
    """The liveness sets ``index`` lists that still exist (a set expires once its last node stops
    beating; its name is then dropped from the index)."""
    names = sorted(as_str(n) for n in redis.smembers(index))
    if not names:
        return []
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.exists(name)
    present = pipe.execute()
    gone = [n for n, there in zip(names, present, strict=True) if not there]
    if gone:
        redis.srem(index, *gone)
    return [n for n, there in zip(names, present, strict=True) if there]


def live(redis: Any, key: str) -> int:
    """How many workers' heartbeats in ``key`` still hold."""
    return int(redis.zcount(key, server_time(redis), "+inf"))


def members(redis: Any, key: str) -> dict[str, str]:
    """The workers whose heartbeats in ``key`` still hold: node -> engine version ("" if not said)."""
    nodes = [as_str(n) for n in redis.zrangebyscore(key, server_time(redis), "+inf")]
    if not nodes:
        return {}
    versions = redis.hmget(_versions_key(key), nodes)
    return {n: as_str(v) if v is not None else "" for n, v in zip(nodes, versions, strict=True)}


def leave(redis: Any, key: str, node: str) -> None:
    """A worker stopping on purpose: gone at once rather than when its heartbeat runs out."""
    pipe = redis.pipeline(transaction=True)
    pipe.zrem(key, node)
    pipe.hdel(_versions_key(key), node)
    pipe.execute()
