"""``quorum demo``: the whole job on real faces, end to end through the queue.

Starts the local stack, enrols the gallery and distractors of ``<data>/ci/split.csv``, searches every
probe and unknown probe through the agency intake stream, prints each engine's and the fused rank-1
hit rate and what unknown probes scored, then stops the stack.
"""

from __future__ import annotations

import csv
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from schemas import CandidateList, ErrorResult

DEMO_AGENCY = "demo-agency"
DEMO_USER = "demo-user"


@dataclass(frozen=True)
class SplitRow:
    identity: str
    path: Path
    role: str


def read_split(ci_dir: Path) -> list[SplitRow]:
    with open(ci_dir / "split.csv", newline="") as fh:
        return [SplitRow(r["identity"], ci_dir / "faces" / r["identity"] / r["file"], r["role"])
                for r in csv.DictReader(fh)]


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


def score_results(truth: dict[str, str | None], results: dict[str, CandidateList | ErrorResult],
                  engines: tuple[str, ...]) -> Scorecard:
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
    lines = [f"mated probes searched: {card.mated}   unknown (non-mated) probes: {card.non_mated}",
             "", f"{'engine':<10} {'rank-1 hits':>12} {'rank-1 rate':>12}"]
    for who in (*engines, "fused"):
        lines.append(f"{who:<10} {card.rank1[who]:>12} {card.rate(who):>12.3f}")
    if card.mated_top_scores and card.non_mated_top_scores:
        lines += ["", "top fused score (median): mated {:.2f}, unknown {:.2f}".format(
            statistics.median(card.mated_top_scores), statistics.median(card.non_mated_top_scores))]
    if card.errors:
        lines.append("errors: " + ", ".join(f"{c}={n}" for c, n in sorted(card.errors.items())))
    if card.degraded:
        lines.append(f"degraded lists (an engine missing): {card.degraded}")
    return "\n".join(lines)


def provision_demo(s) -> str:
    """Register the demo agency, a certified investigator, the offence code and purpose the demo
    uses (idempotent); returns the agency's signing secret."""
    from quorum import db, registry

    return registry.provision(db.get_engine(s), DEMO_AGENCY, users={DEMO_USER: "investigator"},
                              offences=("DEMO",), purposes=("demo",), actor="demo")


def enrol_and_search(s, rows: list[SplitRow], *, echo=print, bar_factory=None) -> tuple[Scorecard, dict]:
    """Enrol the split's gallery and distractors, search its probes through the queue, score them.

    The stack must be up. Returns the scorecard and timings/enrolment figures.
    """
    import time

    from broker.client import QuorumClient
    from quorum.galleryadmin import enrol
    from quorum.objectstore import open_store

    bar_factory = bar_factory or (lambda label, total: None)
    gallery_rows = [r for r in rows if r.role in {"gallery", "distractor_gallery"}]
    echo(f"[2/4] enrolling {len(gallery_rows)} gallery images into {len(s.engines)} engines ...")
    bar = bar_factory("enrolling (image x engine)", len(gallery_rows) * len(s.engines))
    report = enrol(s, open_store(s), [(r.identity, r.path) for r in gallery_rows],
                   progress=(lambda done, total: bar(done)) if bar else None)
    echo(f"      templates added {report.enrolled}, failed to enrol "
         f"{ {e: len(f) for e, f in report.failed.items()} } ({report.seconds:.0f}s)")
    probes = [r for r in rows if r.role in {"probe", "unknown_probe"}]
    echo(f"[3/4] searching {len(probes)} probes through the queue ...")
    client = QuorumClient(s.redis_url, DEMO_AGENCY, DEMO_USER, provision_demo(s))
    truth: dict[str, str | None] = {}
    t1 = time.monotonic()
    for r in probes:
        rid = client.submit(r.path, case_number="DEMO-0001", offence_code="DEMO", purpose="demo")
        truth[rid] = r.identity if r.role == "probe" else None
    bar = bar_factory("searching (probes answered)", len(truth))
    results = client.wait_all(list(truth), timeout=3600, progress=bar)
    elapsed = time.monotonic() - t1
    card = score_results(truth, results, s.engines)
    echo(f"[4/4] results ({len(probes) / elapsed:.1f} searches/s through the queue):")
    echo(format_scorecard(card, s.engines))
    return card, {"enrol": report, "search_seconds": elapsed, "results": results, "truth": truth}
