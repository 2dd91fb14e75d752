"""Redis failover under load, on real processes: a primary redis-server, a replica, three redis-sentinels
(quorum 2), and the stack's own processes (gateway, intake, SFace, fusion, gallery as Celery workers)
talking to Redis only through the Sentinel URL (``redis+sentinel://``), with
``QUORUM_REDIS_WAIT_REPLICAS=1`` (an intake entry is acknowledged and a result published only once the
replica has the writes). Agencies submit signed probes through the Python client (it WAITs for the
replica after each XADD, and submits again what Redis no longer knows).

Scenarios, in order, each a burst of 60 probes from three agencies submitting at once, with the failure
injected once a third is submitted, the rest submitted through it (checked to have come before the burst
was answered):

- the primary SIGKILLed (the replica is promoted by the sentinels);
- the old primary started again: it comes back as a replica of the new one, and a burst is answered;
- one sentinel SIGKILLed, then the (new) primary SIGKILLed: two sentinels still make the quorum.

Each reports sent / answered / lost / duplicated (a request id with more than one candidate list on its
agency's results stream) / time to the last answer; every one must show 0 lost, 0 duplicated, every probe
answered with a candidate list. The figures are printed (``-s``) and recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
import redis as redis_lib

from quorum.accountability import db, registry
from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.cli.stack import Stack
from quorum.core.config import load_settings
from quorum.core.objectstore import open_store
from quorum.evaluation.ci_split import read_split
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList
from tests.integration.servers import RedisServer, SentinelServer

pytestmark = pytest.mark.integration

MASTER = "quorum"
AGENCIES = ("ha-north", "ha-south", "ha-east")
PER_AGENCY = 20


def _wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := cond():
                return value
        except (redis_lib.RedisError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Topology:
    """The primary, the replica and the sentinels, and which data node is the primary now."""

    def __init__(self, home) -> None:
        self.nodes = [RedisServer(home / "redis-a", aof=True).start()]
        replica = RedisServer(home / "redis-b", aof=True)
        replica.extra = ("--replicaof", "127.0.0.1", str(self.nodes[0].port))
        self.nodes.append(replica.start())
        self.sentinels = [SentinelServer(home / f"sentinel-{i}", MASTER, self.nodes[0].port).start() for i in range(3)]
        _wait(lambda: self._settled(), 60, "the sentinels to see the replica and each other")
        hosts = ",".join(f"127.0.0.1:{sen.port}" for sen in self.sentinels)
        self.url = f"redis+sentinel://{hosts}/{MASTER}/0"

    def _settled(self) -> bool:
        for sen in self.sentinels:
            c = redis_lib.Redis(port=sen.port, socket_connect_timeout=0.5)
            if len(c.sentinel_slaves(MASTER)) < 1 or len(c.sentinel_sentinels(MASTER)) < 2:
                return False
        return redis_lib.Redis(port=self.nodes[1].port).info("replication")["master_link_status"] == "up"

    def primary(self) -> RedisServer:
        live = next(s for s in self.sentinels if _answers(s.port))
        _, port = redis_lib.Redis(port=live.port).sentinel_get_master_addr_by_name(MASTER)
        return next(n for n in self.nodes if n.port == int(port))

    def other(self, node: RedisServer) -> RedisServer:
        return next(n for n in self.nodes if n is not node)

    def stop(self) -> None:
        for sen in self.sentinels:
            sen.stop()
        for node in self.nodes:
            node.stop()


def _answers(port: int) -> bool:
    try:
        return bool(redis_lib.Redis(port=port, socket_connect_timeout=0.3).ping())
    except redis_lib.RedisError:
        return False


@pytest.fixture(scope="module")
def ha(tmp_path_factory, data_dir):
    home = tmp_path_factory.mktemp("sentinel")
    topo = Topology(home)
    s = load_settings(
        env={},
        home=str(home),
        redis_url=topo.url,
        engines=("sface",),
        redis_wait_replicas=1,
        redis_wait_timeout_ms=1000,
        fusion_deadline_s=10.0,
        task_visibility_timeout_s=20,
        search_timeout_s=300.0,
    )
    stack = Stack(s)
    try:
        stack.up(timeout=300)
        rows = read_split(data_dir / "ci")
        gallery = [r for r in rows if r.role == "gallery"][:20]
        enrol(s, open_store(s), [(r.identity, r.path) for r in gallery])
        known = {r.identity for r in gallery}
        probes = [r.path for r in rows if r.role == "probe" and r.identity in known]
        eng = db.get_engine(s)
        clients = {}
        for agency in AGENCIES:
            secret = registry.provision(
                eng, agency, users={f"{agency}-inv": "investigator"}, offences=("PC211",), purposes=("investigation",)
            )
            clients[agency] = QuorumClient(topo.url, agency, f"{agency}-inv", secret, wait_replicas=1)
        yield topo, stack, clients, probes
    finally:
        stack.down()
        topo.stop()


def _burst(ha, inject, label: str) -> dict:
    """PER_AGENCY probes from each agency, the agencies submitting at once (so a backlog forms), then
    ``inject`` as soon as the last is submitted, with most of the burst still in flight; then count."""
    topo, _, clients, probes = ha
    t0 = time.monotonic()
    sent: dict[str, list[str]] = {a: [] for a in clients}
    lock = threading.Lock()
    failed = {"before": -1}

    def submit(i: int, agency: str) -> None:
        for k in range(PER_AGENCY):
            p = probes[(i * PER_AGENCY + k) % len(probes)]
            rid = clients[agency].submit(
                p, case_number=f"HA-{len(label)}", offence_code="PC211", purpose="investigation", candidates=10
            )
            with lock:
                sent[agency].append(rid)
                # A third of the burst submitted: the failure comes now, from the submitter that got there
                # (the others go on submitting through it: the client waits a failover out).
                if failed["before"] < 0 and sum(map(len, sent.values())) >= PER_AGENCY:
                    failed["before"] = _answered(topo, sent)
                    inject()

    submitters = [threading.Thread(target=submit, args=(i, a)) for i, a in enumerate(clients)]
    for s in submitters:
        s.start()
    for s in submitters:
        s.join(180)
    before = failed["before"]
    answers: dict[str, dict] = {}

    def wait(agency: str) -> None:
        try:
            answers[agency] = clients[agency].wait_all(sent[agency], timeout=240)
        except TimeoutError:
            answers[agency] = {r: a for r in sent[agency] if (a := clients[agency].result(r)) is not None}

    waiters = [threading.Thread(target=wait, args=(a,)) for a in clients]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join(300)
    got = {rid: a for per in answers.values() for rid, a in per.items()}
    # The sentinels may still name the dead primary for a moment after the last answer: wait for one that answers.
    _wait(lambda: _answers(topo.primary().port), 60, "the sentinels to name a primary that answers")
    r = redis_lib.Redis(port=topo.primary().port)
    lists_seen: Counter = Counter()
    for agency in clients:
        for _, f in r.xrange(keys.results_stream(agency)):
            if f.get(b"type") == b"candidate_list":
                lists_seen[f[b"request_id"].decode()] += 1
    rids = [rid for per in sent.values() for rid in per]
    report = {
        "failure": label,
        "sent": len(rids),
        "answered": len(got),
        "candidate_lists": sum(isinstance(a, CandidateList) for a in got.values()),
        "errors": dict(Counter(a.code for a in got.values() if not isinstance(a, CandidateList))),
        "answered_before_the_failure": before,
        "lost": len(rids) - len(got),
        "duplicated": sum(max(0, lists_seen[rid] - 1) for rid in rids),
        "resubmitted_by_client": sum(c.resubmitted.get(rid, 0) for c in clients.values() for rid in rids),
        "unconfirmed_by_replica": sum(c.unconfirmed for c in clients.values()),
        "last_answer_s": round(time.monotonic() - t0, 1),
    }
    print(f"\nfailover: {json.dumps(report)}")
    return report


def _answered(topo: Topology, sent: dict[str, list[str]]) -> int:
    """How many of the burst's requests have their result on the primary now."""
    r = redis_lib.Redis(port=topo.primary().port)
    wanted = [keys.result_key(agency, x) for agency, rids in sent.items() for x in list(rids)]
    return sum(1 for v in r.mget(wanted) if v) if wanted else 0


