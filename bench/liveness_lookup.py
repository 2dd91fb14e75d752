"""What "is anyone serving X?" costs with many unrelated keys in Redis: a SCAN of the keyspace (how
liveness was looked up before broker.liveness) against one sorted set per engine/shard/gateway (now).

Starts its own redis-server on loopback, fills it with N unrelated keys (``DEBUG POPULATE``, keys named
like jobs), and times, side by side at each N:

- ``scan``: the former lookup, a SCAN MATCH for per-worker heartbeat keys (``quorum:alive:engine:sface:*``,
  COUNT 1000) walked to the end of the keyspace;
- ``zcount``: ``broker.liveness.live`` (Redis TIME, then one ZCOUNT on ``quorum:alive:engine:sface``);
- ``shard sets, scan``: the former ``quorum gallery status`` lookup of an engine's shard liveness sets
  (SCAN MATCH ``quorum:alive:shard:sface:*``) against ``broker.liveness.indexed_sets`` (SMEMBERS of the
  index, then EXISTS of each named set);
- ``stream scan``: the gateway's look for intake streams of unregistered agencies (SCAN MATCH
  ``quorum:intake:*`` TYPE stream): a whole walk of the keyspace (what it did every 30 s before), and one
  discovery round of the walk as the gateway now takes it (``Gateway._stray_streams``: STRAY_SCAN_CALLS
  steps every 2 s, going on where the last round stopped).

Synthetic keys (labelled as such); real Redis; medians of repeated lookups.

    .venv/bin/python bench/liveness_lookup.py --keys 10000 1000000
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from types import SimpleNamespace

import redis

from quorum.broker import keys, liveness
from quorum.workers.gateway import Gateway


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: str) -> tuple[subprocess.Popen, redis.Redis]:
    port = _free_port()
    exe = shutil.which("redis-server") or "redis-server"
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", tmp, "--enable-debug-command", "yes"], stdout=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            return proc, r
        except redis.ConnectionError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _scan(r: redis.Redis, pattern: str, **kw) -> int:
    return sum(1 for _ in r.scan_iter(match=pattern, count=1000, **kw))


def measure(r: redis.Redis, n: int, reps_scan: int, reps_fast: int) -> dict:
    r.flushall()
    if n:
        r.execute_command("DEBUG", "POPULATE", n, "quorum:job:synthetic")
    # What the former layout held: one key per live worker; and what the current one holds.
    for i in range(4):
        r.set(f"quorum:alive:engine:sface:node-{i}", "1", ex=600)
        liveness.heartbeat(r, keys.engine_alive("sface"), f"node-{i}", ttl_s=600)
        for shard in range(4):
            key = keys.shard_alive("sface", shard, 4)
            liveness.heartbeat(r, key, f"node-{i}", ttl_s=600, index=keys.shard_alive_index("sface"))
    assert _scan(r, "quorum:alive:engine:sface:*") == 4 and liveness.live(r, keys.engine_alive("sface")) == 4
    assert len(liveness.indexed_sets(r, keys.shard_alive_index("sface"))) == 4
    walker = SimpleNamespace(redis=r, _stray_cursor=0)  # what Gateway._stray_streams reads and moves
    return {
        "keys": r.dbsize(),
        "scan_ms": _median_ms(lambda: _scan(r, "quorum:alive:engine:sface:*"), reps_scan),
        "zcount_ms": _median_ms(lambda: liveness.live(r, keys.engine_alive("sface")), reps_fast),
        "shard_scan_ms": _median_ms(lambda: _scan(r, "quorum:alive:shard:sface:*"), reps_scan),
        "shard_index_ms": _median_ms(lambda: liveness.indexed_sets(r, keys.shard_alive_index("sface")), reps_fast),
        "stream_scan_ms": _median_ms(lambda: _scan(r, "quorum:intake:*", _type="STREAM"), reps_scan),
        "stray_round_ms": _median_ms(lambda: Gateway._stray_streams(walker), reps_fast),  # the real method
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[10_000, 1_000_000], help="unrelated keys in Redis")
    ap.add_argument("--reps-scan", type=int, default=7)
    ap.add_argument("--reps-fast", type=int, default=301)
    args = ap.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"# {subprocess.run(['redis-server', '--version'], capture_output=True, text=True).stdout.strip()}")
    cols = [
        "unrelated keys",
        "SCAN for heartbeat keys (ms)",
        "ZCOUNT liveness set (ms)",
        "x",
        "shard sets: SCAN (ms)",
        "index (ms)",
        "x",
        "stream SCAN, whole walk (ms)",
        "one gateway round of it (ms)",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    with tempfile.TemporaryDirectory() as tmp:
        proc, r = _start(tmp)
        try:
            for n in args.keys:
                m = measure(r, n, args.reps_scan, args.reps_fast)
                row = [
                    f"{m['keys']:,}",
                    f"{m['scan_ms']:.2f}",
                    f"{m['zcount_ms']:.3f}",
                    f"{m['scan_ms'] / m['zcount_ms']:,.0f}",
                    f"{m['shard_scan_ms']:.2f}",
                    f"{m['shard_index_ms']:.3f}",
                    f"{m['shard_scan_ms'] / m['shard_index_ms']:,.0f}",
                    f"{m['stream_scan_ms']:.2f}",
                    f"{m['stray_round_ms']:.2f}",
                ]
                print("| " + " | ".join(row) + " |", flush=True)
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
