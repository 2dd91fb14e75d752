"""Calibration data from the ``fit`` part of a run, and fitting ``workers.fusion``'s calibration on it
(``evaluation.fitting``).

:func:`genuine_impostor` gives the 1:1 genuine and impostor scores of a set of probes (also used by
the demographics); :func:`fit_calibration` learns a ``workers.fusion.Calibration``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .cache import OK
from .runs import Run, part_indices


def genuine_impostor(
    run: Run,
    engine: str,
    mated_idx: np.ndarray,
    nonmated_idx: np.ndarray,
    *,
    max_impostor: int = 2_000_000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """All genuine scores (probe vs its mate's template) and (a seeded sample of at most
    ``max_impostor``) impostor scores (probe vs every other enrolled template) of the given probes."""
    er = run.engines[engine]
    nm = len(run.protocol.mated)
    g_ok = np.asarray([s == OK for s in er.gallery_status])
    gal = er.gallery_vecs[g_ok]
    gal_subj = np.nonzero(g_ok)[0]
    rows = [int(i) for i in mated_idx if er.probe_status[int(i)] == OK]
    rows += [nm + int(i) for i in nonmated_idx if er.probe_status[nm + int(i)] == OK]
    gen, imp = [], []
    for start in range(0, len(rows), 512):
        chunk = rows[start : start + 512]
        sc = er.probe_vecs[chunk] @ gal.T
        mask = np.ones_like(sc, dtype=bool)
        for r, i in enumerate(chunk):
            if i < nm:
                hit = np.nonzero(gal_subj == run.mate_of(i))[0]
                if hit.size:
                    gen.append(float(sc[r, hit[0]]))
                    mask[r, hit[0]] = False
        imp.append(sc[mask].astype(np.float32))
    impostor = np.concatenate(imp) if imp else np.zeros(0, dtype=np.float32)
    if impostor.size > max_impostor:
        impostor = np.random.default_rng(seed).choice(impostor, max_impostor, replace=False)
    return np.asarray(gen), impostor


def fit_calibration(run: Run, *, part: str = "fit", default_method: str | None = None, meta: Mapping | None = None):
    """Learn a :class:`workers.fusion.Calibration` from the ``part`` probes of a run."""
    from ..workers import fusion
    from .fitting import FitProbe, fit

    mi, ni = part_indices(run, part)
    scores = {e: genuine_impostor(run, e, mi, ni) for e in run.engines}
    nm = len(run.protocol.mated)
    probes = []
    for i in list(mi) + [nm + int(j) for j in ni]:
        i = int(i)
        mate = run.mate_of(i)
        quality = run.quality[i] if run.quality is not None else None
        probes.append(FitProbe(run.lists_for(i), None if mate is None else run.subjects[mate], quality))
    versions = {e: r.version for e, r in run.engines.items()}
    return fit(probes, scores, versions, default_method=default_method or fusion.FALLBACK_METHOD, meta=dict(meta or {}))
