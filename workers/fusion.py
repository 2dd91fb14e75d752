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
* ``tnorm`` — cohort ("T-norm") normalisation: each engine's scores standardised by the mean and
  standard deviation of a cohort, then summed. The cohort is the probe's own list beyond rank
  ``TNORM_SKIP`` (ranks 11-250 of the engine's 250: with a large gallery these are other people,
  scored against this probe by this engine), so no extra search is needed; with fewer than
  ``TNORM_MIN_COHORT`` cohort scores the whole list is the cohort.

Four methods use a :class:`Calibration` learned from data by :func:`fit` (``quorum calibrate``),
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
* ``logit_q`` — the same, over more features (:data:`FEATURES_Q`): per engine also the T-norm score,
  the rank (``1 / rank``), the gap to the engine's top score (fixed z) and the fixed z times each
  probe quality measure; and per probe the quality measures themselves (:data:`QUALITY`: YuNet's
  detector score and the log of the face box's size, from :func:`probe_quality`; both are in the job,
  so production computes the same features). Quality only changes the order of candidates through the
  interactions; alone it shifts every candidate of a probe alike (it moves the open-set threshold).
  A probe without quality gets the fit data's mean quality.

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

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

log = structlog.get_logger()

METHODS = ("zsum", "rrf", "zsum_cal", "llr", "logit", "tnorm", "logit_q")
CALIBRATED = frozenset({"zsum_cal", "llr", "logit", "logit_q"})
# The methods `quorum calibrate` may make the default by its in-sample rule (fewest rank-1 misses on the
# fit part). logit_q is left out: with the most parameters it wins on the data it was fitted on, and on
# the held-out part it was no better than logit (BENCHMARKS.md "Fusion methods for the default set");
# choose it explicitly with QUORUM_FUSION_METHOD=logit_q.
DEFAULT_ELIGIBLE = tuple(m for m in METHODS if m != "logit_q")
FALLBACK_METHOD = "zsum"
RRF_K = 60.0
_MAD_TO_SIGMA = 1.4826
CALIBRATION_FORMAT = 1
TNORM_SKIP = 10  # the top ranks of a list are left out of its cohort (they may hold the mate)
TNORM_MIN_COHORT = 20  # below this many cohort scores, the whole list is the cohort
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


def probe_quality(box: Sequence[float] | None, detector_score: float | None) -> dict[str, float]:
    """The probe quality measures of ``logit_q`` from the searched face (box: x, y, width, height)."""
    q: dict[str, float] = {}
    if detector_score is not None and math.isfinite(float(detector_score)):
        q["detector_score"] = float(detector_score)
    if box is not None and len(box) == 4:
        w, h = float(box[2]), float(box[3])
        if w > 0 and h > 0:
            q["log_face_px"] = math.log(max(1.0, math.sqrt(w * h)))
    return q


