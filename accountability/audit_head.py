"""The audit chain's head kept outside the database: what makes a cut-short trail visible.

The hash chain (:mod:`accountability.audit`) shows an edited, deleted or reordered record, and the
anchors a chain rewritten before the latest anchor; neither shows the *newest* records deleted, or the
tail rewritten and re-hashed since the last anchor. So every audit write also advances a head in
Redis, ``quorum:audit:head`` (a hash: ``seq``, ``hash``, ``ts``), once its transaction has committed,
through one Lua script that only ever moves it forwards (a lower or equal ``seq`` changes nothing).
``quorum audit verify`` then checks the database against it: a stored head past the database's last
record means records were deleted from the end; a stored hash that differs from the database's record
of that ``seq`` means the chain was rewritten.

When Redis cannot be written (down, or credentials without the rights), the database write stands (a
search is not refused for it) and the failure is logged (``audit.head_unavailable``): the head then
lags, and ``verify`` says from which record on it *cannot confirm completeness*. The next write that
reaches Redis covers the records before it, since the chain links them to it. Whoever can write this
key can only move it forwards, which raises an alarm, never hides one.

After a database restored from a backup older than the head, ``verify`` reports the records lost (the
head is past the database's end) and goes on reporting them; the operator acknowledges the loss with
``quorum audit head-reset --reason ...``, which writes an ``audit.head_reset`` record naming the head
it replaced (so the trail itself says what was lost and why) and sets the head to that record.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import structlog

from ..broker import keys
from ..broker.redis_errors import connect

log = structlog.get_logger()

# KEYS[1] the head; ARGV seq, hash, ts. Returns 1 when it moved, 0 when it was already at or past seq.
_ADVANCE = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local seq = tonumber(ARGV[1])
if seq <= cur then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'hash', ARGV[2], 'ts', ARGV[3])
return 1
"""


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str
    ts: str


class OutsideHead:
    """The head in one Redis (``url`` with its credentials)."""

    def __init__(self, url: str, *, timeout_s: float = 2.0, key: str = keys.AUDIT_HEAD) -> None:
        self.url, self.key = url, key
        self.redis = connect(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        self._advance = self.redis.register_script(_ADVANCE)

    def advance(self, seq: int, hash_: str, ts: str) -> bool:
        """Move the head to ``seq`` if it is behind it (raises on a Redis error)."""
        return bool(self._advance(keys=[self.key], args=[int(seq), hash_, ts]))

    def reset(self, seq: int, hash_: str, ts: str) -> None:
        """Set the head to ``seq`` even when it is ahead (``quorum audit head-reset``, after a restore)."""
        self.redis.hset(self.key, mapping={"seq": int(seq), "hash": hash_, "ts": ts})

    def read(self) -> Head | None:
        seq, hash_, ts = self.redis.hmget(self.key, ["seq", "hash", "ts"])  # HMGET: what the review user may
        if seq is None:
            return None
        return Head(int(keys.as_str(seq)), keys.as_str(hash_ or b""), keys.as_str(ts or b""))


_heads: dict[str, OutsideHead] = {}
_lock = threading.Lock()


def for_url(url: str) -> OutsideHead:
    """One :class:`OutsideHead` per Redis URL in this process."""
    with _lock:
        head = _heads.get(url)
        if head is None:
            head = _heads[url] = OutsideHead(url)
        return head


def advance_quietly(url: str, seq: int, hash_: str, ts: str) -> bool:
    """Advance the head at ``url`` after a committed audit write; a failure is logged, never raised (the
    record is in the database; ``verify`` reports the lag)."""
    try:
        for_url(url).advance(seq, hash_, ts)
        return True
    except Exception as exc:  # Redis away, NOPERM: the head lags, verify says from where
        log.warning("audit.head_unavailable", seq=seq, error=f"{type(exc).__name__}: {exc}")
        return False


def forget() -> None:
    """Drop the cached clients (tests; after fork)."""
    with _lock:
        _heads.clear()
