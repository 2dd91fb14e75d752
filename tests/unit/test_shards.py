"""Shards: a stable, even split by subject id, and a merge that returns what one index over the whole
gallery returns (synthetic unit vectors: this tests the split and the merge, not face recognition)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from quorum.workers.index import GalleryIndex
from quorum.workers.shards import merge, shard_of


def test_shard_of_is_stable_and_even():
    ids = [f"booking-{i:07d}" for i in range(40_000)]
    assert shard_of("booking-0000042", 8) == shard_of("booking-0000042", 8)  # no per-process salt
    assert shard_of("booking-0000042", 8) == 5  # pinned: a change would move every subject
    counts = Counter(shard_of(i, 8) for i in ids)
    assert set(counts) == set(range(8))
    assert max(counts.values()) / min(counts.values()) < 1.08
    assert {shard_of(i, 1) for i in ids} == {0}
    with pytest.raises(ValueError):
        shard_of("x", 0)


@pytest.mark.parametrize("shards", [2, 3, 4])
def test_merged_shard_answers_equal_one_index_over_the_whole_gallery(shards):
    rng = np.random.default_rng(shards)
    n, dim, k = 3000, 32, 50
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    subjects = [f"p{i // 2}" for i in range(n)]  # two templates per person: best template per subject
    whole = GalleryIndex(dim, ef_search=3000, capacity=n)
    whole.add(list(range(n)), subjects, vecs)
    parts = [GalleryIndex(dim, ef_search=3000, capacity=n) for _ in range(shards)]
    for s, part in enumerate(parts):
        mine = [i for i in range(n) if shard_of(subjects[i], shards) == s]
        part.add(mine, [subjects[i] for i in mine], vecs[mine])
    assert sum(p.subjects for p in parts) == whole.subjects
    for q in rng.standard_normal((20, dim)).astype(np.float32):
        q /= np.linalg.norm(q)
        merged = merge((p.search(q, k) for p in parts), k)
        single = whole.search(q, k)
        assert [h.subject_id for h in merged] == [h.subject_id for h in single]
        assert [h.score for h in merged] == pytest.approx([h.score for h in single], abs=1e-6)
        # ... and both are the exact answer (brute force over the best template of each subject).
        sims = vecs @ q
        best: dict[str, float] = {}
        for i, s_ in enumerate(subjects):
            best[s_] = max(best.get(s_, -2.0), float(sims[i]))
        exact = sorted(best, key=lambda s_: (-best[s_], s_))[:k]
        assert [h.subject_id for h in merged] == exact
