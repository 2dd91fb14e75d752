"""Fitting the fusion calibration (what ``workers.fusion`` applies at search time): each engine's score
normalisation from its genuine and impostor scores, and a logistic model per subset of engines from fit
searches. ``evaluation.calibration`` feeds it the ``fit`` part of a run (``quorum calibrate``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..workers.fusion import (
    FALLBACK_METHOD,
    QUALITY,
    Calibration,
    EngineCalibration,
    LogitModel,
    QualityLogitModel,
    Ranked,
    features,
    features_q,
    subset_key,
)


@dataclass
class FitProbe:
    """One fit search: each engine's list (engines that failed are simply absent) and the mate."""

    lists: dict[str, list[Ranked]]
    mate: str | None  # the enrolled subject of the probe's identity; None for a non-mated probe
    quality: dict[str, float] | None = None  # :func:`probe_quality` of the probe's face (``logit_q``)


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
    fit_quality: bool = True,
) -> Calibration:
    """Learn a :class:`~workers.fusion.Calibration` from fit data.

    ``engine_scores``: engine -> (genuine scores, impostor scores) of the fit probes against the
    gallery templates (all pairs, not only the top N: the normalisation must describe the engine,
    not one gallery's tail). ``probes``: the fit searches (lists + mate) for the logistic model; one
    model is fitted per non-empty subset of the engines, on the same searches with the other engines'
    lists removed. Mated and non-mated searches both contribute negatives; each search's candidates
    are weighted to sum to 1 so that long lists do not dominate. ``logit_q`` models (``fit_quality``)
    are fitted on the same searches, with each probe's ``quality`` (missing measures: the fit mean).
    """
    engines = {e: _engine_calibration(e, versions[e], gen, imp) for e, (gen, imp) in engine_scores.items()}
    cal = Calibration(engines, {e: 1.0 for e in engines}, {}, default_method, dict(meta or {}))
    fill = _quality_fill(probes)
    names = sorted(engines)
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            data = _subset_data(probes, subset, cal, fill, fit_quality)
            if data is None:
                continue
            x, xq, y, w = data
            key = subset_key(subset)
            coef, intercept = fit_logistic(x, y, l2=l2, sample_weight=w)
            cal.logit[key] = LogitModel(tuple(subset), [float(c) for c in coef], intercept)
            if xq is not None:
                coef, intercept = fit_logistic(xq, y, l2=l2, sample_weight=w)
                cal.logit_q[key] = QualityLogitModel(tuple(subset), [float(c) for c in coef], intercept, dict(fill))
    return cal


def _engine_calibration(engine: str, version: str, gen: Any, imp: Any) -> EngineCalibration:
    """One engine's score normalisation from its genuine and impostor scores."""
    gen = np.asarray(gen, dtype=np.float64)
    imp = np.asarray(imp, dtype=np.float64)
    if gen.size < 2 or imp.size < 2:
        raise ValueError(f"{engine}: too few scores to calibrate ({gen.size} genuine, {imp.size} impostor)")
    return EngineCalibration(
        engine,
        version,
        float(imp.mean()),
        float(imp.std(ddof=1)),
        float(gen.mean()),
        float(gen.std(ddof=1)),
        int(imp.size),
        int(gen.size),
    )


def _quality_fill(probes: Sequence[FitProbe]) -> dict[str, float]:
    """Each quality measure's mean over the fit probes: what a probe without that measure is given."""
    fill = {}
    for name in QUALITY:
        vals = [float(p.quality[name]) for p in probes if p.quality and p.quality.get(name) is not None]
        vals = [v for v in vals if math.isfinite(v)]
        fill[name] = float(np.mean(vals)) if vals else 0.0
    return fill


def _subset_data(
    probes: Sequence[FitProbe], subset: Sequence[str], cal: Calibration, fill: dict[str, float], fit_quality: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray] | None:
    """The features (and quality features), labels and weights of the searches every engine of ``subset``
    answered; None when there is nothing to fit (no search, or no mate among the candidates)."""
    shell = QualityLogitModel(tuple(subset), [], 0.0, fill)
    xs, xqs, ys, ws = [], [], [], []
    for p in probes:
        lists = {e: p.lists[e] for e in subset if p.lists.get(e)}
        if set(lists) != set(subset):
            continue
        subjects = sorted(set().union(*({r.subject_id for r in v} for v in lists.values())))
        xs.append(features(lists, subjects, subset, cal))
        if fit_quality:
            xqs.append(features_q(lists, subjects, subset, cal, shell.quality_vector(p.quality)))
        ys.append(np.asarray([s == p.mate for s in subjects], dtype=np.float64))
        ws.append(np.full(len(subjects), 1.0 / len(subjects)))
    if not xs or not any(y.any() for y in ys):
        return None
    return np.vstack(xs), (np.vstack(xqs) if fit_quality else None), np.concatenate(ys), np.concatenate(ws)
