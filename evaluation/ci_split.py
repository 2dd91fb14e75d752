"""The labelled ci split (``<data>/ci/split.csv``) and how a run of it is scored.

Each row names an identity, an image file and its role: ``gallery`` / ``distractor_gallery`` images
are enrolled, ``probe`` images are searched and should find their identity at rank 1,
``unknown_probe`` images belong to nobody enrolled. Used by ``quorum demo``, the pipeline bench and
the integration tests.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..schemas import CandidateList, ErrorResult


@dataclass(frozen=True)
class SplitRow:
    identity: str
    path: Path
    role: str


def read_split(ci_dir: Path) -> list[SplitRow]:
    with open(ci_dir / "split.csv", newline="") as fh:
        return [
            SplitRow(r["identity"], ci_dir / "faces" / r["identity"] / r["file"], r["role"]) for r in csv.DictReader(fh)
        ]


@dataclass
class Scorecard:
    mated: int = 0
    non_mated: int = 0
    errors: Counter = field(default_factory=Counter)
    rank1: Counter = field(default_factory=Counter)  # "fused" and each engine -> hits at rank 1
    mated_top_scores: list[float] = field(default_factory=list)
    non_mated_top_scores: list[float] = field(default_factory=list)
    degraded: int = 0

    def rate(self, who: str) -> float:
        return self.rank1[who] / self.mated if self.mated else 0.0


def score_results(
    truth: dict[str, str | None], results: dict[str, CandidateList | ErrorResult], engines: tuple[str, ...]
) -> Scorecard:
    """``truth``: request id -> enrolled identity (None for a non-mated probe)."""
    card = Scorecard()
    for rid, identity in truth.items():
        res = results[rid]
        if identity is None:
            card.non_mated += 1
        else:
            card.mated += 1
        if isinstance(res, ErrorResult):
            card.errors[res.code] += 1
            continue
        card.degraded += res.degraded
        top = res.candidates[0] if res.candidates else None
        if identity is None:
            if top:
                card.non_mated_top_scores.append(top.fused_score)
            continue
        if top:
            card.mated_top_scores.append(top.fused_score)
        if top and top.subject_id == identity:
            card.rank1["fused"] += 1
        for e in engines:
            first = next((c for c in res.candidates if e in c.engines and c.engines[e].rank == 1), None)
            if first and first.subject_id == identity:
                card.rank1[e] += 1
    return card


def format_scorecard(card: Scorecard, engines: tuple[str, ...]) -> str:
    lines = [
        f"mated probes searched: {card.mated}   unknown (non-mated) probes: {card.non_mated}",
        "",
        f"{'engine':<10} {'rank-1 hits':>12} {'rank-1 rate':>12}",
    ]
    for who in (*engines, "fused"):
        lines.append(f"{who:<10} {card.rank1[who]:>12} {card.rate(who):>12.3f}")
    if card.mated_top_scores and card.non_mated_top_scores:
        lines += [
            "",
            f"top fused score (median): mated {statistics.median(card.mated_top_scores):.2f}, "
            f"unknown {statistics.median(card.non_mated_top_scores):.2f}",
        ]
    if card.errors:
        lines.append("errors: " + ", ".join(f"{c}={n}" for c, n in sorted(card.errors.items())))
    if card.degraded:
        lines.append(f"degraded lists (an engine missing): {card.degraded}")
    return "\n".join(lines)
