"""Demographic differentials: per-group error rates with people-clustered bootstrap CIs.

:func:`rates_by_group` is the pure statistic; :func:`demographics` applies it to a run: FNIR / FPIR
(1:N) per system and FNMR / FMR (1:1) per engine, per group of :func:`read_group_labels`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache import OK
from .calibration import genuine_impostor
from .metrics import threshold_for_fmr, threshold_for_fpir
from .runs import Outcome, Run, part_indices

if TYPE_CHECKING:
    from .protocol import Image


def read_group_labels(path: Path | str) -> dict[str, str]:
    """``image_or_identity,group`` rows (a header row naming those columns is optional)."""
    import csv

    out: dict[str, str] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: expected image_or_identity,group, got {row}")
            key, group = row[0].strip(), row[1].strip()
            if key == "image_or_identity" and group == "group":
                continue
            out[key] = group
    return out


def group_of(image: Image, labels: Mapping[str, str]) -> str | None:
    """An image's group: by ``identity/file``, then by file name, then by identity."""
    return labels.get(image.rel) or labels.get(image.path.name) or labels.get(image.identity)


def _cluster_sums(errors: np.ndarray, clusters: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    _, inv = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    e = np.bincount(inv, weights=np.asarray(errors, dtype=np.float64))
    n = np.bincount(inv).astype(np.float64)
    return e, n


def rates_by_group(
    errors: np.ndarray,
    groups: Sequence[str],
    clusters: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    counts: np.ndarray | None = None,
) -> dict:
    """Per group: trials, errors, rate, its bootstrap CI, and the ratio to the best (lowest-rate) group.

    ``errors[i]`` is 1 for an error (or, with ``counts``, the number of errors out of ``counts[i]``
    trials of row i). Bootstrap: clusters (people) are resampled with replacement within each group,
    ``n_boot`` times with ``seed`` (percentile intervals), because one person's images are not
    independent. The ratio's interval comes from the same replicates (the best group is the one with
    the lowest point estimate; its replicate rate is the denominator).
    """
    errors = np.asarray(errors, dtype=np.float64)
    counts = np.ones_like(errors) if counts is None else np.asarray(counts, dtype=np.float64)
    group_of = np.asarray(groups, dtype=object).astype(str)
    cluster_of = np.asarray(clusters, dtype=object).astype(str)
    rng = np.random.default_rng(seed)
    names = sorted(set(group_of.tolist()))
    point: dict[str, float] = {}
    reps: dict[str, np.ndarray] = {}
    out: dict[str, dict] = {}
    for g in names:
        sel = group_of == g
        _, inv = np.unique(cluster_of[sel], return_inverse=True)
        e = np.bincount(inv, weights=errors[sel])
        n = np.bincount(inv, weights=counts[sel])
        total_e, total_n = float(e.sum()), float(n.sum())
        point[g] = total_e / total_n if total_n else float("nan")
        idx = rng.integers(0, e.size, size=(n_boot, e.size))
        with np.errstate(invalid="ignore", divide="ignore"):
            reps[g] = e[idx].sum(1) / n[idx].sum(1)
        lo, hi = np.nanquantile(reps[g], [alpha / 2, 1 - alpha / 2]) if n_boot else (float("nan"),) * 2
        out[g] = {
            "trials": round(total_n),
            "errors": round(total_e),
            "clusters": int(e.size),
            "rate": point[g],
            "ci": [float(lo), float(hi)],
        }
    finite = {g: v for g, v in point.items() if not math.isnan(v)}
    best = min(finite, key=lambda g: (finite[g], g)) if finite else None
    for g in names:
        if best is None or point[best] == 0:
            out[g]["ratio_to_best"] = None
            out[g]["ratio_ci"] = None
            continue
        out[g]["ratio_to_best"] = point[g] / point[best]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = reps[g] / reps[best]
        ratio = ratio[np.isfinite(ratio)]
        out[g]["ratio_ci"] = [float(x) for x in np.quantile(ratio, [alpha / 2, 1 - alpha / 2])] if ratio.size else None
    return {"best_group": best, "groups": out}


def demographics(
    run: Run,
    outcomes: Mapping[str, Outcome],
    labels: Mapping[str, str],
    *,
    part: str | None = "test",
    operating_fpir: float = 0.01,
    operating_fmr: float = 0.001,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Per group and system: FNIR / FPIR (1:N) at the system's threshold for ``operating_fpir`` over
    all the part's non-mated probes; per engine also FNMR / FMR (1:1, probe vs enrolled template) at
    the engine's threshold for ``operating_fmr`` over all the part's impostor pairs. FMR counts
    within-group impostor pairs (probe and template in the same group), as NISTIR 8280 does."""
    p = run.protocol
    mi, ni = part_indices(run, part)
    mg = [group_of(p.mated[i], labels) for i in mi]
    ng = [group_of(p.nonmated[i], labels) for i in ni]
    m_sel = np.asarray([g is not None for g in mg], dtype=bool)
    n_sel = np.asarray([g is not None for g in ng], dtype=bool)
    m_groups = [g for g in mg if g is not None]
    n_groups = [g for g in ng if g is not None]
    m_clusters = [p.mated[i].identity for i, ok in zip(mi, m_sel, strict=False) if ok]
    n_clusters = [p.nonmated[i].identity for i, ok in zip(ni, n_sel, strict=False) if ok]
    report: dict[str, Any] = {
        "part": part or "all",
        "operating_fpir": operating_fpir,
        "operating_fmr": operating_fmr,
        "bootstrap": {"replicates": n_boot, "seed": seed, "interval": "95% percentile, people resampled within group"},
        "labelled": {
            "mated_probes": int(m_sel.sum()),
            "nonmated_probes": int(n_sel.sum()),
            "unlabelled_probes": int((~m_sel).sum() + (~n_sel).sum()),
        },
        "systems": {},
    }
    for name, o in outcomes.items():
        thr, resolvable = threshold_for_fpir(o.top_score[ni], operating_fpir)
        sys_rep: dict[str, Any] = {"threshold_1n": thr if math.isfinite(thr) else None, "resolvable": resolvable}
        ms = np.nan_to_num(o.mate_score[mi], nan=-np.inf)[m_sel]
        ts = np.nan_to_num(o.top_score[ni], nan=-np.inf)[n_sel]
        if len(m_groups):
            sys_rep["fnir"] = rates_by_group(
                (~(ms >= thr)).astype(float), m_groups, m_clusters, n_boot=n_boot, seed=seed
            )
        if len(n_groups):
            sys_rep["fpir"] = rates_by_group((ts >= thr).astype(float), n_groups, n_clusters, n_boot=n_boot, seed=seed)
        if name in run.engines:
            sys_rep.update(_one_to_one(run, name, mi, ni, labels, operating_fmr, n_boot, seed))
        report["systems"][name] = sys_rep
    return report


def _one_to_one(
    run: Run,
    engine: str,
    mi: np.ndarray,
    ni: np.ndarray,
    labels: Mapping[str, str],
    operating_fmr: float,
    n_boot: int,
    seed: int,
) -> dict:
    er = run.engines[engine]
    p = run.protocol
    nm = len(p.mated)
    _, imp = genuine_impostor(run, engine, mi, ni, seed=seed)
    thr = threshold_for_fmr(imp, operating_fmr)
    gal_groups = np.asarray([group_of(im, labels) or "" for im in p.gallery], dtype=object)
    g_ok = np.asarray([s == OK for s in er.gallery_status])
    # FNMR: every labelled mated probe against its mate's template; a failure on either side is an error.
    gen_err, gen_groups, gen_clusters = [], [], []
    imp_err, imp_cnt, imp_groups, imp_clusters = [], [], [], []
    rows = [(int(i), p.mated[int(i)]) for i in mi] + [(nm + int(i), p.nonmated[int(i)]) for i in ni]
    for i, im in rows:
        g = group_of(im, labels)
        if g is None:
            continue
        ok = er.probe_status[i] == OK
        sc = er.gallery_vecs @ er.probe_vecs[i] if ok else np.empty(0)
        mate = run.mate_of(i)
        if mate is not None:
            gen_groups.append(g)
            gen_clusters.append(im.identity)
            gen_err.append(0.0 if ok and g_ok[mate] and sc[mate] >= thr else 1.0)
        if ok:
            same = (gal_groups == g) & g_ok
            if mate is not None:
                same[mate] = False
            if same.any():
                imp_groups.append(g)
                imp_clusters.append(im.identity)
                imp_err.append(float(np.sum(sc[same] >= thr)))
                imp_cnt.append(float(same.sum()))
    out: dict[str, Any] = {"threshold_1to1": thr if math.isfinite(thr) else None}
    if gen_err:
        out["fnmr"] = rates_by_group(np.asarray(gen_err), gen_groups, gen_clusters, n_boot=n_boot, seed=seed)
    if imp_err:
        out["fmr"] = rates_by_group(
            np.asarray(imp_err), imp_groups, imp_clusters, n_boot=n_boot, seed=seed, counts=np.asarray(imp_cnt)
        )
    return out
