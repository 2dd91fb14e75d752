"""Redis timers (broker.deadlines) and the fusion worker's sweeper (workers.serve.sweep_timers_once),
on fakeredis with Lua: due timers are sent once, a claim is a lease, and several sweepers share."""

from __future__ import annotations

import fakeredis
import pytest

from quorum.broker import deadlines
from quorum.broker.app import FUSION_QUEUE, TASK_FUSE
from quorum.broker.deadlines import Timer
from quorum.workers import serve


def _timer(rid: str, kind: str = "deadline") -> Timer:
    return Timer(TASK_FUSE, {"request_id": rid, "final": True}, FUSION_QUEUE, f"{rid}.{kind}")


@pytest.fixture
def r():
    return fakeredis.FakeRedis()


def test_only_due_timers_are_claimed_and_a_claim_is_a_lease(r):
    deadlines.schedule(r, _timer("a"), 100.0)
    deadlines.schedule(r, _timer("b"), 200.0)
    assert deadlines.claim_due(r, 50.0) == []
    (a,) = deadlines.claim_due(r, 150.0, lease_s=30)
    assert a == _timer("a")
    assert deadlines.claim_due(r, 160.0, lease_s=30) == []  # leased to the first claimer
    # The claimer died without marking it done: it comes due again when the lease ends.
    assert deadlines.claim_due(r, 181.0, lease_s=30) == [_timer("a")]
    deadlines.done(r, a)
    assert deadlines.claim_due(r, 1000.0) == [_timer("b")]
    assert deadlines.pending(r) == 1


def test_scheduling_the_same_timer_again_moves_it(r):
    deadlines.schedule(r, _timer("a"), 100.0)
    deadlines.schedule(r, _timer("a"), 300.0)
    assert deadlines.pending(r) == 1 and deadlines.oldest_due(r) == 300.0


def test_the_sweeper_sends_each_due_timer_by_name_and_removes_it(r, monkeypatch):
    sent: list[tuple] = []
    monkeypatch.setattr(serve.app, "send_task", lambda name, kwargs, queue: sent.append((name, kwargs, queue)))
    deadlines.schedule(r, _timer("a"), 100.0)
    deadlines.schedule(r, _timer("b", "timeout"), 100.5)
    deadlines.schedule(r, _timer("c"), 500.0)
    assert serve.sweep_timers_once(r, now=101.0) == 2
    assert sent == [
        (TASK_FUSE, {"request_id": "a", "final": True}, FUSION_QUEUE),
        (TASK_FUSE, {"request_id": "b", "final": True}, FUSION_QUEUE),
    ]
    assert serve.sweep_timers_once(r, now=101.0) == 0 and deadlines.pending(r) == 1


def test_a_send_that_fails_leaves_the_timer_to_come_due_again(r, monkeypatch):
    def broken(*a, **k):
        raise ConnectionError("broker away")

    monkeypatch.setattr(serve.app, "send_task", broken)
    deadlines.schedule(r, _timer("a"), 100.0)
    with pytest.raises(ConnectionError):
        serve.sweep_timers_once(r, now=101.0)
    assert deadlines.pending(r) == 1
    sent: list = []
    monkeypatch.setattr(serve.app, "send_task", lambda *a, **k: sent.append(a))
    assert serve.sweep_timers_once(r, now=101.0 + 31) == 1 and deadlines.pending(r) == 0


def test_the_gateway_sets_the_intake_watchdog_before_sending_prepare(r, monkeypatch, tmp_path):
    from quorum.core.config import Settings
    from quorum.core.objectstore import DiskStore
    from quorum.workers import gateway

    order: list[str] = []
    monkeypatch.setattr(gateway, "send_prepare", lambda job: order.append(f"prepare:{deadlines.pending(r)}"))
    gw = gateway.Gateway(r, DiskStore(tmp_path), Settings(home=str(tmp_path), fusion_deadline_s=7.0), registry=object())

    class J:
        request_id = "rq1"

    gw.dispatch(J())  # type: ignore[arg-type]
    assert order == ["prepare:1"]  # the timer was in Redis before prepare was sent
    (timer,) = deadlines.claim_due(r, 1e12)
    assert timer == deadlines.intake_watchdog("rq1")
    assert timer.kwargs == {"request_id": "rq1", "final": True, "watchdog": True}
