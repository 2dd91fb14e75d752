"""How much could fusion add to the best engine, and does a blur measure help ``logit_q``? (test part)

Usage:  python bench/fusion_headroom.py [DATA] [--engines sface,facenet,arcface] [--best arcface]
            [--blur] [--out DIR]

Uses the cached searches of ``evaluation.runs`` (run ``quorum eval-subsets`` / ``quorum calibrate`` with
the same protocol first; nothing is embedded here). Prints, for the test part:

* headroom: the best engine's rank-1 misses, how many of them another engine ranks first (the most any
  fusion could fix at rank 1), how many have the mate in no engine's list, and each miss's mate rank
  per engine with the probe's quality (``workers.fusion.probe_quality``);
* with ``--blur``, an *evaluation-only* experiment: a third probe quality measure, the log Laplacian
  variance of the face box crop (grey, resized to 112 x 112), is added to ``logit_q``
  (``workers.fusion.QUALITY`` is replaced in this process only), the calibration is fitted on the fit
  part and ``logit`` / ``logit_q`` of the whole engine set are tested against the best single engine
  as ``quorum eval-subsets`` does. Production has no blur measure (the fusion stage never sees the
  image): this says whether adding one would be worth it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.evaluation.cache import OK, EmbeddingCache, default_cache_dir, detector_id
from quorum.evaluation.protocol import default_data_dir, list_dataset, make_protocol
from quorum.evaluation.runs import Run, engine_outcome, part_indices, run_searches


def headroom(run: Run, engines: list[str], best: str) -> dict:
    mi, _ = part_indices(run, "test")
    ranks = {e: engine_outcome(run, e).mate_rank[mi] for e in engines}
    miss = ranks[best] != 1
    others = [e for e in engines if e != best]
    first_elsewhere = np.zeros_like(miss)
    for e in others:
        first_elsewhere |= ranks[e] == 1
    absent = miss.copy()
    for e in engines:
        absent &= ranks[e] == 0
    rows = []
    for i in np.nonzero(miss)[0]:
        rows.append(
            {
                "probe": run.protocol.mated[mi[i]].rel,
                "mate_rank": {e: int(ranks[e][i]) for e in engines},
                "quality": run.quality[mi[i]] if run.quality else None,
            }
        )
    return {
        "mated_probes": len(mi),
        "best": best,
        "best_rank1_misses": int(miss.sum()),
        "another_engine_ranks_mate_first": int((miss & first_elsewhere).sum()),
        "by_engine": {e: int((miss & (ranks[e] == 1)).sum()) for e in others},
        "identities_of_those": sorted(
            {run.protocol.mated[mi[i]].identity for i in np.nonzero(miss & first_elsewhere)[0]}
        ),
        "mate_in_no_list": int(absent.sum()),
        "misses": rows,
    }


def blur_values(run: Run, cache: EmbeddingCache) -> list[float | None]:
    import cv2

    probes = run.probes
    keys = cache.keys([im.path for im in probes])
    faces = cache.faces(detector_id(), keys)
    out: list[float | None] = []
    for im, k in zip(probes, keys, strict=True):
        row = faces.get(k)
        if row is None or row[0] != OK or not row[1]:
            out.append(None)
            continue
        x, y, w, h = json.loads(row[1])["box"]
        img = cv2.imread(str(im.path), cv2.IMREAD_GRAYSCALE)
        crop = img[max(0, int(y)) : int(y + h), max(0, int(x)) : int(x + w)] if img is not None else None
        if crop is None or crop.size == 0:
            out.append(None)
            continue
        crop = cv2.resize(crop, (112, 112), interpolation=cv2.INTER_AREA)
        out.append(float(np.log1p(cv2.Laplacian(crop, cv2.CV_64F).var())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", type=Path, default=None)
    ap.add_argument("--engines", default="sface,facenet,arcface")
    ap.add_argument("--best", default="arcface", help="the best single engine (eval-subsets says which)")
    ap.add_argument("--blur", action="store_true", help="also run the evaluation-only blur experiment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for headroom.json (and blur.json)")
    a = ap.parse_args()
    data = a.data or default_data_dir() / "lfw-dev"
    engines = [e for e in a.engines.split(",") if e]
    proto = make_protocol(list_dataset(data), seed=a.seed)
    cache_dir = default_cache_dir()
    run = run_searches(proto, engines, cache_dir, progress=False, echo=lambda m: print(m, file=sys.stderr))
    h = headroom(run, engines, a.best)
    print(
        f"{a.best}: {h['best_rank1_misses']} rank-1 misses of {h['mated_probes']}; another engine ranks the mate "
        f"first for {h['another_engine_ranks_mate_first']} {h['by_engine']} (identities: "
        f"{', '.join(h['identities_of_those'])}); mate in no engine's list: {h['mate_in_no_list']}"
    )
    for r in h["misses"]:
        print(f"  {r['probe']:<60} {r['mate_rank']}")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "headroom.json").write_text(json.dumps(h, indent=2) + "\n")
    if not a.blur:
        return

    from quorum.evaluation.calibration import fit_calibration
    from quorum.evaluation.subsets import format_table, subset_rows
    from quorum.workers import fusion

    t0 = time.monotonic()
    blur = blur_values(run, EmbeddingCache(cache_dir))
    known = [b for b in blur if b is not None]
    print(f"blur of {len(blur)} probes in {time.monotonic() - t0:.1f} s; p5/50/95 {np.percentile(known, [5, 50, 95])}")
    base = run.quality or [None] * len(blur)
    run.quality = [
        None if q is None else {**q, **({} if b is None else {"blur": b})} for q, b in zip(base, blur, strict=True)
    ]
    fusion.QUALITY = (*fusion.QUALITY, "blur")  # this process only: logit_q gets blur and z x blur
    cal = fit_calibration(run, part="fit")
    rep = subset_rows(run, cal, engines, ["logit", "logit_q"], n_boot=1000, seed=a.seed, sizes=(len(engines),))
    print(format_table(rep))
    if a.out:
        rep["blur"] = "log1p(variance of the Laplacian of the grey face box crop resized to 112 x 112); eval-only"
        (a.out / "blur.json").write_text(json.dumps(rep, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
