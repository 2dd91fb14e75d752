"""Which engines are worth their compute: every engine alone and fused in engine subsets, each tested
against the best single engine on the same probes (``quorum eval-subsets``).

:func:`engine_sets` lists the sets (each engine alone, every 3-subset, the full set);
:func:`subset_rows` scores every set and fusion method of a :class:`evaluation.runs.Run` through
the same code as ``quorum eval`` (:func:`evaluation.runs.engine_outcome`,
:func:`evaluation.runs.fusion_outcome` restricted to the set's engines) and adds, against the best
single engine of the reported part: the exact McNemar test on rank-1 outcomes and the paired,
people-clustered bootstrap of :mod:`evaluation.significance`. For every set it also marks the method
that ``quorum calibrate``'s rule picks on the *fit* part (fewest rank-1 misses, then lowest FNIR at
FPIR 1 %), so the default a deployment of that set would get is read on the held-out part without
choosing it there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .runs import Outcome, Run, engine_outcome, fusion_outcome, outcome_metrics, part_indices
from .significance import Paired, discordant, mcnemar_exact, paired_bootstrap


def engine_sets(engines: Sequence[str], sizes: Sequence[int] | None = None) -> list[tuple[str, ...]]:
    """Each engine alone, then every subset of each size in ``sizes`` (default: 3 and all), in order."""
    n = len(engines)
    want = sorted({1, *(sizes if sizes is not None else (min(3, n), n))})
    out: list[tuple[str, ...]] = []
    for k in want:
        if 1 <= k <= n:
            out.extend(itertools.combinations(list(engines), k))
    return out


def set_name(engines: Sequence[str]) -> str:
    return "+".join(engines)


_FORKED: tuple = ()  # (run, calibration) inherited by forked fusion workers


def _fuse_one(task: tuple[tuple[str, ...], str]) -> Outcome:
    run, calibration = _FORKED
    return fusion_outcome(run, task[1], calibration, engines=list(task[0]))


def _fuse_all(run: Run, calibration, tasks: list[tuple[tuple[str, ...], str]], jobs: int) -> list[Outcome]:
    """:func:`evaluation.runs.fusion_outcome` of every (engine set, method), in ``jobs`` forked processes."""
    global _FORKED
    _FORKED = (run, calibration)
    try:
        if jobs <= 1 or len(tasks) <= 1:
            return [_fuse_one(t) for t in tasks]
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            return pool.map(_fuse_one, tasks, chunksize=1)
    finally:
        _FORKED = ()


def _paired(o: Outcome, mi: np.ndarray, ni: np.ndarray) -> Paired:
    return Paired(o.mate_rank[mi] == 1, o.mate_score[mi], o.top_score[ni])


def _fnir(m: dict, fpir: float) -> dict:
    return next(x for x in m["fnir_at_fpir"] if abs(x["fpir_target"] - fpir) < 1e-12)


def subset_rows(
    run: Run,
    calibration,
    engines: Sequence[str],
    methods: Sequence[str],
    *,
    part: str = "test",
    fpir: float = 0.01,
    n_boot: int = 1000,
    seed: int = 0,
    cost_ms: Mapping[str, float] | None = None,
    sizes: Sequence[int] | None = None,
    jobs: int = 1,
    echo: Callable[[str], None] = lambda m: None,
) -> dict:
    """Rows (one per engine set and method) with metrics on ``part`` and significance against the
    best single engine of ``part``; see the module docstring. ``calibration`` must cover ``engines``
    for the calibrated methods (they are skipped for a set it does not cover)."""
    from ..workers import fusion

    mi, ni = part_indices(run, part)
    fmi, fni = part_indices(run, "fit")
    fpirs = sorted({0.001, fpir})
    mated_clusters = [run.protocol.mated[int(i)].identity for i in mi]
    nonmated_clusters = [run.protocol.nonmated[int(i)].identity for i in ni]
    versions = {e: run.engines[e].version for e in engines}

    rows: list[dict] = []
    outcomes: dict[tuple[tuple[str, ...], str], Outcome] = {}
    skipped: dict[str, list[str]] = {}
    tasks: list[tuple[tuple[str, ...], str]] = []
    for es in engine_sets(engines, sizes):
        if len(es) == 1:
            outcomes[(es, "engine")] = engine_outcome(run, es[0])
            continue
        for meth in methods:
            if meth in fusion.CALIBRATED:
                problems = ["no calibration"] if calibration is None else calibration.mismatches(list(es), versions)
                if not problems and meth in ("logit", "logit_q") and calibration.model_for(meth, es) is None:
                    problems = [f"no {meth} model for {'+'.join(sorted(es))}"]
                if problems:
                    skipped[f"{set_name(es)}/{meth}"] = problems
                    continue
            tasks.append((es, meth))
    echo(f"fusing: {len(tasks)} engine set / method pairs over {len(run.probes)} probes, {jobs} process(es) ...")
    for task, o in zip(tasks, _fuse_all(run, calibration, tasks, jobs), strict=True):
        outcomes[task] = o

    metrics = {k: outcome_metrics(o, mi, ni, fpir_targets=fpirs) for k, o in outcomes.items()}
    fit_metrics = {k: outcome_metrics(o, fmi, fni, fpir_targets=fpirs) for k, o in outcomes.items()}

    def key(mm: dict, name: str) -> tuple:
        return (mm["rank1_misses"], _fnir(mm, 0.01 if 0.01 in fpirs else fpir)["fnir"], name)

    singles = [k for k in outcomes if k[1] == "engine"]
    best = min(singles, key=lambda k: key(metrics[k], k[0][0]))
    picks: dict[tuple[str, ...], str] = {}
    for es in {k[0] for k in outcomes if k[1] != "engine"}:
        cands = [k for k in outcomes if k[0] == es]
        picks[es] = min(cands, key=lambda k: key(fit_metrics[k], k[1]))[1]

    base = _paired(outcomes[best], mi, ni)
    for k, o in outcomes.items():
        es, method = k
        m = metrics[k]
        f = _fnir(m, fpir)
        row = {
            "engines": list(es),
            "method": method,
            "fit_pick": picks.get(es) == method,
            "mated_probes": m["mated_probes"],
            "nonmated_probes": m["nonmated_probes"],
            "rank1": m["cmc"]["rank1"],
            "rank10": m["cmc"]["rank10"],
            "rank1_misses": m["rank1_misses"],
            "fnir_at_fpir": f["fnir"],
            "fnir_at_fpir_0.001": _fnir(m, 0.001)["fnir"],
            "threshold": f["threshold"],
            "resolvable": f["resolvable"],
            "fit_rank1_misses": fit_metrics[k]["rank1_misses"],
            "fit_fnir_at_fpir": _fnir(fit_metrics[k], fpir)["fnir"],
            "embed_ms_per_face": None if cost_ms is None else round(sum(cost_ms[e] for e in es), 2),
            "vs_best_single": None,
        }
        if k != best:
            p = _paired(o, mi, ni)
            b, c = discordant(p.rank1_hit, base.rank1_hit)
            boot = paired_bootstrap(
                p, base, mated_clusters, nonmated_clusters, fpir=fpir, n_boot=n_boot, seed=seed
            ).to_dict()
            row["vs_best_single"] = {
                "baseline": best[0][0],
                "fixes": b,  # probes this system gets right at rank 1 and the baseline does not
                "breaks": c,  # the reverse
                "mcnemar_p": mcnemar_exact(b, c),
                "bootstrap": boot,
            }
        rows.append(row)
    return {
        "part": part,
        "fpir": fpir,
        "best_single_engine": best[0][0],
        "best_single_rule": f"fewest rank-1 misses on the {part} part, then lowest FNIR at FPIR 1 %",
        "fit_picks": {set_name(es): meth for es, meth in sorted(picks.items())},
        "skipped": skipped,
        "rows": rows,
    }


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.2f}%"


def _ci_pct(ci: list) -> str:
    return "-" if ci[0] is None else f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def format_table(report: dict) -> str:
    """The rows as a fixed-width text table (the JSON holds more)."""
    fp = format(100 * report["fpir"], "g")
    head = (
        f"{'engines':<30}{'method':<10}{'rank-1':>8}{'miss':>6}{'FNIR@' + fp + '%':>11} {'fix/brk':>9}"
        f"{'McNemar p':>11}  {'d miss-rate pp [95% CI]':<26}{'miss ratio [95% CI]':<22}"
        f"{'d FNIR pp [95% CI]':<26}{'ms/face':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in report["rows"]:
        v = r["vs_best_single"]
        method = r["method"] + ("*" if r["fit_pick"] else "")
        row = (
            f"{set_name(r['engines']):<30}{method:<10}{_pct(r['rank1']):>8}{r['rank1_misses']:>6}"
            f"{_pct(r['fnir_at_fpir']) + ('' if r['resolvable'] else '!'):>11} "
        )
        if v is None:
            row += f"{'(best single engine)':>22}{'':<74}"
        else:
            bs = v["bootstrap"]
            d, q, fn = bs["rank1_miss_rate_diff"], bs["rank1_miss_ratio"], bs["fnir_diff"]
            ratio = "-" if q["ci95"][0] is None else f"{q['estimate']:.2f} [{q['ci95'][0]:.2f}, {q['ci95'][1]:.2f}]"
            row += (
                f"{str(v['fixes']) + '/' + str(v['breaks']):>9}{v['mcnemar_p']:>11.3g}  "
                f"{100 * d['estimate']:+.2f} {_ci_pct(d['ci95']):<20}{ratio:<22}"
                f"{100 * fn['estimate']:+.2f} {_ci_pct(fn['ci95']):<20}"
            )
        row += f"{'-' if r['embed_ms_per_face'] is None else format(r['embed_ms_per_face'], '.1f'):>8}"
        lines.append(row)
    lines.append(
        f"* = the method quorum calibrate's rule picks for that engine set on the fit part; differences are "
        f"system minus {report['best_single_engine']} (best single engine on the {report['part']} part); "
        "fix/brk = rank-1 hits only the system / only the baseline gets; CIs: people-clustered paired bootstrap; "
        "! = FPIR target finer than 1 / non-mated probes."
    )
    return "\n".join(lines)
