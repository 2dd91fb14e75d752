"""Timers that survive a dead worker and a restarted Redis: a sorted set of messages due later.

A Celery task sent with a countdown is held, unacknowledged, in the memory of the worker that
reserved it until its time comes; if that worker is killed, the message comes back only when the
broker's visibility timeout expires. The fusion deadline and the search backstop cannot wait that
long, so they are kept in Redis instead (``quorum:deadlines``, scored by the epoch second they are
due, persisted by Redis's AOF like everything else) and sent when due by a sweeper that runs in
every fusion worker (``workers.serve``).

Claiming is atomic and leased: :func:`claim_due` moves due entries ``lease_s`` into the future and
returns them; the sweeper sends each and then :func:`done` removes it. A sweeper that dies after
claiming leaves its entries to come due again ``lease_s`` later, so a timer is delivered at least
once (the fusion stage is idempotent: a second delivery publishes nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import keys, scripts
from .keys import DEADLINES

_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], member)
end
return due
"""


@dataclass(frozen=True)
class Timer:
    task: str
    kwargs: dict[str, Any]
    queue: str
    timer_id: str  # one timer per id: scheduling the same id again moves it

    def encode(self) -> str:
        return json.dumps(
            {"id": self.timer_id, "task": self.task, "kwargs": self.kwargs, "queue": self.queue},
            sort_keys=True,
            separators=(",", ":"),
        )

    @staticmethod
    def decode(raw: bytes | str) -> Timer:
        d = json.loads(keys.as_str(raw))
        return Timer(task=d["task"], kwargs=d["kwargs"], queue=d["queue"], timer_id=d["id"])


def intake_watchdog(request_id: str) -> Timer:
    """The timer the gateway sets when it admits a probe: fusion checks that intake ran
    (``workers.stages.fuse(watchdog=True)``) and sends ``prepare`` again if its message was lost."""
    from .app import FUSION_QUEUE, TASK_FUSE

    return Timer(
        TASK_FUSE, {"request_id": request_id, "final": True, "watchdog": True}, FUSION_QUEUE, f"{request_id}.watchdog"
    )


def schedule(redis: Any, timer: Timer, due_at: float) -> None:
    redis.zadd(DEADLINES, {timer.encode(): due_at})


def claim_due(redis: Any, now: float, *, lease_s: float = 30.0, limit: int = 100) -> list[Timer]:
    """Timers due at ``now``, leased to the caller for ``lease_s`` (then due again unless done)."""
    raw = scripts.call(redis, _CLAIM, [DEADLINES], [now, now + lease_s, limit])
    return [Timer.decode(r) for r in raw or []]


def done(redis: Any, timer: Timer) -> None:
    redis.zrem(DEADLINES, timer.encode())


def pending(redis: Any) -> int:
    return int(redis.zcard(DEADLINES))


def oldest_due(redis: Any) -> float | None:
    """The due time of the earliest timer (for the metrics: a sweeper that stopped shows as age)."""
    first = redis.zrange(DEADLINES, 0, 0, withscores=True)
    return float(first[0][1]) if first else None
