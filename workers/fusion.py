"""Fusion of engines' ranked lists into one candidate list (pure functions, no Celery).

Raw scores of different engines are not comparable (dlib puts different people at 0.8-0.9 cosine,
SFace at 0.2), so every method first puts each engine's list on a common footing. Two methods need
no calibration:

* ``zsum`` — per probe, each engine's scores are standardised against that same list's bulk
  (median and MAD of the returned scores: with a large gallery almost all of them are non-mates, so
  this estimates the engine's impostor distribution for this probe, the "Z-norm" of score
  normalisation). The fused score is the weighted sum of the standardised scores.
* ``rrf`` — reciprocal-rank fusion, sum of ``w / (60 + rank)``; uses ranks only (60 is the constant
  of Cormack et al. 2009, not tuned here).

Three methods use a :class:`Calibration` learned from data by :func:`fit` (``quorum calibrate``),
stored as JSON with each engine's name and version (OpenBR style: normalisation parameters are
trained, saved next to the model, never written into code):

* ``zsum_cal`` — each engine's score z-normalised with that engine's *impostor* mean and standard
  deviation measured on the fit data (fixed per engine, not per probe), then averaged with equal
  weights: the classic normalised-score sum.
* ``llr`` — each engine's score mapped to a log-likelihood ratio from Gaussian fits of its genuine
  and impostor scores, summed (naive Bayes: assumes the engines' errors are independent).
* ``logit`` — logistic regression over per-engine features (fixed z, per-probe robust z, whether the
  engine returned the candidate), fitted on the fit data; the fused score is the log-odds that the
  candidate is the probe's mate. One model is fitted for every subset of engines, so an engine
  missing for a whole probe is handled by the model fitted without it (marginalised by refitting,
  not by imputing the engine).

Missing data, the same for every method:

* a candidate an engine did not return gets that engine's *lowest returned score* for the probe
  (its true score is known to be no higher: the list is the engine's top N), and counts as absent
  for the ``present`` feature of ``logit``; for ``rrf`` it contributes nothing;
* an engine missing for a whole probe (failed, timed out, empty list) contributes nothing:
  ``zsum`` and ``rrf`` sum over the engines present, ``zsum_cal`` and ``llr`` average / sum over the
  engines present (``zsum_cal`` divides by the present engines' weight so fused scores of degraded
  probes stay on the same scale), ``logit`` uses the subset model. The caller marks the list degraded.

Wrong parameters are worse than none: when the calibration names an engine version different from
the engine that produced a list (pass ``versions``), or lacks an engine, a calibrated method falls
back to the calibration-free ``zsum`` for that probe and logs ``fusion.calibration_mismatch``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger()

METHODS = ("zsum", "rrf", "zsum_cal", "llr", "logit")
CALIBRATED = frozenset({"zsum_cal", "llr", "logit"})
FALLBACK_METHOD = "zsum"
RRF_K = 60.0
_MAD_TO_SIGMA = 1.4826
CALIBRATION_FORMAT = 1
DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"


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


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


@dataclass
class EngineCalibration:
    """One engine's learned score normalisation (all values measured on the fit data)."""

    name: str
    version: str
    impostor_mean: float
    impostor_std: float
    genuine_mean: float
    genuine_std: float
    impostor_pairs: int = 0
    genuine_pairs: int = 0

    def z(self, s: np.ndarray | float) -> np.ndarray:
        return (np.asarray(s, dtype=np.float64) - self.impostor_mean) / self.impostor_std

    def llr(self, s: np.ndarray | float) -> np.ndarray:
        s = np.asarray(s, dtype=np.float64)
        zg = (s - self.genuine_mean) / self.genuine_std
        zi = (s - self.impostor_mean) / self.impostor_std
        return -0.5 * zg**2 + 0.5 * zi**2 + math.log(self.impostor_std / self.genuine_std)


@dataclass
class LogitModel:
    """A logistic regression over the features of ``engines`` (sorted), see :func:`_features`."""

    engines: tuple[str, ...]
    coef: list[float]  # len(FEATURES) per engine, engine by engine, in ``engines`` order
    intercept: float

    def score(self, feats: np.ndarray) -> np.ndarray:
        return feats @ np.asarray(self.coef) + self.intercept


