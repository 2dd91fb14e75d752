"""The HNSW gallery index: recall against brute force (seeded synthetic vectors, which is fine for an
index test), again after save/load and after removals; subject collapsing; idempotent adds."""

import numpy as np
import pytest

from quorum.core.config import Settings
from quorum.workers.index import GalleryIndex

DIM = 64
# The parameters Quorum ships with (random vectors on a 64-d sphere are a harder case than face
# embeddings, which cluster: a recall bound that holds here holds with room to spare there).
S = Settings()
PARAMS = dict(m=S.hnsw_m, ef_construction=S.hnsw_ef_construction, ef_search=S.hnsw_ef_search)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(gallery, subjects, alive, q, k):
    sims = gallery @ q
    order = [i for i in np.argsort(-sims) if alive[i]]
    return [subjects[i] for i in order[:k]]


def _recall(index, gallery, subjects, alive, queries, k):
    hit = total = 0
    for q in queries:
        truth = set(_brute(gallery, subjects, alive, q, k))
        got = {h.subject_id for h in index.search(q, k)}
        hit += len(truth & got)
        total += len(truth)
    return hit / total


@pytest.fixture(scope="module")
def built():
    n = 5000
    g = _data(n, seed=1)
    subjects = [f"s{i}" for i in range(n)]
    idx = GalleryIndex(DIM, **PARAMS, capacity=1000)  # forces resizes
    idx.add(list(range(n)), subjects, g)
    return idx, g, subjects


def test_recall_against_brute_force(built):
    idx, g, subjects = built
    q = _data(100, seed=2)
    assert len(idx) == 5000
    assert _recall(idx, g, subjects, [True] * len(g), q, 50) >= 0.99


def test_recall_after_save_and_load(built):
    idx, g, subjects = built
    data, meta = idx.to_bytes()
    back = GalleryIndex.from_bytes(data, meta)
    q = _data(100, seed=3)
    assert len(back) == len(idx)
    assert _recall(back, g, subjects, [True] * len(g), q, 50) >= 0.99
    assert [h.subject_id for h in back.search(q[0], 10)] == [h.subject_id for h in idx.search(q[0], 10)]


def test_recall_after_removals_and_removed_never_returned():
    n = 3000
    g = _data(n, seed=4)
    subjects = [f"s{i}" for i in range(n)]
    idx = GalleryIndex(DIM, **PARAMS)
    idx.add(list(range(n)), subjects, g)
    rng = np.random.default_rng(5)
    gone = set(rng.choice(n, 600, replace=False).tolist())
    for i in gone:
        assert idx.remove_subject(f"s{i}") == 1
    alive = [i not in gone for i in range(n)]
    q = _data(100, seed=6)
    # Queries right on top of removed items must not bring them back.
    q = np.vstack([q, g[sorted(gone)[:50]]])
    assert _recall(idx, g, subjects, alive, q, 50) >= 0.99
    removed = {f"s{i}" for i in gone}
    for v in q:
        assert not removed & {h.subject_id for h in idx.search(v, 100)}
    data, meta = idx.to_bytes()
    back = GalleryIndex.from_bytes(data, meta)
    assert len(back) == n - 600
    assert _recall(back, g, subjects, alive, q, 50) >= 0.99
    assert idx.remove_subject("s-never-enrolled") == 0


def test_several_templates_collapse_to_best_per_subject():
    g = _data(300, seed=7)
    subjects = [f"s{i // 3}" for i in range(300)]  # 100 subjects, 3 templates each
    idx = GalleryIndex(DIM)
    idx.add(list(range(300)), subjects, g)
    hits = idx.search(g[4], 10)
    assert hits[0].subject_id == "s1" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 10 and len({h.subject_id for h in hits}) == 10
    assert idx.subjects == 100 and len(idx) == 300
    assert len(idx.search(g[0], 500)) == 100  # more asked than subjects exist: all of them, no error


def test_adds_are_idempotent_and_empty_index_returns_nothing():
    idx = GalleryIndex(DIM)
    assert idx.search(_data(1)[0], 5) == []
    g = _data(10, seed=8)
    assert idx.add(list(range(10)), [f"s{i}" for i in range(10)], g) == 10
    assert idx.add(list(range(10)), [f"s{i}" for i in range(10)], g) == 0
    assert len(idx) == 10
