"""The cohort (T-norm) and quality/rank-aware (logit_q) fusion methods, on hand-made and synthetic lists."""

import json
import math

import numpy as np
import pytest
from structlog.testing import capture_logs

from quorum.evaluation.fitting import FitProbe, fit
from quorum.workers.fusion import (
    FEATURES_Q,
    QUALITY,
    Calibration,
    EngineCalibration,
    Ranked,
    features_q,
    fuse,
    probe_quality,
    tnorm,
)


def _ranked(pairs):
    return [Ranked(s, i + 1, sc) for i, (s, sc) in enumerate(pairs)]


def test_tnorm_leaves_the_top_ranks_out_of_the_cohort():
    top = [0.9, 0.8, 0.7]
    cohort = [0.3 + 0.001 * i for i in range(30)]
    scores = np.asarray(top + cohort)
    z = tnorm(scores, skip=3, min_cohort=20)
    c = np.asarray(cohort)
    assert z[0] == pytest.approx((0.9 - c.mean()) / c.std())
    assert z[3:].mean() == pytest.approx(0.0, abs=1e-9)
    # The order of the input does not matter: the cohort is the lowest scores.
    assert tnorm(scores[::-1], skip=3, min_cohort=20) == pytest.approx(z[::-1])


def test_tnorm_short_list_uses_the_whole_list_and_constant_lists_do_not_divide_by_zero():
    s = np.asarray([0.9, 0.5, 0.4, 0.3])
    assert tnorm(s, skip=10, min_cohort=20) == pytest.approx((s - s.mean()) / s.std())
    assert tnorm(np.asarray([0.5, 0.5, 0.5])) == pytest.approx([0.0, 0.0, 0.0])
    assert tnorm(np.asarray([])).size == 0


def test_probe_quality_from_box_and_detector_score():
    q = probe_quality((10.0, 20.0, 100.0, 64.0), 0.91)
    assert q == {"detector_score": pytest.approx(0.91), "log_face_px": pytest.approx(math.log(80.0))}
    assert probe_quality(None, None) == {}
    assert probe_quality((0, 0, 0, 50), float("nan")) == {}
    assert set(QUALITY) == {"detector_score", "log_face_px"}


def test_tnorm_fusion_needs_no_calibration_and_rewards_agreement():
    bulk = [(f"x{i}", 0.3 - 0.002 * i) for i in range(40)]
    a = _ranked([("A", 0.62), ("B", 0.45), *bulk])
    b = _ranked([("B", 0.7), ("A", 0.68), *[(s, v + 0.2) for s, v in bulk]])
    out = fuse({"a": a, "b": b}, 5, "tnorm")
    assert out[0].subject_id == "A" and out[0].engines == {"a": (1, 0.62), "b": (2, 0.68)}
    # Missing candidates get the engine's lowest normalised score; an empty engine contributes nothing.
    only = fuse({"a": a, "b": []}, 3, "tnorm")
    za = tnorm(np.asarray([r.score for r in a]))
    assert [c.subject_id for c in only] == ["A", "B", "x0"]
    assert only[0].fused_score == pytest.approx(za[0], abs=1e-6)


def _cal():
    return Calibration(
        {"a": EngineCalibration("a", "va", 0.0, 0.1, 0.5, 0.1), "b": EngineCalibration("b", "vb", 0.8, 0.02, 0.9, 0.02)}
    )


