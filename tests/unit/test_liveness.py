"""Liveness sets (``broker.liveness``): one sorted set per engine, shard or gateway kind, and for shards an
index of the sets, so that no lookup walks the keyspace (pure logic, on fakeredis)."""

from __future__ import annotations

import fakeredis

from quorum.broker import keys, liveness
from quorum.gallery.versions import live_versions


def test_shard_sets_are_found_through_the_index_and_dropped_when_gone():
    r = fakeredis.FakeRedis()
    index = keys.shard_alive_index("sface")
    for i in range(2):
        liveness.heartbeat(r, keys.shard_alive("sface", i, 2), f"node-{i}", ttl_s=30, version="v1", index=index)
    liveness.heartbeat(r, keys.shard_alive("sface", 0, 4), "node-9", ttl_s=30, version="v2", index=index)
    liveness.heartbeat(r, keys.engine_alive("sface"), "embed-1", ttl_s=30, version="v1")  # not a shard
    assert live_versions(r, "shard", "sface") == {"node-0": "v1", "node-1": "v1", "node-9": "v2"}
    r.delete(keys.shard_alive("sface", 0, 4))  # its last worker's heartbeat ran out: the set expired
    assert liveness.indexed_sets(r, index) == [keys.shard_alive("sface", 0, 2), keys.shard_alive("sface", 1, 2)]
    assert r.smembers(index) == {keys.shard_alive("sface", i, 2).encode() for i in range(2)}
    assert live_versions(r, "shard", "arcface") == {}


def test_the_gateways_are_one_sorted_set():
    r = fakeredis.FakeRedis()
    assert liveness.live(r, keys.GATEWAY_ALIVE) == 0
    liveness.heartbeat(r, keys.GATEWAY_ALIVE, "gw-1", ttl_s=15)
    liveness.heartbeat(r, keys.GATEWAY_ALIVE, "gw-2", ttl_s=15)
    assert liveness.live(r, keys.GATEWAY_ALIVE) == 2
    liveness.leave(r, keys.GATEWAY_ALIVE, "gw-1")
    assert liveness.live(r, keys.GATEWAY_ALIVE) == 1
    r.zadd(keys.GATEWAY_ALIVE, {"gw-2": liveness.server_time(r) - 1})  # its heartbeat ran out
    assert liveness.live(r, keys.GATEWAY_ALIVE) == 0
