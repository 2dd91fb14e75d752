"""`quorum calibrate` and `quorum eval` end to end on ci/faces (in process, small, real engines)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quorum.cli.main import main

pytestmark = pytest.mark.integration

# A small seeded slice of ci/faces keeps this under a couple of minutes on a busy 2-core machine:
# two engines (fusion needs two), a few dozen people, at most three images each.
SMALL = [
    "--engines",
    "sface,facenet",
    "--max-identities",
    "30",
    "--max-images-per-identity",
    "3",
    "--holdout",
    "0.3",
    "--seed",
    "1",
    "--top-n",
    "20",
    "--no-progress",
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("eval")
    labels = d / "labels.csv"
    people = sorted(p.name for p in (data_dir / "ci" / "faces").iterdir() if p.is_dir())
    labels.write_text(
        "image_or_identity,group\n" + "".join(f"{p},{'A-L' if p[0].upper() <= 'L' else 'M-Z'}\n" for p in people)
    )
    return d, data_dir / "ci" / "faces", labels


@pytest.mark.timeout(600)
def test_calibrate_then_eval_writes_report_and_plots(workdir):
    d, faces, labels = workdir
    cache = d / "cache"
    cal = d / "calibration.json"
    runner = CliRunner()
    res = runner.invoke(main, ["calibrate", str(faces), *SMALL, "--cache", str(cache), "--out", str(cal)])
    assert res.exit_code == 0, res.output
    c = json.loads(cal.read_text())
    assert set(c["engines"]) == {"sface", "facenet"}
    assert c["default_method"] in ("zsum", "rrf", "zsum_cal", "llr", "logit", "tnorm", "logit_q")
    assert set(c["logit"]) == set(c["logit_q"]) == {"facenet", "sface", "facenet+sface"}
    assert c["engines"]["sface"]["version"] and c["engines"]["sface"]["impostor_std"] > 0

    out = d / "report"
    res = runner.invoke(
        main,
        [
            "eval",
            str(faces),
            *SMALL,
            "--cache",
            str(cache),
            "--calibration",
            str(cal),
            "--out",
            str(out),
            "--groups",
            str(labels),
            "--bootstrap",
            "50",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "rank-1" in res.output and "logit" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert (out / "cmc.png").stat().st_size > 1000 and (out / "det.png").stat().st_size > 1000
    assert rep["protocol"]["gallery_identities"] > 0 and rep["report_part"] == "test"
    systems = rep["parts"]["test"]
    assert set(systems) == {"sface", "facenet", "zsum", "rrf", "zsum_cal", "llr", "logit"}
    for m in systems.values():
        assert set(m["cmc"]) == {"rank1", "rank10", "rank250"}
        assert 0 <= m["cmc"]["rank1"] <= m["cmc"]["rank10"] <= m["cmc"]["rank250"] <= 1
        assert [x["fpir_target"] for x in m["fnir_at_fpir"]] == [0.001, 0.01]
        assert m["mated_probes"] == rep["protocol"]["test"]["mated_probes"]
    for e in ("sface", "facenet"):
        f = rep["engines"][e]
        assert {"failure_to_enrol", "probe_failures", "version"} <= set(f)
    demo = rep["demographics"]["systems"]["sface"]
    assert {"fnir", "fpir", "fnmr", "fmr"} <= set(demo)
    assert set(demo["fnmr"]["groups"]) <= {"A-L", "M-Z"}
    # The embeddings are cached: a second run computes nothing.
    res = runner.invoke(
        main,
        [
            "eval",
            str(faces),
            *SMALL,
            "--cache",
            str(cache),
            "--calibration",
            str(cal),
            "--out",
            str(d / "again"),
            "--methods",
            "rrf",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "not in the cache" not in res.output
    again = json.loads((d / "again" / "report.json").read_text())
    assert again["parts"]["test"]["sface"] == systems["sface"]


@pytest.mark.timeout(600)
def test_eval_subsets_tests_every_set_against_the_best_engine(workdir):
    d, faces, _ = workdir
    out = d / "subsets"
    res = CliRunner().invoke(
        main,
        [
            "eval-subsets",
            str(faces),
            *SMALL,
            "--cache",
            str(d / "cache"),
            "--out",
            str(out),
            "--bootstrap",
            "50",
            "--time-faces",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "McNemar p" in res.output and "sface+facenet" in res.output
    rep = json.loads((out / "subsets.json").read_text())
    # fitted on this run's fit part, written beside the report (the shipped file is not touched)
    assert rep["calibration"]["fitted_here"] and (out / "calibration.json").exists()
    rows = {("+".join(r["engines"]), r["method"]) for r in rep["rows"]}
    assert rows == {("sface", "engine"), ("facenet", "engine")} | {
        ("sface+facenet", m) for m in ("zsum", "rrf", "zsum_cal", "llr", "logit", "tnorm", "logit_q")
    }
    best = rep["best_single_engine"]
    for r in rep["rows"]:
        if r["engines"] == [best]:
            assert r["vs_best_single"] is None
            continue
        v = r["vs_best_single"]
        assert v["baseline"] == best and 0 <= v["mcnemar_p"] <= 1
        assert v["bootstrap"]["replicates"] == 50
        assert r["embed_ms_per_face"] > 0
    assert sum(r["fit_pick"] for r in rep["rows"]) == 1
    assert set(rep["embed_cost"]) == {"sface", "facenet"}