def _ok(report: dict, mid_burst: bool = True) -> None:
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["candidate_lists"] == report["sent"] == report["answered"], report
    if mid_burst:  # the failure came while the burst was being worked on, not after it
        assert report["answered_before_the_failure"] < report["sent"], report


def test_the_primary_killed_mid_burst_loses_and_duplicates_nothing(ha):
    topo = ha[0]
    old = topo.primary()
    _ok(_burst(ha, old.kill, "primary SIGKILLed"))
    assert topo.primary() is topo.other(old)  # the replica was promoted


def test_the_old_primary_comes_back_as_a_replica(ha):
    topo = ha[0]
    primary = topo.primary()
    old = topo.other(primary)
    old.start()
    _wait(
        lambda: (
            redis_lib.Redis(port=old.port).info("replication")["role"] == "slave"
            and redis_lib.Redis(port=old.port).info("replication")["master_link_status"] == "up"
        ),
        60,
        "the old primary to rejoin as a replica",
    )
    _ok(_burst(ha, lambda: None, "old primary back as a replica"), mid_burst=False)


def test_a_sentinel_down_and_then_the_primary_killed_still_fails_over(ha):
    topo = ha[0]
    topo.sentinels[0].kill()
    primary = topo.primary()
    _ok(_burst(ha, primary.kill, "one sentinel down, then the primary SIGKILLed"))
    assert topo.primary() is topo.other(primary)
