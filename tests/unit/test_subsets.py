"""evaluation.subsets: the engine sets, and every set scored and tested against the best single engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quorum.evaluation.protocol import Image, SplitProtocol
from quorum.evaluation.runs import EngineRun, Run
from quorum.evaluation.significance import mcnemar_exact
from quorum.evaluation.subsets import engine_sets, format_table, subset_rows


def test_engine_sets_singles_triples_and_all():
    four = engine_sets(["a", "b", "c", "d"])
    assert four[:4] == [("a",), ("b",), ("c",), ("d",)]
    assert four[4:8] == [("a", "b", "c"), ("a", "b", "d"), ("a", "c", "d"), ("b", "c", "d")]
    assert four[8:] == [("a", "b", "c", "d")]
    assert engine_sets(["a", "b", "c"]) == [("a",), ("b",), ("c",), ("a", "b", "c")]
    assert engine_sets(["a", "b"]) == [("a",), ("b",), ("a", "b")]
    assert engine_sets(["a", "b", "c"], sizes=[2]) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c")]


def _im(identity: str, n: int) -> Image:
    return Image(identity, f"{identity}/{identity}_{n:04d}.jpg", Path(f"/x/{identity}/{identity}_{n:04d}.jpg"))


def _toy_run() -> Run:
    """4 enrolled people p0..p3, two mated probes each (p0, p1: fit part; p2, p3: test part), two
    non-mated people q0 (fit) and q1 (test). Engine A ranks every mate first; B puts p2's mate second
    on both of p2's probes; C puts p3's mate second on one probe."""
    people = ["p0", "p1", "p2", "p3"]
    gallery = [_im(p, 1) for p in people]
    mated = [_im(p, k) for p in people for k in (2, 3)]
    nonmated = [_im("q0", 1), _im("q1", 1)]
    split = {"p0": "fit", "p1": "fit", "p2": "test", "p3": "test", "q0": "fit", "q1": "test"}
    proto = SplitProtocol(0, 0.4, gallery, mated, nonmated, split, 0)

    def hits(second: set[int]) -> list:
        out = []
        for i in range(len(mated)):
            mate = i // 2
            others = [j for j in range(4) if j != mate]
            order = [others[0], mate, *others[1:]] if i in second else [mate, *others]
            out.append((np.asarray(order, dtype=np.int32), np.asarray([0.9, 0.5, 0.3, 0.2], dtype=np.float32)))
        out += [(np.asarray([0, 1, 2, 3], dtype=np.int32), np.asarray([0.4, 0.3, 0.2, 0.1], dtype=np.float32))] * 2
        return out

    z = np.zeros((4, 2), dtype=np.float32)
    engines = {
        name: EngineRun(name, "v1", ["OK"] * 4, ["OK"] * 10, z, np.zeros((10, 2), np.float32), hits(sec))
        for name, sec in (("A", set()), ("B", {4, 5}), ("C", {7}))
    }
    return Run(proto, people, engines, 4)


def test_subset_rows_against_the_best_single_engine():
    run = _toy_run()
    rep = subset_rows(
        run, None, ["A", "B", "C"], ["zsum", "rrf", "logit"], n_boot=50, cost_ms={"A": 10.0, "B": 20.0, "C": 5.5}
    )
    assert rep["best_single_engine"] == "A"
    # logit needs a calibration: skipped for the fused set, not run with a silent fallback
    assert list(rep["skipped"]) == ["A+B+C/logit"]
    rows = {("+".join(r["engines"]), r["method"]): r for r in rep["rows"]}
    assert set(rows) == {("A", "engine"), ("B", "engine"), ("C", "engine"), ("A+B+C", "zsum"), ("A+B+C", "rrf")}
    a, b, c = rows[("A", "engine")], rows[("B", "engine")], rows[("C", "engine")]
    assert (a["rank1_misses"], b["rank1_misses"], c["rank1_misses"]) == (0, 2, 1)
    assert a["mated_probes"] == 4 and a["nonmated_probes"] == 1
    assert a["vs_best_single"] is None
    # B: fixes none of A's (none), breaks 2 -> exact p = 2 * (1/2)^2
    assert (b["vs_best_single"]["fixes"], b["vs_best_single"]["breaks"]) == (0, 2)
    assert b["vs_best_single"]["mcnemar_p"] == pytest.approx(0.5) == mcnemar_exact(0, 2)
    assert c["vs_best_single"]["mcnemar_p"] == 1.0
    d = b["vs_best_single"]["bootstrap"]["rank1_miss_rate_diff"]
    assert d["estimate"] == pytest.approx(0.5)  # 2 of 4 test probes
    # p2's probes (both B misses) and p3's are two clusters: replicates give 0, 1/2 or 1
    assert d["ci95"][0] >= 0.0 and d["ci95"][1] <= 1.0
    assert rows[("A+B+C", "zsum")]["embed_ms_per_face"] == 35.5
    assert rows[("B", "engine")]["embed_ms_per_face"] == 20.0
    # exactly one fit-part pick per fused set; none for single engines
    assert sum(r["fit_pick"] for r in rep["rows"] if len(r["engines"]) > 1) == 1
    assert not any(r["fit_pick"] for r in rep["rows"] if len(r["engines"]) == 1)
    assert rep["fit_picks"]["A+B+C"] in ("zsum", "rrf")
    table = format_table(rep)
    assert "(best single engine)" in table and "A+B+C" in table


def test_subset_rows_same_with_forked_fusion_workers():
    run = _toy_run()
    one = subset_rows(run, None, ["A", "B", "C"], ["zsum", "rrf"], n_boot=20, jobs=1)
    two = subset_rows(run, None, ["A", "B", "C"], ["zsum", "rrf"], n_boot=20, jobs=2)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)  # NaN-safe (NaN != NaN)
