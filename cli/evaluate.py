"""``quorum eval``, ``quorum calibrate`` and ``quorum eval-subsets``: 1:N accuracy, fitting fusion, engine sets.

All three run the protocol of :mod:`evaluation.protocol` in process (the production detector, engines,
gallery index and fusion code); embeddings are cached (``--cache``) so re-runs and fusion experiments
cost seconds. The detector is the configured one (``QUORUM_DETECTOR``); the cache keys include it, so
runs under different detectors never share faces or embeddings. See BENCHMARKS.md for the numbers on
lfw-dev and the exact commands.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import click

from ..core.engines import DEFAULT_ENGINES
from ..evaluation.cache import default_cache_dir, detector_id
from ..evaluation.calibration import fit_calibration
from ..evaluation.demographics import demographics, read_group_labels
from ..evaluation.plots import plot_cmc, plot_det
from ..evaluation.protocol import default_data_dir, list_dataset, make_protocol
from ..evaluation.queue_run import queue_outcome
from ..evaluation.runs import (
    Outcome,
    engine_outcome,
    failures,
    fusion_outcome,
    outcome_metrics,
    part_indices,
    run_searches,
)


def _protocol_options(f):
    opts = [
        click.argument("data", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("--engines", default=",".join(DEFAULT_ENGINES), show_default=True, help="comma-separated engines"),
        click.option("--seed", default=0, show_default=True, help="seed of every random choice of the protocol"),
        click.option(
            "--holdout",
            default=0.4,
            show_default=True,
            help="fraction of the multi-image identities held out of the gallery (non-mated probes)",
        ),
        click.option(
            "--gallery-size", type=int, default=None, help="cap on enrolled identities (distractors go first)"
        ),
        click.option("--max-identities", type=int, default=None, help="use a seeded sample of this many identities"),
        click.option(
            "--max-images-per-identity",
            type=int,
            default=None,
            help="use a seeded sample of at most this many images per identity",
        ),
        click.option("--top-n", default=250, show_default=True, help="candidates per search (engine and fused)"),
        click.option(
            "--cache",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="embedding cache folder [default: $QUORUM_EVAL_CACHE, $QUORUM_HOME/eval-cache or "
            "~/.cache/quorum/eval-cache]",
        ),
        click.option("--jobs", default=1, show_default=True, help="processes for computing missing embeddings"),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _setup(data, engines, seed, holdout, gallery_size, max_identities, max_images_per_identity, cache):
    from ..core.config import settings

    if data is None:
        data = default_data_dir() / "lfw-dev"
    if not Path(data).is_dir():
        raise click.ClickException(f"no data folder {data}; pass DATA or set QUORUM_DATA_DIR")
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    images = list_dataset(data)
    proto = make_protocol(
        images,
        seed=seed,
        holdout=holdout,
        gallery_size=gallery_size,
        max_identities=max_identities,
        max_images_per_identity=max_images_per_identity,
    )
    cache = cache or default_cache_dir()
    _ = settings()
    return Path(data), engine_list, proto, Path(cache)


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.4f}"


def _table(systems: dict, fpirs: list[float]) -> str:
    head = f"{'system':<12}{'mated':>7}{'non-m':>7}{'rank-1':>9}{'rank-10':>9}{'rank-250':>10}{'r1 miss':>9}"
    head += "".join(f"{'FNIR@' + format(100 * f, 'g') + '%':>13}" for f in fpirs)
    lines = [head, "-" * len(head)]
    for name, m in systems.items():
        c = m["cmc"]
        row = (
            f"{name:<12}{m['mated_probes']:>7}{m['nonmated_probes']:>7}{_fmt(c['rank1']):>9}{_fmt(c['rank10']):>9}"
            f"{_fmt(c['rank250']):>10}{m['rank1_misses']:>9}"
        )
        for x in m["fnir_at_fpir"]:
            row += f"{_fmt(x['fnir']) + ('' if x['resolvable'] else '*'):>13}"
        lines.append(row)
    return "\n".join(lines)


def _default_out() -> Path:
    from ..core.config import settings

    return Path(settings().home) / "eval-reports" / time.strftime("%Y%m%dT%H%M%S")


@click.command("eval")
@_protocol_options
@click.option(
    "--methods",
    default="zsum,rrf,zsum_cal,llr,logit",
    show_default=True,
    help="fusion methods to report (calibrated ones need --calibration or the shipped file)",
)
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="calibration JSON [default: settings calibration_file, else workers/calibration.json]",
)
@click.option(
    "--part",
    type=click.Choice(["test", "fit", "all"]),
    default="test",
    show_default=True,
    help="probe part that the table, plots and differentials use (all parts go to the JSON)",
)
@click.option("--fpir", default="0.001,0.01", show_default=True, help="FPIR targets for FNIR@FPIR")
@click.option(
    "--groups",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV image_or_identity,group: demographic differentials per group",
)
@click.option("--operating-fpir", default=0.01, show_default=True, help="1:N operating point for --groups")
@click.option("--operating-fmr", default=0.001, show_default=True, help="1:1 operating point for --groups")
@click.option("--bootstrap", default=1000, show_default=True, help="bootstrap replicates for --groups CIs")
@click.option(
    "--via-queue",
    is_flag=True,
    help="also enrol the gallery into the running stack (quorum up) and search every probe through "
    "the queue: adds system 'queue' (production fusion) next to the in-process ones",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="report folder [default: $QUORUM_HOME/eval-reports/<time>]",
)
def eval_command(
    data,
    engines,
    seed,
    holdout,
    gallery_size,
    max_identities,
    max_images_per_identity,
    top_n,
    cache,
    jobs,
    progress,
    methods,
    calibration,
    part,
    fpir,
    groups,
    operating_fpir,
    operating_fmr,
    bootstrap,
    via_queue,
    out,
) -> None:
    """1:N accuracy of every engine and fusion method on DATA (a folder of <identity>/<image>).

    Writes report.json, cmc.png and det.png to --out and prints the table of the --part probes.
    """
    from ..core.config import settings
    from ..workers import fusion

    t0 = time.monotonic()
    data, engine_list, proto, cache = _setup(
        data, engines, seed, holdout, gallery_size, max_identities, max_images_per_identity, cache
    )
    fpirs = [float(x) for x in fpir.split(",") if x.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        if m not in fusion.METHODS:
            raise click.ClickException(f"unknown fusion method {m!r}; known: {', '.join(fusion.METHODS)}")
    cal_path = calibration or (Path(settings().calibration_file) if settings().calibration_file else None)
    cal = fusion.load_calibration(cal_path)
    out = out or _default_out()
    out.mkdir(parents=True, exist_ok=True)
    summ = proto.summary()
    click.echo(
        f"protocol: gallery {summ['gallery_identities']} identities ({summ['gallery_distractors']} "
        f"distractors); {part} part: {summ[part]['mated_probes']} mated, {summ[part]['nonmated_probes']} "
        f"non-mated probes; detector {settings().detector}; cache {cache}",
        err=True,
    )
    run = run_searches(
        proto, engine_list, cache, top_n=top_n, jobs=jobs, progress=progress, echo=lambda m: click.echo(m, err=True)
    )
    outcomes: dict[str, Outcome] = {e: engine_outcome(run, e) for e in engine_list}
    skipped = {}
    for m in method_list:
        if m in fusion.CALIBRATED:
            problems = (
                ["no calibration"]
                if cal is None
                else cal.mismatches(engine_list, {e: run.engines[e].version for e in engine_list})
            )
            if not problems and cal is not None and m in ("logit", "logit_q") and cal.model_for(m, engine_list) is None:
                problems = [f"no {m} model for {'+'.join(sorted(engine_list))}"]
            if problems:
                skipped[m] = problems
                click.echo(f"skipping {m}: calibration unusable: {'; '.join(problems)}", err=True)
                continue
        outcomes[m] = fusion_outcome(run, m, cal, progress=progress)
    queue_info = None
    if via_queue:
        outcomes["queue"], queue_info = queue_outcome(run, progress=progress, echo=lambda m: click.echo(m, err=True))
    parts = {}
    for p in ("fit", "test", "all"):
        mi, ni = part_indices(run, p)
        parts[p] = {name: outcome_metrics(o, mi, ni, fpir_targets=fpirs) for name, o in outcomes.items()}
    mi, ni = part_indices(run, part)
    title = f"{data.name}: {summ['gallery_identities']} enrolled, {part} part"
    plot_cmc(outcomes, mi, top_n, out / "cmc.png", f"CMC - {title}")
    plot_det(outcomes, mi, ni, out / "det.png", f"DET - {title}")
    best_single = min(engine_list, key=lambda e: (parts[part][e]["rank1_misses"], e))
    fused = [m for m in outcomes if m not in engine_list and m != "queue"]
    best_fused = min(fused, key=lambda m: (parts[part][m]["rank1_misses"], m)) if fused else None
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["quorum", "eval", *sys.argv[2:]]) if len(sys.argv) > 1 else "quorum eval",
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "data": str(data),
        "protocol": summ,
        "top_n": top_n,
        "detector": detector_id(),
        "engines": {e: {"version": run.engines[e].version, **failures(run, e)} for e in engine_list},
        "calibration": None
        if cal is None
        else {
            "path": str(cal_path or fusion.DEFAULT_CALIBRATION),
            "default_method": cal.default_method,
            "fitted": cal.meta,
        },
        "skipped_methods": skipped,
        "queue": queue_info,
        "report_part": part,
        "parts": parts,
        "best_single_engine": best_single,
        "best_fusion": best_fused,
        "plots": {"cmc": "cmc.png", "det": "det.png"},
        "elapsed_s": None,
    }
    if groups:
        labels = read_group_labels(groups)
        report["demographics"] = demographics(
            run,
            outcomes,
            labels,
            part=part,
            operating_fpir=operating_fpir,
            operating_fmr=operating_fmr,
            n_boot=bootstrap,
            seed=seed,
        )
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    click.echo(_table(parts[part], fpirs))
    if any(not x["resolvable"] for m in parts[part].values() for x in m["fnir_at_fpir"]):
        click.echo("* FPIR target finer than 1 / non-mated probes: not resolvable on this data")
    click.echo(
        "failures: "
        + "; ".join(
            f"{e}: {report['engines'][e]['failure_to_enrol']} to enrol, {report['engines'][e]['probe_failures']} probes"
            for e in engine_list
        )
    )
    if groups:
        click.echo(_groups_table(report["demographics"]))
    click.echo(f"report: {out / 'report.json'}  plots: {out / 'cmc.png'}, {out / 'det.png'}")


def _groups_table(d: dict) -> str:
    lines = [f"demographic differentials ({d['part']} part, FPIR {d['operating_fpir']:g}, FMR {d['operating_fmr']:g}):"]
    for name, s in d["systems"].items():
        for metric in ("fnir", "fpir", "fnmr", "fmr"):
            if metric not in s:
                continue
            for g, r in s[metric]["groups"].items():
                ratio = r["ratio_to_best"]
                lines.append(
                    f"  {name:<10}{metric:<5}{g:<16}{r['errors']:>7}/{r['trials']:<8}{_fmt(r['rate']):>9} "
                    f"[{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]  x{'-' if ratio is None else format(ratio, '.2f')}"
                )
    return "\n".join(lines)


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    raise TypeError(type(o))


@click.command("calibrate")
@_protocol_options
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="where to write the calibration [default: workers/calibration.json]",
)
def calibrate_command(
    data,
    engines,
    seed,
    holdout,
    gallery_size,
    max_identities,
    max_images_per_identity,
    top_n,
    cache,
    jobs,
    progress,
    out,
) -> None:
    """Fit score normalisation and fusion on the fit part of DATA; pick the default method.

    The default method is the fusion method with the fewest rank-1 misses on the fit part (ties:
    lower FNIR at FPIR 1%), of those eligible (``workers.fusion.DEFAULT_ELIGIBLE``: not logit_q, which
    that in-sample rule favours). Report on the identity-disjoint test part with ``quorum eval``.
    """
    from ..workers import fusion

    data, engine_list, proto, cache = _setup(
        data, engines, seed, holdout, gallery_size, max_identities, max_images_per_identity, cache
    )
    out = out or fusion.DEFAULT_CALIBRATION
    run = run_searches(
        proto, engine_list, cache, top_n=top_n, jobs=jobs, progress=progress, echo=lambda m: click.echo(m, err=True)
    )
    summ = proto.summary()
    meta = {
        "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["quorum", "calibrate", *sys.argv[2:]]),
        "data": data.name,
        "protocol": {
            k: summ[k] for k in ("seed", "holdout_fraction", "gallery_identities", "gallery_distractors", "fit")
        },
        "part": "fit",
        "top_n": top_n,
    }
    cal = fit_calibration(run, part="fit", meta=meta)
    mi, ni = part_indices(run, "fit")
    metrics = {e: outcome_metrics(engine_outcome(run, e), mi, ni) for e in engine_list}
    for m in fusion.METHODS:
        metrics[m] = outcome_metrics(fusion_outcome(run, m, cal, progress=progress), mi, ni)
    click.echo(_table(metrics, [0.001, 0.01]))

    def key(m):
        return (metrics[m]["rank1_misses"], metrics[m]["fnir_at_fpir"][1]["fnir"], m)

    best = min(fusion.DEFAULT_ELIGIBLE, key=key)
    best_single = min(engine_list, key=key)
    cal.default_method = best
    cal.meta["selection"] = {
        "rule": "fewest rank-1 misses on the fit part, then lowest FNIR at FPIR 1%, among "
        + ", ".join(fusion.DEFAULT_ELIGIBLE),
        "fit_rank1_misses": {m: metrics[m]["rank1_misses"] for m in metrics},
        "best_single_engine": best_single,
        "beats_best_single_engine_on_fit": metrics[best]["rank1_misses"] < metrics[best_single]["rank1_misses"],
    }
    cal.save(out)
    click.echo(
        f"default method: {best} ({metrics[best]['rank1_misses']} rank-1 misses on the fit part; "
        f"best single engine {best_single}: {metrics[best_single]['rank1_misses']}); wrote {out}"
    )


@click.command("eval-subsets")
@_protocol_options
@click.option(
    "--methods",
    default="zsum,rrf,zsum_cal,llr,logit,tnorm,logit_q",
    show_default=True,
    help="fusion methods for every set of two or more engines",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="calibration JSON to use; default: fit one on the fit part of this run, as quorum calibrate "
    "does (written to --out, never over the shipped file)",
)
@click.option(
    "--part",
    type=click.Choice(["test", "fit", "all"]),
    default="test",
    show_default=True,
    help="probe part that is reported and tested (the fit-part pick of each set's method is marked)",
)
@click.option("--fpir", default=0.01, show_default=True, help="FPIR of the FNIR@FPIR column and its bootstrap")
@click.option("--bootstrap", default=1000, show_default=True, help="bootstrap replicates (people resampled)")
@click.option("--time-faces", default=32, show_default=True, help="faces to time each engine's embed on (0: skip)")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="report folder [default: $QUORUM_HOME/eval-reports/<time>]",
)
def eval_subsets_command(
    data,
    engines,
    seed,
    holdout,
    gallery_size,
    max_identities,
    max_images_per_identity,
    top_n,
    cache,
    jobs,
    progress,
    methods,
    calibration,
    part,
    fpir,
    bootstrap,
    time_faces,
    out,
) -> None:
    """Every engine alone, every 3-subset and all engines fused with every method, each tested against
    the best single engine (exact McNemar on rank-1; people-clustered bootstrap of the differences).

    Use with all engines, e.g. --engines sface,dlib,facenet,arcface. Writes subsets.json (and the
    calibration fitted on the fit part, unless --calibration is given) to --out and prints the table.
    """
    from ..evaluation.cost import embed_ms_per_face
    from ..evaluation.subsets import format_table, subset_rows
    from ..workers import fusion

    t0 = time.monotonic()
    data, engine_list, proto, cache = _setup(
        data, engines, seed, holdout, gallery_size, max_identities, max_images_per_identity, cache
    )
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        if m not in fusion.METHODS:
            raise click.ClickException(f"unknown fusion method {m!r}; known: {', '.join(fusion.METHODS)}")
    out = out or _default_out()
    out.mkdir(parents=True, exist_ok=True)
    summ = proto.summary()
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    echo(
        f"protocol: gallery {summ['gallery_identities']} identities ({summ['gallery_distractors']} distractors); "
        f"{part} part: {summ[part]['mated_probes']} mated, {summ[part]['nonmated_probes']} non-mated probes"
    )
    run = run_searches(proto, engine_list, cache, top_n=top_n, jobs=jobs, progress=progress, echo=echo)
    if calibration is not None:
        cal = fusion.load_calibration(calibration)
        cal_info = {"path": str(calibration), "fitted_here": False}
    else:
        echo("fitting the calibration on the fit part (as quorum calibrate does) ...")
        meta = {
            "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["quorum", "eval-subsets", *sys.argv[2:]]),
            "data": data.name,
            "protocol": {
                k: summ[k] for k in ("seed", "holdout_fraction", "gallery_identities", "gallery_distractors", "fit")
            },
            "part": "fit",
            "top_n": top_n,
        }
        cal = fit_calibration(run, part="fit", meta=meta)
        cal.save(out / "calibration.json")
        cal_info = {"path": str(out / "calibration.json"), "fitted_here": True}
    cost = None
    if time_faces > 0:
        echo(f"timing each engine's embed on {time_faces} faces ...")
        cost = embed_ms_per_face([im.path for im in proto.gallery], engine_list, cache, n=time_faces)
    report = subset_rows(
        run,
        cal,
        engine_list,
        method_list,
        part=part,
        fpir=fpir,
        n_boot=bootstrap,
        seed=seed,
        cost_ms=None if cost is None else {e: c["ms_per_face"] for e, c in cost.items()},
        jobs=jobs,
        echo=echo,
    )
    full = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["quorum", "eval-subsets", *sys.argv[2:]]),
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "data": str(data),
        "protocol": summ,
        "top_n": top_n,
        "detector": detector_id(),
        "engines": {e: {"version": run.engines[e].version, **failures(run, e)} for e in engine_list},
        "calibration": cal_info,
        "embed_cost": cost,
        **report,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    (out / "subsets.json").write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
    click.echo(format_table(report))
    click.echo(f"report: {out / 'subsets.json'}")