def test_features_q_layout_rank_gap_and_quality_interactions():
    a = _ranked([("X", 0.5), ("Y", 0.3), *[(f"c{i}", 0.1 - 0.001 * i) for i in range(30)]])
    b = _ranked([("Y", 0.86), ("Z", 0.84)])
    subjects = ["X", "Y", "Z"]
    q = np.asarray([0.9, 4.5])
    f = features_q({"a": a, "b": b}, subjects, ("a", "b"), _cal(), q)
    n = len(FEATURES_Q)
    assert f.shape == (3, 2 * n + len(QUALITY))
    col = {name: i for i, name in enumerate(FEATURES_Q)}
    # engine a: X rank 1, Y rank 2; Z absent (floor score, present 0, inv_rank 0)
    assert list(f[:, col["inv_rank"]]) == [1.0, 0.5, 0.0]
    assert list(f[:, col["present"]]) == [1.0, 1.0, 0.0]
    assert f[0, col["z_gap"]] == pytest.approx(0.0) and f[1, col["z_gap"]] == pytest.approx(-2.0)
    assert f[1, col["z_x_detector_score"]] == pytest.approx(3.0 * 0.9)
    assert f[1, col["z_x_log_face_px"]] == pytest.approx(3.0 * 4.5)
    # engine b: Y rank 1, Z rank 2, X absent -> b's lowest score 0.84
    assert f[0, n + col["z"]] == pytest.approx((0.84 - 0.8) / 0.02)
    assert list(f[:, n + col["inv_rank"]]) == [0.0, 1.0, 0.5]
    # the probe's quality, the same for every candidate
    assert np.all(f[:, -2] == 0.9) and np.all(f[:, -1] == 4.5)


def _quality_synthetic(seed, probes=400, gallery=60):
    """Engine a separates the mate on good-quality probes only, engine b on poor ones."""
    rng = np.random.default_rng(seed)
    out = []
    gen = {"a": [], "b": []}
    imp = {"a": [], "b": []}
    for p in range(probes):
        mate = f"s{rng.integers(gallery)}" if p % 4 else None
        q = float(rng.random())
        lists = {}
        for e, mu, sd in (("a", 0.0, 0.1), ("b", 0.8, 0.02)):
            good = q > 0.5 if e == "a" else q <= 0.5
            scores = {f"s{j}": rng.normal(mu, sd) for j in range(gallery)}
            if mate:
                scores[mate] = mu + (4.0 if good else 0.3) * sd + rng.normal(0, sd)
                gen[e].append(scores[mate])
            imp[e] += [v for s, v in scores.items() if s != mate]
            top = sorted(scores.items(), key=lambda kv: -kv[1])[:40]
            lists[e] = [Ranked(s, i + 1, v) for i, (s, v) in enumerate(top)]
        out.append(FitProbe(lists, mate, {"detector_score": q, "log_face_px": 4.6}))
    return out, {e: (np.asarray(gen[e]), np.asarray(imp[e])) for e in gen}


def test_logit_q_uses_quality_to_weigh_the_engines():
    probes, scores = _quality_synthetic(0)
    cal = fit(probes, scores, {"a": "va", "b": "vb"})
    assert set(cal.logit_q) == set(cal.logit) == {"a", "b", "a+b"}
    assert cal.logit_q["a+b"].quality_fill["detector_score"] == pytest.approx(
        np.mean([p.quality["detector_score"] for p in probes])
    )
    test, _ = _quality_synthetic(1)
    hits = {
        m: sum(fuse(p.lists, 1, m, calibration=cal, quality=p.quality)[0].subject_id == p.mate for p in test if p.mate)
        for m in ("logit", "logit_q")
    }
    assert hits["logit_q"] > hits["logit"] + 10, hits
    # z of engine a times detector score: a counts more on good probes (positive), b less (negative)
    col = FEATURES_Q.index("z_x_detector_score")
    coef = cal.logit_q["a+b"].coef
    assert coef[col] > 0 and coef[len(FEATURES_Q) + col] < 0


def test_logit_q_probe_without_quality_gets_the_fit_mean():
    probes, scores = _quality_synthetic(0, probes=120)
    cal = fit(probes, scores, {"a": "va", "b": "vb"})
    p = probes[1]
    fill = cal.logit_q["a+b"].quality_fill
    assert fuse(p.lists, 5, "logit_q", calibration=cal) == fuse(p.lists, 5, "logit_q", calibration=cal, quality=fill)
    partial = {"detector_score": 0.2}
    assert fuse(p.lists, 5, "logit_q", calibration=cal, quality=partial) == fuse(
        p.lists, 5, "logit_q", calibration=cal, quality={**fill, **partial}
    )


