"""1:N and 1:1 metrics: pure functions on arrays (NaN marks "mate not in the list" / "no candidates").

Conventions (ISO/IEC 19795-1 and NIST FRVT 1:N):

* CMC rank-r hit rate: the fraction of mated probes whose mate is at rank <= r. A probe that failed
  (no face, engine failure) or whose mate failed to enrol counts as a miss.
* FPIR(T): the fraction of non-mated probes whose best candidate scores >= T. A non-mated probe
  that produced no candidates cannot be a false positive.
* FNIR(T): the fraction of mated probes whose mate is not in the candidate list with score >= T
  (the whole top-N list, "rank <= N"); failures count as misses.
* FNIR at FPIR p: T is the smallest threshold with FPIR(T) <= p, found from the non-mated top
  scores; with ``m`` non-mated probes, FPIR values below ``1/m`` cannot be resolved and T is then
  just above the highest non-mated score (reported with ``resolvable: false``).
* :func:`threshold_for_fmr`: the 1:1 counterpart over impostor scores (used by the demographics).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def cmc(mate_ranks: Sequence[int] | np.ndarray, ranks: Sequence[int] = (1, 10, 250)) -> dict[int, float]:
    """Hit rate at each rank: fraction of mated probes with 1 <= mate rank <= r (0 = not found)."""
    r = np.asarray(mate_ranks, dtype=np.int64)
    if r.size == 0:
        return {k: float("nan") for k in ranks}
    return {k: float(np.mean((r >= 1) & (r <= k))) for k in ranks}


def fpir_at(nonmated_top: np.ndarray, threshold: float) -> float:
    nm = np.asarray(nonmated_top, dtype=np.float64)
    if nm.size == 0:
        return float("nan")
    return float(np.mean(np.nan_to_num(nm, nan=-np.inf) >= threshold))


def fnir_at(mate_scores: np.ndarray, threshold: float) -> float:
    ms = np.asarray(mate_scores, dtype=np.float64)
    if ms.size == 0:
        return float("nan")
    return float(np.mean(~(np.nan_to_num(ms, nan=-np.inf) >= threshold)))


def threshold_for_fpir(nonmated_top: np.ndarray, target: float) -> tuple[float, bool]:
    """The smallest threshold T with FPIR(T) <= target, and whether ``target`` is resolvable
    (at least one false positive is allowed: target * non-mated probes >= 1)."""
    nm = np.asarray(nonmated_top, dtype=np.float64)
    m = nm.size
    v = np.sort(nm[~np.isnan(nm)])[::-1]
    k = math.floor(target * m + 1e-9)  # false positives allowed
    if k >= v.size:
        return float("-inf"), m > 0 and target * m >= 1
    return float(np.nextafter(v[k], np.inf)), target * m >= 1


def fnir_at_fpir(
    mate_scores: np.ndarray, nonmated_top: np.ndarray, targets: Sequence[float] = (0.001, 0.01)
) -> list[dict]:
    out = []
    for t in targets:
        thr, ok = threshold_for_fpir(nonmated_top, t)
        out.append(
            {
                "fpir_target": t,
                "threshold": thr if math.isfinite(thr) else None,
                "fnir": fnir_at(mate_scores, thr),
                "fpir": fpir_at(nonmated_top, thr),
                "resolvable": ok,
            }
        )
    return out


def det_curve(mate_scores: np.ndarray, nonmated_top: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPIR, FNIR, threshold) at every distinct score, thresholds descending."""
    ms = np.asarray(mate_scores, dtype=np.float64)
    nm = np.asarray(nonmated_top, dtype=np.float64)
    ms_v = np.sort(ms[~np.isnan(ms)])
    nm_v = np.sort(nm[~np.isnan(nm)])
    thr = np.unique(np.concatenate([ms_v, nm_v]))[::-1]
    if thr.size == 0 or ms.size == 0 or nm.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    fp = (nm_v.size - np.searchsorted(nm_v, thr, side="left")) / nm.size
    tp = (ms_v.size - np.searchsorted(ms_v, thr, side="left")) / ms.size
    return fp, 1.0 - tp, thr


def system_metrics(
    mate_ranks: np.ndarray,
    mate_scores: np.ndarray,
    nonmated_top: np.ndarray,
    *,
    ranks: Sequence[int] = (1, 10, 250),
    fpir_targets: Sequence[float] = (0.001, 0.01),
) -> dict:
    r = np.asarray(mate_ranks)
    return {
        "mated_probes": int(r.size),
        "nonmated_probes": int(np.asarray(nonmated_top).size),
        "cmc": {f"rank{k}": v for k, v in cmc(r, ranks).items()},
        "rank1_misses": int(np.sum(r != 1)),
        "fnir_at_fpir": fnir_at_fpir(mate_scores, nonmated_top, fpir_targets),
    }


def threshold_for_fmr(impostor: np.ndarray, target: float) -> float:
    """Smallest threshold with FMR(T) = fraction of impostor scores >= T that is <= target."""
    v = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    k = math.floor(target * v.size + 1e-9)
    if k >= v.size:
        return float("-inf")
    return float(np.nextafter(v[k], np.inf))