FEATURES = ("z", "probe_z", "present")


@dataclass
class Calibration:
    engines: dict[str, EngineCalibration]
    weights: dict[str, float] = field(default_factory=dict)  # zsum_cal weights (equal unless fitted)
    logit: dict[str, LogitModel] = field(default_factory=dict)  # "+".join(sorted engines) -> model
    default_method: str = FALLBACK_METHOD
    meta: dict[str, Any] = field(default_factory=dict)  # how, when and on what it was fitted

    # ---- checks ----------------------------------------------------------------------------------
    def mismatches(self, engines: Sequence[str], versions: Mapping[str, str] | None) -> list[str]:
        """Why this calibration must not be used for lists of ``engines`` (empty: it may)."""
        out = []
        for e in engines:
            cal = self.engines.get(e)
            if cal is None:
                out.append(f"{e}: not calibrated")
            elif versions is not None and e in versions and versions[e] != cal.version:
                out.append(f"{e}: calibrated for {cal.version!r}, running {versions[e]!r}")
        return out

    # ---- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT,
            "default_method": self.default_method,
            "engines": {k: vars(v).copy() for k, v in sorted(self.engines.items())},
            "weights": dict(sorted(self.weights.items())),
            "logit": {
                k: {"engines": list(m.engines), "features": list(FEATURES), "coef": m.coef, "intercept": m.intercept}
                for k, m in sorted(self.logit.items())
            },
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        if d.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"unsupported calibration format {d.get('format')!r}")
        engines = {k: EngineCalibration(**v) for k, v in d["engines"].items()}
        logit = {}
        for k, m in d.get("logit", {}).items():
            if list(m.get("features", FEATURES)) != list(FEATURES):
                raise ValueError(f"logit model {k} uses features {m.get('features')}, this code {FEATURES}")
            logit[k] = LogitModel(tuple(m["engines"]), [float(c) for c in m["coef"]], float(m["intercept"]))
        method = d.get("default_method", FALLBACK_METHOD)
        if method not in METHODS:
            raise ValueError(f"calibration names unknown default method {method!r}")
        return cls(
            engines, {k: float(v) for k, v in d.get("weights", {}).items()}, logit, method, dict(d.get("meta", {}))
        )

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_calibration(path: Path | str | None = None) -> Calibration | None:
    """The calibration at ``path`` (empty/None: the one shipped in ``workers/calibration.json``).

    Returns None (and logs a warning) when there is none or it cannot be read: callers then use a
    calibration-free method.
    """
    p = Path(path) if path else DEFAULT_CALIBRATION
    try:
        return Calibration.load(p)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("fusion.calibration_unavailable", path=str(p), error=repr(exc))
        return None


# --------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------


def _subset_key(engines: Sequence[str]) -> str:
    return "+".join(sorted(engines))


def _features(
    lists: Mapping[str, Sequence[Ranked]], subjects: Sequence[str], engines: Sequence[str], cal: Calibration
) -> np.ndarray:
    """Per candidate: for each engine (in ``engines`` order) z, per-probe robust z, present (0/1)."""
    cols = []
    for e in engines:
        ranked = lists[e]
        raw = np.asarray([r.score for r in ranked], dtype=np.float64)
        pz = robust_z(raw)
        by_s = {r.subject_id: i for i, r in enumerate(ranked)}
        floor_i = int(np.argmin(raw))
        idx = np.asarray([by_s.get(s, floor_i) for s in subjects])
        present = np.asarray([s in by_s for s in subjects], dtype=np.float64)
        cols += [cal.engines[e].z(raw[idx]), pz[idx], present]
    return np.column_stack(cols) if cols else np.zeros((len(subjects), 0))


