"""Redis memory and keys against searches answered: a soak of signed searches through the real queue.

    .venv/bin/python bench/redis_soak.py --searches 600 --agencies 4 --hold 20 --hold 604800

Starts its own stack (its own redis-server, embedded disk store, the default engines), enrols the ci
gallery, registers ``--agencies`` member agencies, then for each ``--hold`` (``QUORUM_RESULT_HOLD_S``:
how long Redis holds a published answer) keeps 8 searches in flight, round-robin over the agencies, and
samples Redis (``INFO memory`` used_memory, ``DBSIZE``) every 100 answers; after the last answer it
waits for the hold to pass and samples again. ``--hold 604800`` (the 7-day result TTL) is how Redis kept
everything before answers were let go. Prints one table per hold and the per-search figures (synthetic
load on real faces: the ci probes, repeated).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import redis

from quorum.accountability import db, registry
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol


def _sample(r: redis.Redis) -> tuple[int, int]:
    return int(r.info("memory")["used_memory"]), int(r.dbsize())


def soak(data: Path, port: int, hold: int, searches: int, agencies: int) -> None:
    home = tempfile.mkdtemp(prefix="quorum-soak-")
    s = load_settings(home=home, redis_url=f"redis://127.0.0.1:{port}/0", result_hold_s=hold)
    stack = Stack(s)
    stack.up()
    s = stack.s
    try:
        rows = read_split(data / "ci")
        enrol(s, open_store(s), [(r.identity, r.path) for r in rows if r.role == "gallery"])
        eng = db.get_engine(s)
        clients = []
        for i in range(agencies):
            agency = f"soak-{i}"
            secret = registry.provision(
                eng, agency, users={f"{agency}-inv": "investigator"}, offences=("PC211",), purposes=("investigation",)
            )
            clients.append(QuorumClient(s.redis_url, agency, f"{agency}-inv", secret))
        probes = [r.path for r in rows if r.role == "probe"]
        r = redis.Redis.from_url(s.redis_url)
        for c in clients:  # warm every engine before the baseline
            c.wait(c.submit(probes[0], case_number="SOAK-0", offence_code="PC211", purpose="investigation"), 300)
        time.sleep(min(hold, 30) + 6)
        mem0, keys0 = _sample(r)
        print(f"\n## hold {hold} s: {searches} searches, {agencies} agencies, engines {','.join(s.engines)}")
        print(f"{'answered':>8} {'used_memory_MB':>14} {'keys':>7} {'KB/search':>9} {'keys/search':>11}")
        print(f"{0:>8} {mem0 / 2**20:>14.1f} {keys0:>7}")
        inflight: dict[str, QuorumClient] = {}
        answered = sent = 0
        t0 = time.monotonic()
        while answered < searches:
            while sent < searches and len(inflight) < 8:
                c = clients[sent % agencies]
                rid = c.submit(
                    probes[sent % len(probes)], case_number="SOAK-1", offence_code="PC211", purpose="investigation"
                )
                inflight[rid] = c
                sent += 1
            for rid, c in list(inflight.items()):
                if c.result(rid) is not None:
                    del inflight[rid]
                    answered += 1
                    if answered % 100 == 0:
                        mem, n = _sample(r)
                        kb = (mem - mem0) / answered / 1024
                        print(f"{answered:>8} {mem / 2**20:>14.1f} {n:>7} {kb:>9.1f} {(n - keys0) / answered:>11.2f}")
            time.sleep(0.02)
        rate = searches / (time.monotonic() - t0)
        if hold <= 60:
            time.sleep(hold + 8)
            mem, n = _sample(r)
            kb = (mem - mem0) / searches / 1024
            print(f"{'+hold':>8} {mem / 2**20:>14.1f} {n:>7} {kb:>9.1f} {(n - keys0) / searches:>11.2f}")
        print(f"{rate:.1f} searches/s")
    finally:
        stack.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--searches", type=int, default=600)
    ap.add_argument("--agencies", type=int, default=4)
    ap.add_argument("--hold", type=int, action="append", help="QUORUM_RESULT_HOLD_S to soak with (repeatable)")
    ap.add_argument("--port", type=int, default=6396)
    args = ap.parse_args()
    print(f"# redis soak: {platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    for hold in args.hold or [20, 604800]:
        soak(args.data, args.port, hold, args.searches, args.agencies)


if __name__ == "__main__":
    main()
