"""Fusion of engines' ranked lists into one candidate list (pure functions, no Celery).

Raw scores of different engines are not comparable (dlib puts different people at 0.8-0.9 cosine,
SFace at 0.2), so every method first puts each engine's list on a common footing:

* ``zsum`` — per probe, each engine's scores are standardised against that same list's bulk
  (median and MAD of the returned scores: with a large gallery almost all of them are non-mates, so
  this estimates the engine's impostor distribution for this probe, the "Z-norm" of score
  normalisation). The fused score is the weighted sum of the standardised scores. A candidate an
  engine did not return gets that engine's lowest standardised score: it is known to be no better.
* ``rrf`` — reciprocal-rank fusion, sum of ``w / (60 + rank)``; uses ranks only.

An engine missing for a probe (failed, timed out) simply contributes nothing; the caller marks the
list degraded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

METHODS = ("zsum", "rrf")
RRF_K = 60.0
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Ranked:
    subject_id: str
    rank: int
    score: float


@dataclass(frozen=True)
class Fused:
    subject_id: str
    rank: int
    fused_score: float
    engines: dict[str, tuple[int, float]]  # engine -> (rank, raw score)


def robust_z(scores: np.ndarray) -> np.ndarray:
    """Standardise scores against their own median and MAD (falls back to std, then to 1)."""
    if scores.size == 0:
        return scores
    med = float(np.median(scores))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(scores - med)))
    if spread <= 1e-9:
        spread = float(np.std(scores))
    if spread <= 1e-9:
        spread = 1.0
    return (scores - med) / spread


def fuse(lists: Mapping[str, Sequence[Ranked]], n: int, method: str = "zsum",
         weights: Mapping[str, float] | None = None) -> list[Fused]:
    """Merge engine lists into the top ``n`` subjects, best first (ties broken by subject id)."""
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}; known: {', '.join(METHODS)}")
    weights = weights or {}
    per_engine: dict[str, dict[str, tuple[int, float]]] = {}
    contrib: dict[str, dict[str, float]] = {}
    floor: dict[str, float] = {}
    for engine, ranked in lists.items():
        if not ranked:
            continue
        w = float(weights.get(engine, 1.0))
        per_engine[engine] = {r.subject_id: (r.rank, r.score) for r in ranked}
        if method == "zsum":
            z = robust_z(np.asarray([r.score for r in ranked], dtype=np.float64))
            contrib[engine] = {r.subject_id: w * float(zi) for r, zi in zip(ranked, z, strict=True)}
            floor[engine] = w * float(z.min())
        else:
            contrib[engine] = {r.subject_id: w / (RRF_K + r.rank) for r in ranked}
            floor[engine] = 0.0
    subjects = set().union(*(c.keys() for c in contrib.values())) if contrib else set()
    totals = {s: sum(c.get(s, floor[e]) for e, c in contrib.items()) for s in subjects}
    order = sorted(totals, key=lambda s: (-totals[s], s))[:n]
    return [
        Fused(
            subject_id=s,
            rank=i + 1,
            fused_score=round(totals[s], 6),
            engines={e: per_engine[e][s] for e in per_engine if s in per_engine[e]},
        )
        for i, s in enumerate(order)
    ]