def _calibrated_totals(
    method: str,
    lists: Mapping[str, Sequence[Ranked]],
    subjects: list[str],
    cal: Calibration,
    weights: Mapping[str, float],
) -> np.ndarray:
    engines = sorted(lists)
    if method == "logit":
        model = cal.logit.get(_subset_key(engines))
        if model is None:
            raise KeyError(f"no logit model for engines {engines}")
        return model.score(_features(lists, subjects, model.engines, cal))
    total = np.zeros(len(subjects))
    wsum = 0.0
    for e in engines:
        ranked = lists[e]
        raw = np.asarray([r.score for r in ranked], dtype=np.float64)
        by_s = {r.subject_id: i for i, r in enumerate(ranked)}
        floor = float(raw.min())
        s = np.asarray([raw[by_s[x]] if x in by_s else floor for x in subjects])
        if method == "zsum_cal":
            w = float(weights.get(e, cal.weights.get(e, 1.0)))
            total += w * cal.engines[e].z(s)
            wsum += w
        else:  # llr
            total += cal.engines[e].llr(s)
    if method == "zsum_cal" and wsum > 0:
        total = total / wsum
    return total


def effective_method(
    method: str, engines: Sequence[str], calibration: Calibration | None, versions: Mapping[str, str] | None
) -> str:
    """The method that will really run for these engines: a calibrated method whose calibration is
    missing, or was fitted on other engine versions, falls back to the calibration-free one (logged)."""
    if method not in CALIBRATED:
        return method
    problems = ["no calibration loaded"] if calibration is None else calibration.mismatches(list(engines), versions)
    if method == "logit" and not problems and _subset_key(engines) not in calibration.logit:
        problems = [f"no logit model for {_subset_key(engines)}"]
    if problems:
        log.warning("fusion.calibration_mismatch", method=method, fallback=FALLBACK_METHOD, problems=problems)
        return FALLBACK_METHOD
    return method


def fuse(
    lists: Mapping[str, Sequence[Ranked]],
    n: int,
    method: str = "zsum",
    weights: Mapping[str, float] | None = None,
    *,
    calibration: Calibration | None = None,
    versions: Mapping[str, str] | None = None,
) -> list[Fused]:
    """Merge engine lists into the top ``n`` subjects, best first (ties broken by subject id).

    ``calibration`` is needed by ``zsum_cal``, ``llr`` and ``logit``; ``versions`` (engine ->
    version of the engine that produced the list) is checked against it. Without a usable
    calibration those methods fall back to ``zsum`` with a warning.
    """
    if method not in METHODS:
        raise ValueError(f"unknown fusion method {method!r}; known: {', '.join(METHODS)}")
    weights = weights or {}
    present = {e: r for e, r in lists.items() if r}
    method = effective_method(method, list(present), calibration, versions)
    per_engine = {e: {r.subject_id: (r.rank, r.score) for r in ranked} for e, ranked in present.items()}
    subjects = sorted(set().union(*(p.keys() for p in per_engine.values()))) if per_engine else []
    if not subjects:
        return []
    if method in CALIBRATED:
        assert calibration is not None
        values = _calibrated_totals(method, present, subjects, calibration, weights)
        totals = dict(zip(subjects, values.tolist(), strict=True))
    else:
        contrib: dict[str, dict[str, float]] = {}
        floor: dict[str, float] = {}
        for engine, ranked in present.items():
            w = float(weights.get(engine, 1.0))
            if method == "zsum":
                z = robust_z(np.asarray([r.score for r in ranked], dtype=np.float64))
                contrib[engine] = {r.subject_id: w * float(zi) for r, zi in zip(ranked, z, strict=True)}
                floor[engine] = w * float(z.min())
            else:
                contrib[engine] = {r.subject_id: w / (RRF_K + r.rank) for r in ranked}
                floor[engine] = 0.0
        totals = {s: sum(c.get(s, floor[e]) for e, c in contrib.items()) for s in subjects}
    order = sorted(totals, key=lambda s: (-totals[s], s))[:n]
    return [
        Fused(
            subject_id=s,
            rank=i + 1,
            fused_score=round(float(totals[s]), 6),
            engines={e: per_engine[e][s] for e in per_engine if s in per_engine[e]},
        )
        for i, s in enumerate(order)
    ]


# --------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------


