"""Two fused engine sets against each other on the same probes (after ``quorum eval-subsets``).

Usage:  python bench/compare_sets.py --max-identities 1500 --calibration DIR/calibration.json \
            --base sface,dlib,facenet --other sface,dlib,arcface [--other ...] [--method logit] [--out F]

``quorum eval-subsets`` tests every row against the best single engine only. This compares fused sets
directly, with the same pieces: the protocol and the cached searches of ``evaluation.runs`` (the run
must be in the eval cache, i.e. ``eval-subsets`` ran with the same protocol options), the calibration
that ``eval-subsets`` fitted, and ``evaluation.significance`` (exact McNemar on rank-1, people-clustered
paired bootstrap with the FNIR threshold re-derived per replicate). Reports the test part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quorum.evaluation.cache import default_cache_dir
from quorum.evaluation.protocol import default_data_dir, list_dataset, make_protocol
from quorum.evaluation.runs import fusion_outcome, part_indices, run_searches
from quorum.evaluation.significance import Paired, discordant, mcnemar_exact, paired_bootstrap
from quorum.workers.fusion import load_calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir() / "lfw-dev")
    ap.add_argument("--engines", default="sface,dlib,facenet,arcface", help="the run's engines (as eval-subsets)")
    ap.add_argument("--max-identities", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", type=Path, required=True)
    ap.add_argument("--base", required=True, help="comma-separated engines of the baseline set")
    ap.add_argument("--other", action="append", required=True, help="a set to compare (repeatable)")
    ap.add_argument("--method", default="logit")
    ap.add_argument("--fpir", type=float, default=0.01)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    proto = make_protocol(list_dataset(a.data), seed=a.seed, max_identities=a.max_identities)
    run = run_searches(proto, a.engines.split(","), default_cache_dir(), progress=False)
    cal = load_calibration(a.calibration)
    mi, ni = part_indices(run, "test")
    mated_c = [proto.mated[int(i)].identity for i in mi]
    nonmated_c = [proto.nonmated[int(i)].identity for i in ni]

    def paired(engines: str) -> Paired:
        o = fusion_outcome(run, a.method, cal, engines=engines.split(","))
        return Paired(o.mate_rank[mi] == 1, o.mate_score[mi], o.top_score[ni])

    base = paired(a.base)
    out = {"base": a.base, "method": a.method, "part": "test", "max_identities": a.max_identities, "rows": []}
    for other in a.other:
        p = paired(other)
        fixes, breaks = discordant(p.rank1_hit, base.rank1_hit)
        boot = paired_bootstrap(p, base, mated_c, nonmated_c, fpir=a.fpir, n_boot=a.bootstrap, seed=a.seed)
        row = {
            "set": other,
            "rank1_misses": int((~p.rank1_hit).sum()),
            "base_rank1_misses": int((~base.rank1_hit).sum()),
            "fixes": fixes,
            "breaks": breaks,
            "mcnemar_p": mcnemar_exact(fixes, breaks),
            "bootstrap": boot.to_dict(),
        }
        out["rows"].append(row)
        d, q, f = (row["bootstrap"][k] for k in ("rank1_miss_rate_diff", "rank1_miss_ratio", "fnir_diff"))
        print(
            f"{other} vs {a.base} ({a.method}): misses {row['rank1_misses']} vs {row['base_rank1_misses']}, "
            f"fixes {fixes} breaks {breaks}, McNemar p {row['mcnemar_p']:.3g}; miss ratio {q['estimate']:.2f} "
            f"[{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]; d miss rate {100 * d['estimate']:+.2f} pp "
            f"[{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]; d FNIR@{100 * a.fpir:g}% "
            f"{100 * f['estimate']:+.2f} pp [{100 * f['ci95'][0]:+.2f}, {100 * f['ci95'][1]:+.2f}]"
        )
    if a.out:
        a.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
