"""``/ready`` and ``/live`` of the metrics server, through its WSGI app (pure logic: no server started)."""

from __future__ import annotations

import pytest
from prometheus_client import make_wsgi_app

from quorum.core import metrics


def _get(path: str) -> tuple[str, bytes]:
    seen: list[str] = []
    body = b"".join(
        metrics._with_ready(make_wsgi_app())({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda s, h: seen.append(s))
    )
    return seen[0], body


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(metrics, "_last_beat", [])
    return now


def test_live_holds_without_a_loop_and_while_the_loop_beats(clock):
    assert _get("/live") == ("200 OK", b"live\n")  # no loop (yet): alive while the server answers
    metrics.beat()
    clock[0] += metrics.LIVE_STALE_S - 1
    assert _get("/live")[0] == "200 OK"


def test_live_fails_once_the_loop_stops_coming_round(clock):
    metrics.beat()
    clock[0] += metrics.LIVE_STALE_S + 1
    assert _get("/live") == ("503 Service Unavailable", b"not live\n")
    metrics.beat()
    assert _get("/live")[0] == "200 OK"


def test_ready_is_separate_from_live(clock, monkeypatch):
    monkeypatch.setattr(metrics, "_ready", metrics.threading.Event())
    assert _get("/ready") == ("503 Service Unavailable", b"not ready\n")
    assert _get("/live")[0] == "200 OK"  # loading a model: not ready, but not to be restarted
    metrics._ready.set()
    assert _get("/ready") == ("200 OK", b"ready\n")
    assert _get("/metrics")[0].startswith("200")
