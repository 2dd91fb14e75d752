"""QuorumClient notices a refusal keyed by its intake entry at once (fakeredis: pure client logic)."""

from __future__ import annotations

import json
import time

import fakeredis
import pytest

from quorum.broker import keys
from quorum.broker.client import QuorumClient
from quorum.broker.results import publish
from quorum.schemas import ErrorResult


@pytest.fixture()
def client() -> QuorumClient:
    c = QuorumClient("redis://unused", "lasd", "inv-1", secret="s" * 32)
    c.redis = fakeredis.FakeRedis()
    return c


def _refuse(client: QuorumClient, entry_id: str, request_id: str | None, code: str) -> None:
    err = ErrorResult(
        request_id=request_id,
        agency_id="lasd",
        stream_entry_id=entry_id,
        code=code,
        message="refused",
        retryable=False,
        stage="gateway",
    )
    publish(client.redis, err, ttl_s=60, keyed=False)


def test_refusal_on_the_stream_only_is_returned_at_once(client: QuorumClient) -> None:
    rid = client.submit(
        b"\xff\xd8\xff fake jpeg", case_number="C-1", offence_code="PC211", purpose="criminal-investigation"
    )
    entry = client.entries[rid]
    _refuse(client, entry, None, "UNKNOWN_AGENCY")  # answered before wait() starts reading
    t0 = time.monotonic()
    res = client.wait(rid, timeout=5)
    assert isinstance(res, ErrorResult) and res.code == "UNKNOWN_AGENCY" and res.stream_entry_id == entry
    assert time.monotonic() - t0 < 2


def test_refusal_of_another_entry_is_not_taken(client: QuorumClient) -> None:
    rid = client.submit(b"x", case_number="C-1", offence_code="PC211", purpose="criminal-investigation")
    other = client.redis.xadd(keys.intake_stream("lasd"), {"payload": "{}"}).decode()
    _refuse(client, other, rid, "DUPLICATE_REQUEST")  # someone else's entry reusing our id
    with pytest.raises(TimeoutError):
        client.wait(rid, timeout=1.2)


def test_keyed_result_still_found(client: QuorumClient) -> None:
    rid = client.submit(b"x", case_number="C-1", offence_code="PC211", purpose="criminal-investigation")
    err = ErrorResult(
        request_id=rid,
        agency_id="lasd",
        stream_entry_id=client.entries[rid],
        code="NO_FACE",
        message="no face",
        retryable=False,
        stage="intake",
    )
    client.redis.set(keys.result_key("lasd", rid), err.model_dump_json())  # as publish() does
    assert client.wait(rid, timeout=5).code == "NO_FACE"


def test_a_resubmission_refused_as_duplicate_is_not_the_answer(client: QuorumClient) -> None:
    rid = client.submit(b"x", case_number="C-1", offence_code="PC211", purpose="criminal-investigation")
    client.submit(b"x", case_number="C-1", offence_code="PC211", purpose="criminal-investigation", request_id=rid)
    _refuse(client, client.entries[rid], rid, "DUPLICATE_REQUEST")  # the second entry, refused at once
    with pytest.raises(TimeoutError):
        client.wait(rid, timeout=1.2)  # still waiting for the first submission's answer
    answer = ErrorResult(request_id=rid, agency_id="lasd", code="NO_FACE", message="m", retryable=False, stage="intake")
    publish(client.redis, answer, ttl_s=60)
    res = client.wait(rid, timeout=2)
    assert isinstance(res, ErrorResult) and res.code == "NO_FACE"


class _Outage:
    """A Redis connection that fails ``n`` calls (a restart), then behaves."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n = inner, n

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*a, **k):
            if self.n > 0:
                self.n -= 1
                import redis

                raise redis.ConnectionError("Connection refused")
            return attr(*a, **k)

        return call


def test_after_a_redis_outage_requests_redis_lost_are_submitted_again(client: QuorumClient) -> None:
    import threading

    lost = client.submit(b"x", case_number="C-1", offence_code="PC211", purpose="criminal-investigation")
    kept = client.submit(b"y", case_number="C-2", offence_code="PC211", purpose="criminal-investigation")
    real = client.redis
    real.set(keys.request_key("lasd", kept), client.entries[kept])  # the gateway had claimed this one
    real.delete(keys.intake_stream("lasd"))  # the restart lost the stream (and the unclaimed entry)
    client.redis = _Outage(real, 3)
    first_entry = client.entries[lost]

    def answer_later() -> None:  # once the lost request is back in the stream, as a gateway would
        deadline = time.monotonic() + 5
        while not real.xlen(keys.intake_stream("lasd")) and time.monotonic() < deadline:
            time.sleep(0.05)
        for rid in (lost, kept):
            publish(
                real,
                ErrorResult(
                    request_id=rid, agency_id="lasd", code="NO_FACE", message="m", retryable=False, stage="intake"
                ),
                ttl_s=60,
            )

    threading.Thread(target=answer_later).start()
    res = client.wait_all([lost, kept], timeout=10)
    assert set(res) == {lost, kept}
    assert client.resubmitted == {lost: 1}  # the claimed one was not sent again
    assert client.entries[lost] != first_entry
    (entry,) = real.xrange(keys.intake_stream("lasd"))
    assert entry[0].decode() == client.entries[lost]
    assert json.loads(entry[1][b"payload"])["request_id"] == lost  # same request id, signed afresh
    assert entry[1][b"nonce"]


def test_redis_away_for_the_whole_wait_is_a_timeout_not_a_connection_traceback(client: QuorumClient) -> None:
    rid = client.submit(b"x", case_number="C-1", offence_code="PC211", purpose="criminal-investigation")
    client.redis = _Outage(client.redis, 10_000)
    with pytest.raises(TimeoutError, match="Redis unreachable"):
        client.wait(rid, timeout=1.5)


def test_a_submission_waits_out_a_failover_and_gives_up_after_its_limit(client: QuorumClient) -> None:
    """Redis unreachable while the sentinels promote a replica: the client tries again (signing afresh),
    and says so only once ``submit_retry_s`` has passed."""
    import time

    import redis

    real = client.redis
    client.redis = _Outage(real, 2)  # two refused tries, then the new primary answers
    rid = client.submit(b"x", case_number="C-9", offence_code="PC211", purpose="criminal-investigation")
    entries = real.xrange(keys.intake_stream("lasd"))
    assert [e for e, _ in entries if e.decode() == client.entries[rid]]
    assert len(entries) == 1  # one entry: the refused tries wrote nothing
    client.redis = _Outage(real, 10_000)
    client.submit_retry_s = 0.6
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.submit(b"y", case_number="C-10", offence_code="PC211", purpose="criminal-investigation")
    assert 0.5 <= time.monotonic() - t0 < 5
