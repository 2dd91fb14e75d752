"""64 member agencies at once, each as its own Redis ACL user with its own signing secret: a burst of 5
probes each against the real stack. Every probe is answered; each agency reads only its own results
(and is refused another's); the agencies with a daily quota of 3 get 3 lists and 2 QUOTA_EXCEEDED.
Prints searches/s and the latency percentiles (recorded in BENCHMARKS.md). Bounded: it stops by itself."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList, ErrorResult
from tests.integration import slices

pytestmark = pytest.mark.integration

AGENCIES = 64
PER_AGENCY = 5
QUOTA_AGENCIES = 8  # the first 8 have a daily quota of 3
QUOTA = 3


@pytest.fixture(scope="module")
def agencies(disk_stack, data_dir):
    from quorum.accountability import db, registry
    from quorum.evaluation.ci_split import read_split

    s = disk_stack
    eng = db.get_engine(s)
    rows = read_split(data_dir / "ci")
    gallery = slices.rows(data_dir, "load")
    report = enrol(s, open_store(s), [(r.identity, r.path) for r in gallery])
    assert all(n == len(gallery) for n in report.enrolled.values()), report
    known = {r.identity: r for r in gallery}
    probes = [(r.identity, r.path) for r in rows if r.role == "probe" and r.identity in known]
    admin = redis.Redis.from_url(s.redis_url)
    clients = {}
    for i in range(AGENCIES):
        agency = f"load-{i:02d}"
        creds = registry.add_agency(eng, agency, f"Load agency {i}", daily_quota=QUOTA if i < QUOTA_AGENCIES else 0)
        registry.provision(
            eng, agency, users={f"{agency}-inv": "investigator"}, offences=("PC211",), purposes=("investigation",)
        )
        clients[agency] = (creds, f"{agency}-inv")
    # The agencies' Redis users, exactly as `quorum registry redis-acl` renders them, loaded live.
    applied = registry.apply_redis_acl(eng, admin)
    assert {f"agency-load-{i:02d}" for i in range(AGENCIES)} <= set(applied)
    port = s.redis_url.rsplit(":", 1)[1].split("/")[0]
    out = {
        agency: QuorumClient(
            f"redis://{creds.redis_user}:{creds.redis_password}@127.0.0.1:{port}/0", agency, user, creds.secret
        )
        for agency, (creds, user) in clients.items()
    }
    return s, out, probes


def test_64_agencies_at_once_all_answered_isolated_and_within_quota(agencies):
    _, clients, probes = agencies

    def burst(item):
        i, (agency, client) = item
        mine = [probes[(i * PER_AGENCY + k) % len(probes)] for k in range(PER_AGENCY)]
        sent = {
            client.submit(
                path, case_number=f"L-{i}-{k}", offence_code="PC211", purpose="investigation", candidates=5
            ): who
            for k, (who, path) in enumerate(mine)
        }
        answers = client.wait_all(list(sent), timeout=900)
        return agency, sent, answers

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=AGENCIES) as pool:
        results = list(pool.map(burst, enumerate(clients.items())))
    wall = time.monotonic() - t0

    lists, refusals, wrong, lost = [], [], [], 0
    for i, (agency, sent, answers) in enumerate(sorted(results)):
        lost += len(sent) - len(answers)
        mine_lists = [a for a in answers.values() if isinstance(a, CandidateList)]
        mine_refused = [a.code for a in answers.values() if isinstance(a, ErrorResult)]
        lists += mine_lists
        refusals += mine_refused
        expect_lists = QUOTA if i < QUOTA_AGENCIES else PER_AGENCY
        if len(mine_lists) != expect_lists or mine_refused != ["QUOTA_EXCEEDED"] * (PER_AGENCY - expect_lists):
            wrong.append((agency, len(mine_lists), mine_refused))
        assert all(a.agency_id == agency for a in answers.values())
    latencies = sorted(a.duration_ms / 1000 for a in lists)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    report = {
        "agencies": AGENCIES,
        "sent": AGENCIES * PER_AGENCY,
        "candidate_lists": len(lists),
        "quota_refusals": refusals.count("QUOTA_EXCEEDED"),
        "lost": lost,
        "wall_s": round(wall, 1),
        "searches_per_s": round(len(lists) / wall, 2),
        "latency_median_s": round(statistics.median(latencies), 2),
        "latency_p95_s": round(p95, 2),
    }
    print(f"\nload: {report}")
    assert lost == 0 and not wrong, (report, wrong)
    assert len(lists) == (AGENCIES - QUOTA_AGENCIES) * PER_AGENCY + QUOTA_AGENCIES * QUOTA

    # Isolation: each agency's stream holds only its own answers, and another's is refused.
    a, b = clients["load-10"], clients["load-11"]
    ((_, entries),) = a.redis.xread({keys.results_stream("load-10"): "0"}, count=10_000)
    own = {f[b"request_id"].decode() for _, f in entries}
    assert own and own <= set(a.entries) | {r.request_id for r in lists if r.agency_id == "load-10"}
    for attempt in (
        lambda: a.redis.xread({keys.results_stream("load-11"): "0"}),
        lambda: a.redis.get(keys.result_key("load-11", next(iter(b.entries)))),
        lambda: a.redis.xadd(keys.intake_stream("load-11"), {"payload": "{}"}),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
