"""Redis holds what is in flight: once a search's answer is published and its hold (``result_hold_s``)
has passed, at most 2 keys and 10 KB of Redis remain per answered search (the request-id claim, and the
nonce for its replay window), and the answer is still found, in the object store, by the candidate sheet.
(Before: about 150 KB and 11.5 keys per search for 7 days.)"""

from __future__ import annotations

import time

import pytest
import redis

from quorum.broker import keys
from quorum.broker.results import fetch
from quorum.core.objectstore import open_store
from quorum.schemas import CandidateList
from tests.integration.conftest import own_stack

pytestmark = pytest.mark.integration

HOLD_S = 12
SEARCHES = 30


def _footprint(r: redis.Redis) -> tuple[int, int]:
    """(keys, bytes) of the whole keyspace, by MEMORY USAGE of every key (the own stack's Redis only)."""
    names = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for k in names:
        pipe.memory_usage(k, samples=0)
    return len(names), sum(int(b or 0) for b in pipe.execute())


def test_after_the_hold_only_the_claim_and_nonce_remain_and_the_sheet_reads_the_store(tmp_path, data_dir):
    with own_stack(
        tmp_path / "stack", data_dir, agency="soak", gallery=20, engines="sface", result_hold_s=HOLD_S
    ) as st:
        r = redis.Redis.from_url(st.s.redis_url)
        probe = st.probes[0]
        first = st.client.submit(probe, case_number="FP-1", offence_code="PC211", purpose="investigation")
        assert isinstance(st.client.wait(first, timeout=120), CandidateList)  # warm: models and gallery loaded
        time.sleep(HOLD_S + 8)  # the warm-up's hold passes too, and the gateway trims the results stream
        keys_before, bytes_before = _footprint(r)
        rids = [
            st.client.submit(p, case_number="FP-2", offence_code="PC211", purpose="investigation")
            for p in (st.probes * SEARCHES)[:SEARCHES]
        ]
        answers = st.client.wait_all(rids, timeout=300)
        assert all(isinstance(a, CandidateList) for a in answers.values()), answers
        _, bytes_in_flight = _footprint(r)
        time.sleep(HOLD_S + 8)
        keys_after, bytes_after = _footprint(r)
        per_search_keys = (keys_after - keys_before) / SEARCHES
        per_search_bytes = (bytes_after - bytes_before) / SEARCHES
        print(
            f"\nredis footprint: {per_search_keys:.2f} keys and {per_search_bytes / 1024:.2f} KB per answered search "
            f"after the hold ({(bytes_in_flight - bytes_before) / SEARCHES / 1024:.1f} KB while held)"
        )
        assert per_search_keys <= 2, (keys_before, keys_after)
        assert per_search_bytes <= 10 * 1024, (bytes_before, bytes_after)
        assert all(r.get(keys.result_key("soak", rid)) is None for rid in rids)  # Redis let the answers go
        assert r.xlen(keys.results_stream("soak")) == 0
        # ... and the answer is still there for the people who read it: from the object store.
        store = open_store(st.s)
        again = fetch(r, "soak", rids[0], store)
        assert isinstance(again, CandidateList) and again == answers[rids[0]]
        from quorum.review.gather import gather

        sheet = gather(st.s, rids[0], agency="soak")
        assert sheet.case.request_id == rids[0] and sheet.fusion_method == again.fusion_method
