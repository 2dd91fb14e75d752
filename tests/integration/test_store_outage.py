"""The object store away for 30 s with probes in flight (issue 10, fault 4): real radosgw killed and
started again, real worker processes, real faces.

A burst of probes is submitted, the S3 endpoint (radosgw) is killed while they are being prepared, a
second burst is submitted into the outage, and radosgw comes back 30 s later with the objects it held
(Ceph's monitor and OSD keep running). Reported (``-s``, recorded in BENCHMARKS.md): sent / answered with
a candidate list / answered with an error, by code / lost. Asserted: nothing is lost; an error is only
ever the retryable ``STORE_UNAVAILABLE``; nothing is left pending (intake stream, Celery queues); every
probe image the store holds is whole (its bytes hash to its content-addressed key), so nothing was
stored half-way; and a probe sent after the store is back gets a candidate list.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import pytest

from quorum.core.objectstore import open_store
from quorum.schemas import CandidateList
from tests.integration.conftest import own_stack

pytestmark = pytest.mark.integration

OUTAGE_S = 30
BURST = 6


@pytest.fixture(scope="module")
def s3_outage_stack(tmp_path_factory, s3_server, data_dir):
    with own_stack(
        tmp_path_factory.mktemp("store-outage"),
        data_dir,
        agency="outage-agency",
        gallery=20,  # its own stack: any slice
        engines="sface",
        s3_endpoint=s3_server.env["S3_ENDPOINT"],
        s3_access_key=s3_server.env["S3_ACCESS_KEY"],
        s3_secret_key=s3_server.env["S3_SECRET_KEY"],
        s3_bucket="quorum-outage",
        gateway_claim_idle_ms=10_000,  # the gateway retries its own pending entries every 5 s
        search_timeout_s=300.0,
    ) as own:
        assert len(own.probes) >= 2 * BURST + 1, len(own.probes)
        yield own.s, own.stack, own.client, own.probes


def test_the_store_away_for_30_s_loses_no_probe_and_stores_nothing_half_way(s3_outage_stack, s3_server):
    import redis as redis_lib

    from quorum.broker import keys
    from quorum.broker.app import queues_of
    from quorum.core.errors import Code, ServiceError

    s, _st, client, probes = s3_outage_stack
    submit = {"case_number": "OUT-1", "offence_code": "PC211", "purpose": "investigation"}
    rids = [client.submit(p, **submit) for p in probes[:BURST]]  # being prepared when the store goes
    time.sleep(0.5)
    s3_server.stop_gateway()
    try:
        t_down = time.monotonic()
        with pytest.raises(ServiceError) as away:  # the outage is real: the store refuses connections
            open_store(s).list("probes/")
        assert away.value.code == Code.STORE_UNAVAILABLE
        rids += [client.submit(p, **submit) for p in probes[BURST : 2 * BURST]]  # sent into the outage
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t_down)))
    finally:
        s3_server.start_gateway()
    t_back = time.monotonic()
    answers = client.wait_all(rids, timeout=240)
    last_s = time.monotonic() - t_back
    outcome = Counter("candidate list" if isinstance(a, CandidateList) else f"error {a.code}" for a in answers.values())
    print(
        f"\nstore away {OUTAGE_S} s: sent {len(rids)}, answered {len(answers)}, {dict(outcome)}, lost 0; "
        f"last answer {last_s:.1f} s after the store came back"
    )
    errors = [a for a in answers.values() if not isinstance(a, CandidateList)]
    assert all(e.code == Code.STORE_UNAVAILABLE.value and e.retryable for e in errors), errors
    assert outcome["candidate list"] >= BURST, outcome  # those sent into the outage waited and were answered

    r = redis_lib.Redis.from_url(s.redis_url)
    deadline = time.monotonic() + 60
    while True:  # nothing left behind: no pending intake entry, no queued task
        pending = r.xpending(keys.intake_stream(client.agency_id), keys.INTAKE_GROUP)["pending"]
        queued = {q: r.llen(q) for q in queues_of(s) if r.llen(q)}
        if pending == 0 and not queued:
            break
        assert time.monotonic() < deadline, f"left behind: {pending} pending entries, queues {queued}"
        time.sleep(1)
    store = open_store(s)
    stored = store.list("probes/")
    assert stored, "no probe image was stored"
    for key in stored:  # content-addressed: a partial write would not hash to its name
        assert hashlib.sha256(store.get(key)).hexdigest() == key.rsplit("/", 1)[1], f"{key} is not whole"
    after = client.wait(client.submit(probes[2 * BURST], **submit), timeout=120)
    assert isinstance(after, CandidateList) and not after.degraded, after
