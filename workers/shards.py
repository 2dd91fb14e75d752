"""Splitting an engine's gallery into shards, and merging the shards' answers (pure functions).

A subject's shard is a stable hash of its id (:func:`shard_of`): the same on every machine and in every
process, independent of enrolment order, and spread evenly. A probe's vector is searched in every
shard; each shard returns its best ``k`` subjects and :func:`merge` keeps the best ``k`` of all, in the
order one index holding the whole gallery would give (score, then subject id). Since a subject lives in
exactly one shard, no subject appears twice.

This is the index-level part of sharding (measured in ``bench/index_1m.py``); the pipeline still
searches one replica of the whole gallery per engine worker (see README "Scaling").
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Sequence

from .index import Hit


def shard_of(subject_id: str, shards: int) -> int:
    """The shard (0..shards-1) that holds ``subject_id``: the first 8 bytes of its SHA-256, modulo."""
    if shards < 1:
        raise ValueError("shards must be at least 1")
    if shards == 1:
        return 0
    digest = hashlib.sha256(subject_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def merge(answers: Iterable[Sequence[Hit]], k: int) -> list[Hit]:
    """The best ``k`` hits over the shards' answers, most similar first (ties: subject id)."""
    return heapq.nsmallest(k, (h for ans in answers for h in ans), key=lambda h: (-h.score, h.subject_id))
