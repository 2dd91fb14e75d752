"""Is one system really better than another on the same probes? Paired significance (pure functions).

* :func:`mcnemar_exact`: the exact two-sided McNemar test on paired rank-1 outcomes. Only the
  discordant probes count: ``b`` = probes system A gets right at rank 1 and B does not, ``c`` = the
  reverse. Under "no difference" each discordant probe is a fair coin, so the p-value is
  ``min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``, computed exactly (integers).
  It treats probes as independent, which LFW's many images of one person from one event are not: read
  it beside the clustered bootstrap below.
* :func:`paired_bootstrap`: a paired, people-clustered, seeded bootstrap of the difference between
  two systems (A minus B) on the same searches. Each replicate draws the mated identities and the
  non-mated identities with replacement (separately, so every replicate has both kinds), and takes
  every probe of a drawn identity as many times as it was drawn. Both systems are scored on that same
  replicate. In each replicate the threshold of FNIR at FPIR ``p`` is **re-derived for each system
  from that replicate's non-mated top scores** (:func:`evaluation.metrics.threshold_for_fpir`), so
  the interval includes the noise of setting the threshold. It reports the 95 % percentile interval
  of: the difference in rank-1 miss rate, the ratio of rank-1 misses (A / B), and the difference in
  FNIR at FPIR ``p``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .metrics import fnir_at, threshold_for_fpir


def discordant(a_hits: np.ndarray, b_hits: np.ndarray) -> tuple[int, int]:
    """(b, c): probes A gets right and B does not, and probes B gets right and A does not."""
    a = np.asarray(a_hits, dtype=bool)
    b = np.asarray(b_hits, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes differ in shape: {a.shape} vs {b.shape}")
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when both 0)."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def fnir_at_fpir_replicate(
    mate_scores: np.ndarray, nonmated_top: np.ndarray, w_mated: np.ndarray, w_nonmated: np.ndarray, fpir: float
) -> float:
    """FNIR at FPIR ``fpir`` of one bootstrap replicate: probe ``i`` taken ``w[i]`` times; the threshold
    is derived from this replicate's non-mated top scores."""
    nm = np.repeat(np.asarray(nonmated_top, dtype=np.float64), np.asarray(w_nonmated, dtype=np.int64))
    ms = np.repeat(np.asarray(mate_scores, dtype=np.float64), np.asarray(w_mated, dtype=np.int64))
    thr, _ = threshold_for_fpir(nm, fpir)
    return fnir_at(ms, thr)


@dataclass(frozen=True)
class Paired:
    """One system's per-probe answers on a part: rank-1 hit, mate score (NaN: absent), non-mated top score."""

    rank1_hit: np.ndarray  # bool per mated probe
    mate_score: np.ndarray  # per mated probe
    nonmated_top: np.ndarray  # per non-mated probe


@dataclass
class BootstrapResult:
    """Point estimates (whole sample) and replicate values of A minus B (and A / B for misses)."""

    fpir: float
    n_boot: int
    seed: int
    miss_rate_diff: float
    miss_ratio: float
    fnir_diff: float
    rep_miss_rate_diff: np.ndarray
    rep_miss_ratio: np.ndarray  # NaN where B has no miss in the replicate
    rep_fnir_diff: np.ndarray

    @staticmethod
    def _ci(v: np.ndarray) -> list[float | None]:
        v = v[~np.isnan(v)]
        if v.size == 0:
            return [None, None]
        lo, hi = np.percentile(v, [2.5, 97.5])
        return [float(lo), float(hi)]

    def to_dict(self) -> dict:
        return {
            "replicates": self.n_boot,
            "seed": self.seed,
            "fpir": self.fpir,
            "thresholds": "re-derived per replicate and system from the replicate's non-mated top scores",
            "rank1_miss_rate_diff": {"estimate": self.miss_rate_diff, "ci95": self._ci(self.rep_miss_rate_diff)},
            "rank1_miss_ratio": {
                "estimate": self.miss_ratio,
                "ci95": self._ci(self.rep_miss_ratio),
                "undefined_replicates": int(np.isnan(self.rep_miss_ratio).sum()),
            },
            "fnir_diff": {"estimate": self.fnir_diff, "ci95": self._ci(self.rep_fnir_diff)},
        }


def _cluster_index(clusters: Sequence[str]) -> tuple[np.ndarray, int]:
    _, inv = np.unique(np.asarray(list(clusters), dtype=object).astype(str), return_inverse=True)
    return inv.astype(np.int64), int(inv.max()) + 1 if len(inv) else 0


def paired_bootstrap(
    a: Paired,
    b: Paired,
    mated_clusters: Sequence[str],
    nonmated_clusters: Sequence[str],
    *,
    fpir: float = 0.01,
    n_boot: int = 1000,
    seed: int = 0,
) -> BootstrapResult:
    """A minus B over people-clustered replicates (see the module docstring); the same seed gives the
    same replicates for every pair of systems scored on the same probes."""
    for name, x, y in (
        ("mated", a.rank1_hit, b.rank1_hit),
        ("mate scores", a.mate_score, b.mate_score),
        ("non-mated", a.nonmated_top, b.nonmated_top),
    ):
        if np.shape(x) != np.shape(y):
            raise ValueError(f"{name} outcomes of A and B are not paired")
    m_inv, m_k = _cluster_index(mated_clusters)
    n_inv, n_k = _cluster_index(nonmated_clusters)
    if len(m_inv) != len(a.rank1_hit) or len(n_inv) != len(a.nonmated_top):
        raise ValueError("one cluster label per probe expected")
    if m_k == 0 or n_k == 0:
        raise ValueError("need mated and non-mated probes")
    a_miss = ~np.asarray(a.rank1_hit, dtype=bool)
    b_miss = ~np.asarray(b.rank1_hit, dtype=bool)

    def stats(wm: np.ndarray, wn: np.ndarray) -> tuple[float, float, float]:
        total = wm.sum()
        ma, mb = float(wm @ a_miss), float(wm @ b_miss)
        ratio = ma / mb if mb > 0 else float("nan")
        fa = fnir_at_fpir_replicate(a.mate_score, a.nonmated_top, wm, wn, fpir)
        fb = fnir_at_fpir_replicate(b.mate_score, b.nonmated_top, wm, wn, fpir)
        return (ma - mb) / total, ratio, fa - fb

    point = stats(np.ones(len(m_inv), dtype=np.int64), np.ones(len(n_inv), dtype=np.int64))
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, 3))
    for r in range(n_boot):
        cm = np.bincount(rng.integers(0, m_k, m_k), minlength=m_k)  # draws per mated identity
        cn = np.bincount(rng.integers(0, n_k, n_k), minlength=n_k)
        reps[r] = stats(cm[m_inv], cn[n_inv])
    return BootstrapResult(fpir, n_boot, seed, *point, reps[:, 0].copy(), reps[:, 1].copy(), reps[:, 2].copy())