def tnorm(scores: np.ndarray, skip: int = TNORM_SKIP, min_cohort: int = TNORM_MIN_COHORT) -> np.ndarray:
    """Standardise scores against a cohort: the list's scores below its ``skip`` best (all of them when
    that leaves fewer than ``min_cohort``); mean and standard deviation (falls back to 1)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    ordered = np.sort(scores)[::-1]
    cohort = ordered[skip:] if ordered.size - skip >= min_cohort else ordered
    spread = float(np.std(cohort))
    if spread <= 1e-9:
        spread = 1.0
    return (scores - float(np.mean(cohort))) / spread


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
    """A logistic regression over the features of ``engines`` (sorted), see :func:`features`."""

    engines: tuple[str, ...]
    coef: list[float]  # len(FEATURES) per engine, engine by engine, in ``engines`` order
    intercept: float

    def score(self, feats: np.ndarray) -> np.ndarray:
        return feats @ np.asarray(self.coef) + self.intercept


FEATURES = ("z", "probe_z", "present")
QUALITY = ("detector_score", "log_face_px")
FEATURES_Q = (*FEATURES, "tnorm", "inv_rank", "z_gap", *(f"z_x_{q}" for q in QUALITY))


@dataclass
class QualityLogitModel:
    """``logit_q``'s logistic regression: :data:`FEATURES_Q` per engine (``engines`` sorted), then
    :data:`QUALITY` once per probe (see :func:`features_q`). ``quality_fill``: the fit data's mean of
    each quality measure, used for a probe that lacks it."""

    engines: tuple[str, ...]
    coef: list[float]
    intercept: float
    quality_fill: dict[str, float] = field(default_factory=dict)

    def score(self, feats: np.ndarray) -> np.ndarray:
        return feats @ np.asarray(self.coef) + self.intercept

    def quality_vector(self, quality: Mapping[str, float] | None) -> np.ndarray:
        q = quality or {}
        out = []
        for name in QUALITY:
            v = q.get(name)
            out.append(float(v) if v is not None and math.isfinite(float(v)) else self.quality_fill.get(name, 0.0))
        return np.asarray(out, dtype=np.float64)


@dataclass
class Calibration:
    engines: dict[str, EngineCalibration]
    weights: dict[str, float] = field(default_factory=dict)  # zsum_cal weights (equal unless fitted)
    logit: dict[str, LogitModel] = field(default_factory=dict)  # "+".join(sorted engines) -> model
    default_method: str = FALLBACK_METHOD
    meta: dict[str, Any] = field(default_factory=dict)  # how, when and on what it was fitted
    logit_q: dict[str, QualityLogitModel] = field(default_factory=dict)  # as ``logit``; absent in older files

    def model_for(self, method: str, engines: Sequence[str]) -> LogitModel | QualityLogitModel | None:
        """The ``logit`` / ``logit_q`` model for this set of engines (None: not fitted)."""
        models: Mapping[str, LogitModel | QualityLogitModel] = self.logit_q if method == "logit_q" else self.logit
        return models.get(subset_key(engines))

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
            **(
                {
                    "logit_q": {
                        k: {
                            "engines": list(m.engines),
                            "features": list(FEATURES_Q),
                            "probe_features": list(QUALITY),
                            "coef": m.coef,
                            "intercept": m.intercept,
                            "quality_fill": dict(m.quality_fill),
                        }
                        for k, m in sorted(self.logit_q.items())
                    }
                }
                if self.logit_q
                else {}
            ),
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
        logit_q = {}
        for k, m in d.get("logit_q", {}).items():
            if list(m.get("features", [])) != list(FEATURES_Q) or list(m.get("probe_features", [])) != list(QUALITY):
                raise ValueError(
                    f"logit_q model {k} uses features {m.get('features')} + {m.get('probe_features')}, "
                    f"this code {FEATURES_Q} + {QUALITY}"
                )
            logit_q[k] = QualityLogitModel(
                tuple(m["engines"]),
                [float(c) for c in m["coef"]],
                float(m["intercept"]),
                {q: float(v) for q, v in m.get("quality_fill", {}).items()},
            )
        method = d.get("default_method", FALLBACK_METHOD)
        if method not in METHODS:
            raise ValueError(f"calibration names unknown default method {method!r}")
        return cls(
            engines,
            {k: float(v) for k, v in d.get("weights", {}).items()},
            logit,
            method,
            dict(d.get("meta", {})),
            logit_q,
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


def subset_key(engines: Sequence[str]) -> str:
    return "+".join(sorted(engines))


def features(
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


def features_q(
    lists: Mapping[str, Sequence[Ranked]],
    subjects: Sequence[str],
    engines: Sequence[str],
    cal: Calibration,
    quality: np.ndarray,
) -> np.ndarray:
    """Per candidate: for each engine (in ``engines`` order) :data:`FEATURES_Q`, then :data:`QUALITY`
    (``quality``, one value per measure, the same for every candidate of the probe)."""
    cols = []
    for e in engines:
        ranked = lists[e]
        raw = np.asarray([r.score for r in ranked], dtype=np.float64)
        by_s = {r.subject_id: i for i, r in enumerate(ranked)}
        floor_i = int(np.argmin(raw))
        idx = np.asarray([by_s.get(s, floor_i) for s in subjects])
        present = np.asarray([s in by_s for s in subjects], dtype=np.float64)
        z = cal.engines[e].z(raw[idx])
        inv_rank = np.asarray([1.0 / ranked[by_s[s]].rank if s in by_s else 0.0 for s in subjects])
        z_gap = z - cal.engines[e].z(float(raw.max()))
        cols += [z, robust_z(raw)[idx], present, tnorm(raw)[idx], inv_rank, z_gap]
        cols += [z * qv for qv in quality]
    cols += [np.full(len(subjects), qv) for qv in quality]
    return np.column_stack(cols)


def _calibrated_totals(
    method: str,
    lists: Mapping[str, Sequence[Ranked]],
    subjects: list[str],
    cal: Calibration,
    weights: Mapping[str, float],
    quality: Mapping[str, float] | None = None,
) -> np.ndarray:
    engines = sorted(lists)
    if method in ("logit", "logit_q"):
        model = cal.model_for(method, engines)
        if model is None:
            raise KeyError(f"no {method} model for engines {engines}")
        if isinstance(model, QualityLogitModel):
            return model.score(features_q(lists, subjects, model.engines, cal, model.quality_vector(quality)))
        return model.score(features(lists, subjects, model.engines, cal))
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
    if (
        method in ("logit", "logit_q")
        and calibration is not None
        and not problems
        and calibration.model_for(method, engines) is None
    ):
        problems = [f"no {method} model for {subset_key(engines)}"]
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
    quality: Mapping[str, float] | None = None,
) -> list[Fused]:
    """Merge engine lists into the top ``n`` subjects, best first (ties broken by subject id).

    ``calibration`` is needed by ``zsum_cal``, ``llr``, ``logit`` and ``logit_q``; ``versions``
    (engine -> version of the engine that produced the list) is checked against it. Without a usable
    calibration those methods fall back to ``zsum`` with a warning. ``quality`` (the probe's
    :func:`probe_quality`) is used by ``logit_q`` only.
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
        values = _calibrated_totals(method, present, subjects, calibration, weights, quality)
        totals = dict(zip(subjects, values.tolist(), strict=True))
    else:
        contrib: dict[str, dict[str, float]] = {}
        floor: dict[str, float] = {}
        for engine, ranked in present.items():
            w = float(weights.get(engine, 1.0))
            if method in ("zsum", "tnorm"):
                norm = robust_z if method == "zsum" else tnorm
                z = norm(np.asarray([r.score for r in ranked], dtype=np.float64))
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


def resolve_method(method: str, calibration: Calibration | None) -> str:
    """``auto`` (or empty) means the calibration's measured-best default, else the calibration-free one."""
    if method in ("", "auto"):
        return calibration.default_method if calibration is not None else FALLBACK_METHOD
    return method
