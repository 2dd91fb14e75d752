"""Micro-batching (workers.batching): faces of concurrent tasks share model calls, a lone face waits for
nobody, the wait is bounded, batches are capped, one bad face fails only its task; and, on real faces
with the real SFace and dlib engines, templates computed in shared calls equal those computed alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from quorum.workers.batching import Batch, MicroBatcher
from quorum.workers.detect import Detector
from quorum.workers.engines import get_engine
from quorum.workers.images import decode_image


class Model:
    """Stands in for Engine.embed_batch: row i is [item value, call number]; records each call."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list] = []
        self.delay_s = delay_s
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.calls.append(list(items))
            n = len(self.calls)
        if any(it == "bad" for it in items):
            raise ValueError("unreadable face")
        time.sleep(self.delay_s)
        return np.array([[float(it), n] for it in items], dtype=np.float32)


def run_tasks(batcher: MicroBatcher, values, *, prepare_s=None, slot=True) -> dict:
    """One thread per value, like a threads-pool worker's tasks: hold a slot, 'prepare', submit."""
    out: dict = {}
    go = threading.Barrier(len(values))

    def task(i, v):
        try:
            if slot:
                with batcher.slot():  # taken when the task starts, before it prepares its face
                    go.wait()
                    time.sleep(prepare_s(i) if prepare_s else 0)
                    out[i] = batcher.submit([v])
            else:
                go.wait()
                out[i] = batcher.submit([v])
        except Exception as err:  # what the task would turn into an engine error result
            out[i] = err

    threads = [threading.Thread(target=task, args=(i, v)) for i, v in enumerate(values)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_lone_face_is_embedded_at_once() -> None:
    model, seen = Model(), []
    b = MicroBatcher(model, max_batch=8, max_wait_s=2.0, name="t", on_batch=seen.append)
    t0 = time.monotonic()
    with b.slot():
        got = b.submit([3])
    assert time.monotonic() - t0 < 0.5  # nobody else was preparing: no wait for the 2 s bound
    assert got.tolist() == [[3.0, 1.0]]
    b.close()
    assert seen and seen[0].faces == 1 and seen[0].submissions == 1 and isinstance(seen[0], Batch)


def test_concurrent_tasks_share_one_call_and_get_their_own_rows() -> None:
    model = Model()
    b = MicroBatcher(model, max_batch=8, max_wait_s=2.0, name="t")
    # Six tasks start together and finish preparing at different times within 0.3 s: one call.
    out = run_tasks(b, [10, 11, 12, 13, 14, 15], prepare_s=lambda i: 0.05 * i)
    b.close()
    assert len(model.calls) == 1 and sorted(model.calls[0]) == [10, 11, 12, 13, 14, 15]
    for i in range(6):
        assert out[i].tolist() == [[10.0 + i, 1.0]]


def test_batches_are_capped_at_max_batch() -> None:
    model = Model(delay_s=0.05)
    b = MicroBatcher(model, max_batch=4, max_wait_s=1.0, name="t")
    out = run_tasks(b, list(range(10)), slot=False)
    b.close()
    assert all(len(c) <= 4 for c in model.calls) and sum(len(c) for c in model.calls) == 10
    assert len(model.calls) >= 3
    assert all(out[i][0][0] == i for i in range(10))


def test_wait_is_bounded_by_a_task_that_never_submits() -> None:
    model = Model()
    b = MicroBatcher(model, max_batch=8, max_wait_s=0.1, name="t")
    release = threading.Event()

    def slow_task():  # holds its slot (preparing) for 3 s, then leaves without a face
        with b.slot():
            release.wait(3)

    t = threading.Thread(target=slow_task)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with b.slot():
        got = b.submit([7])
    waited = time.monotonic() - t0
    release.set()
    t.join()
    b.close()
    assert got.tolist() == [[7.0, 1.0]]
    assert 0.05 <= waited < 1.0  # waited for the preparing task, but only up to the bound


def test_a_task_that_leaves_without_a_face_stops_the_wait() -> None:
    model = Model()
    b = MicroBatcher(model, max_batch=8, max_wait_s=5.0, name="t")
    left = threading.Event()

    def gone_task():  # its job was answered already: it leaves its slot after 0.1 s
        with b.slot():
            time.sleep(0.1)
        left.set()

    t = threading.Thread(target=gone_task)
    t.start()
    time.sleep(0.02)
    t0 = time.monotonic()
    with b.slot():
        b.submit([1])
    t.join()
    b.close()
    assert left.is_set() and time.monotonic() - t0 < 2.0  # not the 5 s bound


def test_one_bad_face_fails_only_its_task() -> None:
    model = Model()
    b = MicroBatcher(model, max_batch=8, max_wait_s=2.0, name="t")
    out = run_tasks(b, [1, 2, "bad", 4], prepare_s=lambda i: 0.02 * i)
    b.close()
    assert isinstance(out[2], ValueError)
    assert [out[i][0][0] for i in (0, 1, 3)] == [1.0, 2.0, 4.0]


def test_an_enrolment_batch_larger_than_max_batch_runs_whole() -> None:
    model = Model()
    b = MicroBatcher(model, max_batch=4, max_wait_s=0.5, name="t")
    got = b.submit(list(range(20)))
    b.close()
    assert got[:, 0].tolist() == [float(i) for i in range(20)] and len(model.calls) == 1


def test_wrong_row_count_is_an_error_not_a_misassignment() -> None:
    b = MicroBatcher(lambda items: np.zeros((len(items) - 1, 2)), max_batch=8, max_wait_s=0.1, name="t")
    with pytest.raises(RuntimeError, match="returned 1 templates for 2 faces"):
        b.submit([1, 2])
    b.close()


@pytest.mark.parametrize("name", ["sface", "dlib"])
def test_real_engine_templates_equal_alone_and_batched(name: str, data_dir: Path) -> None:
    det = Detector()
    faces_dir = data_dir / "ci" / "faces"
    items = []
    for person in sorted(p.name for p in faces_dir.iterdir())[:6]:
        img = decode_image(
            next(iter(sorted((faces_dir / person).glob("*.jpg")))).read_bytes(), max_bytes=2**24, max_pixels=4 * 10**7
        )
        items.append((img, max(det.detect(img), key=lambda f: f.box[2] * f.box[3])))
    eng = get_engine(name, "cpu")
    alone = np.stack([eng.embed(img, face) for img, face in items])
    b = MicroBatcher(eng.embed_batch, max_batch=8, max_wait_s=1.0, name=name)
    out = run_tasks(b, items, prepare_s=lambda i: 0.01 * i)
    b.close()
    batched = np.stack([out[i][0] for i in range(len(items))])
    np.testing.assert_allclose(np.sum(alone * batched, axis=1), 1.0, atol=1e-4)
