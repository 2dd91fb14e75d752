"""Micro-batching of model calls across the tasks an engine worker runs at once.

An engine worker runs several search tasks at a time (Celery's threads pool, ``embed_batch`` of
them). Each task loads its probe's image and face, then asks for its template here; one model thread
collects the faces of every task that is asking and runs them through the engine in one call
(``Engine.embed_batch``), up to ``max_batch`` faces. It waits for a face only while another task of
this worker is still preparing one (a *slot* it holds from the start of the task until it submits or
ends), and never longer than ``max_wait_s`` after the first face in the batch: a lone probe is
embedded at once, a burst is embedded together.

The model is used by this one thread only, so engines whose runtime is not thread-safe (OpenCV's
dnn.Net, dlib) are safe under a threaded pool. A batch whose call fails is retried face by face, so
one bad face fails only its own task. Enrolment batches go through the same thread (one submission
of many faces) so they never run beside a search on the same model.

Pure logic (threads and a callable), unit-tested in ``tests/unit/test_batching.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger()


@dataclass
class _Submission:
    items: Sequence[Any]
    future: Future = field(default_factory=Future)
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Batch:
    """What one model call did: faces in it, submissions (tasks) it served, how long the first face
    waited for the others, and the call's time."""

    faces: int
    submissions: int
    waited_s: float
    call_s: float


class MicroBatcher:
    """Runs ``fn(items) -> (n, dim) array`` for the items of concurrent submissions in shared calls."""

    def __init__(
        self,
        fn: Callable[[Sequence[Any]], np.ndarray],
        *,
        max_batch: int,
        max_wait_s: float,
        name: str = "",
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.name = name
        self.on_batch = on_batch
        self._cv = threading.Condition()
        self._queue: list[_Submission] = []
        self._coming = 0  # slots held by tasks that have not submitted yet
        self._local = threading.local()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"embed-batcher-{name}", daemon=True)
        self._thread.start()

    # ---- task side ---------------------------------------------------------------------------------

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Held by a task for its whole run: while it prepares its face, a batch may wait for it."""
        with self._cv:
            self._coming += 1
            self._local.open = True
        try:
            yield
        finally:
            with self._cv:
                if getattr(self._local, "open", False):
                    self._local.open = False
                    self._coming -= 1
                    self._cv.notify_all()

    def submit(self, items: Sequence[Any]) -> np.ndarray:
        """Templates for ``items`` (rows in order), computed in a call shared with other tasks."""
        sub = _Submission(list(items))
        with self._cv:
            if self._closed:
                raise RuntimeError(f"the {self.name} embed batcher is closed")
            if getattr(self._local, "open", False):  # this task's slot is used: nobody waits for it now
                self._local.open = False
                self._coming -= 1
            self._queue.append(sub)
            self._cv.notify_all()
        return sub.future.result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # ---- model thread ------------------------------------------------------------------------------

    def _queued_faces(self) -> int:
        return sum(len(s.items) for s in self._queue)

    def _take(self) -> tuple[list[_Submission], float] | None:
        with self._cv:
            while not self._queue:
                if self._closed:
                    return None
                self._cv.wait()
            deadline = self._queue[0].at + self.max_wait_s
            while self._coming > 0 and self._queued_faces() < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            take: list[_Submission] = []
            faces = 0
            while self._queue and (not take or faces + len(self._queue[0].items) <= self.max_batch):
                sub = self._queue.pop(0)
                take.append(sub)
                faces += len(sub.items)
            return take, time.monotonic() - take[0].at

    def _run(self) -> None:
        while True:
            got = self._take()
            if got is None:
                return
            take, waited = got
            t0 = time.perf_counter()
            self._execute(take)
            if self.on_batch is not None:
                try:
                    self.on_batch(Batch(sum(len(s.items) for s in take), len(take), waited, time.perf_counter() - t0))
                except Exception:  # an observer never stops the model thread
                    log.exception("embed_batch.observer_failed", engine=self.name)

    def _execute(self, take: list[_Submission]) -> None:
        items = [it for sub in take for it in sub.items]
        try:
            out = np.asarray(self.fn(items)) if items else np.zeros((0, 0), dtype=np.float32)
        except Exception as err:
            if len(take) == 1:
                take[0].future.set_exception(err)
                return
            log.warning("embed_batch.failed_retrying_singly", engine=self.name, submissions=len(take), error=str(err))
            for sub in take:  # one bad face must not fail the others
                self._execute([sub])
            return
        if len(out) != len(items):
            wrong = RuntimeError(f"{self.name}: the model returned {len(out)} templates for {len(items)} faces")
            for sub in take:
                sub.future.set_exception(wrong)
            return
        at = 0
        for sub in take:
            sub.future.set_result(out[at : at + len(sub.items)])
            at += len(sub.items)