def test_calibration_with_logit_q_round_trips_and_older_files_still_load(tmp_path):
    probes, scores = _quality_synthetic(0, probes=80)
    cal = fit(probes, scores, {"a": "va", "b": "vb"}, default_method="logit_q")
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.to_dict() == cal.to_dict() and back.default_method == "logit_q"
    p = probes[1]
    assert fuse(p.lists, 5, "logit_q", calibration=back, quality=p.quality) == fuse(
        p.lists, 5, "logit_q", calibration=cal, quality=p.quality
    )
    # A file written before logit_q (no "logit_q" key) loads; logit works, logit_q falls back to zsum.
    old = cal.to_dict()
    del old["logit_q"]
    old["default_method"] = "logit"
    (tmp_path / "old.json").write_text(json.dumps(old))
    older = Calibration.load(tmp_path / "old.json")
    assert older.logit_q == {} and "logit_q" not in older.to_dict()
    assert fuse(p.lists, 5, "logit", calibration=older) == fuse(p.lists, 5, "logit", calibration=cal)
    with capture_logs() as logs:
        assert fuse(p.lists, 5, "logit_q", calibration=older) == fuse(p.lists, 5, "zsum")
    assert any(e["event"] == "fusion.calibration_mismatch" for e in logs)
    # A logit_q model fitted on other features is refused, not misread.
    bad = cal.to_dict()
    bad["logit_q"]["a+b"]["features"] = ["z", "probe_z", "present"]
    with pytest.raises(ValueError, match="logit_q model"):
        Calibration.from_dict(bad)


def test_fit_can_skip_the_quality_models():
    probes, scores = _quality_synthetic(0, probes=60)
    cal = fit(probes, scores, {"a": "va", "b": "vb"}, fit_quality=False)
    assert cal.logit and not cal.logit_q


def test_production_assemble_passes_the_job_faces_quality_to_logit_q():
    """workers.stages.assemble fuses with the quality of the face intake chose (box and detector score)."""
    from dataclasses import replace

    from quorum.schemas import EngineCandidate, EngineResult
    from quorum.workers import stages
    from tests.unit.test_stages import FACE, World

    probes, scores = _quality_synthetic(0, probes=120)
    # engine names of the stage tests' world
    ren = {"a": "e1", "b": "e2"}
    probes = [
        FitProbe({ren[e]: v for e, v in p.lists.items()}, p.mate, {"detector_score": p.quality["detector_score"]})
        for p in probes
    ]
    cal = fit(probes, {ren[e]: v for e, v in scores.items()}, {"e1": "e1-v1", "e2": "e2-v1"})
    w = World(fusion_method="logit_q")
    job = w.prepared()
    ctx = replace(w.ctx(), calibration=lambda: cal)
    p = probes[1]
    ok = {
        e: EngineResult(
            request_id=job.request_id,
            engine=e,
            engine_version=f"{e}-v1",
            status="ok",
            candidates=[EngineCandidate(subject_id=r.subject_id, rank=r.rank, score=r.score) for r in lst],
        )
        for e, lst in p.lists.items()
    }
    out = stages.assemble(ctx, job, ok, {})
    assert out.fusion_method == "logit_q"
    quality = probe_quality(FACE.box, FACE.score)
    lists = {e: [Ranked(c.subject_id, c.rank, c.score) for c in r.candidates] for e, r in ok.items()}
    expect = fuse(lists, job.candidates, "logit_q", calibration=cal, quality=quality)
    assert [(c.subject_id, c.fused_score) for c in out.candidates] == [(f.subject_id, f.fused_score) for f in expect]
    # the face's score (0.9) is not the fit mean: without it the fused scores would differ
    fill = fuse(lists, job.candidates, "logit_q", calibration=cal)
    assert [f.fused_score for f in fill] != [f.fused_score for f in expect]