@dataclass
class FitProbe:
    """One fit search: each engine's list (engines that failed are simply absent) and the mate."""

    lists: dict[str, list[Ranked]]
    mate: str | None  # the enrolled subject of the probe's identity; None for a non-mated probe


def fit_logistic(
    x: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, iters: int = 50, sample_weight: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (IRLS); numpy only.

    Features are standardised internally (the penalty then treats them alike) and the coefficients
    mapped back to the raw features. Returns (coef, intercept).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    mu = np.average(x, axis=0, weights=sw)
    sd = np.sqrt(np.average((x - mu) ** 2, axis=0, weights=sw))
    sd[sd < 1e-12] = 1.0
    xs = np.column_stack([np.ones(len(y)), (x - mu) / sd])
    beta = np.zeros(xs.shape[1])
    pen = np.full(xs.shape[1], l2 * sw.sum())
    pen[0] = 0.0
    for _ in range(iters):
        eta = np.clip(xs @ beta, -35, 35)
        p = 1.0 / (1.0 + np.exp(-eta))
        w = sw * p * (1 - p)
        grad = xs.T @ (sw * (y - p)) - pen * beta
        hess = (xs * w[:, None]).T @ xs + np.diag(pen) + 1e-9 * np.eye(xs.shape[1])
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.max(np.abs(step)) < 1e-8:
            break
    coef = beta[1:] / sd
    intercept = float(beta[0] - np.sum(beta[1:] * mu / sd))
    return coef, intercept


def fit(
    probes: Sequence[FitProbe],
    engine_scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
    versions: Mapping[str, str],
    *,
    default_method: str = FALLBACK_METHOD,
    l2: float = 1e-3,
    meta: Mapping[str, Any] | None = None,
) -> Calibration:
    """Learn a :class:`Calibration` from fit data.

    ``engine_scores``: engine -> (genuine scores, impostor scores) of the fit probes against the
    gallery templates (all pairs, not only the top N: the normalisation must describe the engine,
    not one gallery's tail). ``probes``: the fit searches (lists + mate) for the logistic model; one
    model is fitted per non-empty subset of the engines, on the same searches with the other engines'
    lists removed. Mated and non-mated searches both contribute negatives; each search's candidates
    are weighted to sum to 1 so that long lists do not dominate.
    """
    engines: dict[str, EngineCalibration] = {}
    for e, (gen, imp) in engine_scores.items():
        gen = np.asarray(gen, dtype=np.float64)
        imp = np.asarray(imp, dtype=np.float64)
        if gen.size < 2 or imp.size < 2:
            raise ValueError(f"{e}: too few scores to calibrate ({gen.size} genuine, {imp.size} impostor)")
        engines[e] = EngineCalibration(
            e,
            versions[e],
            float(imp.mean()),
            float(imp.std(ddof=1)),
            float(gen.mean()),
            float(gen.std(ddof=1)),
            int(imp.size),
            int(gen.size),
        )
    cal = Calibration(engines, {e: 1.0 for e in engines}, {}, default_method, dict(meta or {}))
    names = sorted(engines)
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            xs, ys, ws = [], [], []
            for p in probes:
                lists = {e: p.lists[e] for e in subset if p.lists.get(e)}
                if set(lists) != set(subset):
                    continue
                subjects = sorted(set().union(*({r.subject_id for r in v} for v in lists.values())))
                xs.append(_features(lists, subjects, subset, cal))
                ys.append(np.asarray([s == p.mate for s in subjects], dtype=np.float64))
                ws.append(np.full(len(subjects), 1.0 / len(subjects)))
            if not xs or not any(y.any() for y in ys):
                continue
            coef, intercept = fit_logistic(np.vstack(xs), np.concatenate(ys), l2=l2, sample_weight=np.concatenate(ws))
            cal.logit[_subset_key(subset)] = LogitModel(tuple(subset), [float(c) for c in coef], intercept)
    return cal


def resolve_method(method: str, calibration: Calibration | None) -> str:
    """``auto`` (or empty) means the calibration's measured-best default, else the calibration-free one."""
    if method in ("", "auto"):
        return calibration.default_method if calibration is not None else FALLBACK_METHOD
    return method
