"""The resumable batch loop of bulk enrolment and reindex."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..broker import keys

T = TypeVar("T")


def run_batches(
    r,
    job: str,
    todo: Sequence[T],
    *,
    dispatch: Callable[[list[tuple[int, T]]], dict[str, Any]],
    absorb: Callable[[str, dict], None],
    batch: int,
    window: int,
    deadline: float,
    progress: Callable[[int, int], None] | None = None,
    snapshot: Callable[[], None] | None = None,
    snapshot_every: int = 0,
    final_snapshot: bool = True,
) -> tuple[int, int]:
    """The resumable batch loop of bulk enrolment and reindex: ``todo`` in batches of ``batch``, at most
    ``window`` in flight. A batch whose every task answered is marked in the job's Redis bitmap
    (``keys.enrol_job_done``, 1 bit an item, by position), and a rerun of the same job skips it.

    ``dispatch(chunk)`` sends a batch (``[(position, item)]``, the items not done yet) and returns its
    Celery results by name; ``absorb(name, answer)`` takes each answer. ``snapshot()`` is called after
    about every ``snapshot_every`` items finished and, with ``final_snapshot``, at the end (if any
    finished). Returns (items skipped as done by an earlier run, items finished now)."""
    loop = _BatchLoop(r, keys.enrol_job_done(job), len(todo), absorb, deadline, progress, snapshot, snapshot_every)
    for start in range(0, len(todo), batch):
        chunk = loop.not_done(list(enumerate(todo[start : start + batch], start=start)))
        if not chunk:
            loop.report()
            continue
        loop.inflight.append(([pos for pos, _ in chunk], dispatch(chunk)))
        while len(loop.inflight) >= window:
            loop.collect()
    while loop.inflight:
        loop.collect()
    if snapshot and final_snapshot and (loop.since_snapshot or loop.snapshots == 0) and loop.finished:
        snapshot()
    return loop.skipped, loop.finished


class _BatchLoop:
    """The loop's state: the batches in flight, what is done, and when the next snapshot is due."""

    def __init__(self, r, done_key: str, total: int, absorb, deadline: float, progress, snapshot, snapshot_every: int):
        self.r, self.done_key, self.total = r, done_key, total
        self.absorb, self.deadline, self.progress = absorb, deadline, progress
        self.snapshot, self.snapshot_every = snapshot, snapshot_every
        self.inflight: deque[tuple[list[int], dict[str, Any]]] = deque()
        self.skipped = self.finished = self.since_snapshot = self.snapshots = 0

    def not_done(self, whole: list[tuple[int, T]]) -> list[tuple[int, T]]:
        """The items of a batch an earlier run of the job has not finished (one round trip)."""
        pipe = self.r.pipeline()
        for pos, _ in whole:
            pipe.getbit(self.done_key, pos)
        bits = pipe.execute()
        chunk = [(pos, it) for (pos, it), bit in zip(whole, bits, strict=True) if not bit]
        self.skipped += len(whole) - len(chunk)
        return chunk

    def collect(self) -> None:
        """Wait for the oldest batch in flight, take its answers and mark it done."""
        positions, results = self.inflight.popleft()
        for name, res in results.items():
            self.absorb(name, res.get(timeout=max(1.0, self.deadline - time.monotonic()), propagate=True))
            res.forget()
        pipe = self.r.pipeline()
        for pos in positions:
            pipe.setbit(self.done_key, pos, 1)
        pipe.expire(self.done_key, 30 * 24 * 3600)
        pipe.execute()
        self.finished += len(positions)
        self.since_snapshot += len(positions)
        if self.snapshot and self.snapshot_every and self.since_snapshot >= self.snapshot_every:
            self.snapshot()
            self.snapshots += 1
            self.since_snapshot = 0
        self.report()

    def report(self) -> None:
        if self.progress:
            self.progress(self.skipped + self.finished, self.total)
