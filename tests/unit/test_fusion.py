"""Fusion on hand-made lists."""

import itertools

import numpy as np
import pytest

from quorum.workers.fusion import Ranked, fuse, robust_z


def _ranked(pairs):
    return [Ranked(s, i + 1, sc) for i, (s, sc) in enumerate(pairs)]


def _bulk(prefix, n, base, step):
    return [(f"{prefix}{i}", base - i * step) for i in range(n)]


def test_robust_z_centres_on_the_bulk():
    z = robust_z(np.array([0.9] + [0.2 + 0.001 * i for i in range(100)]))
    assert z[0] > 10 and abs(np.median(z)) < 1e-9


def test_agreement_wins_over_one_engines_outlier():
    # A is top of two engines and second in the third: it must beat B, top of one engine only.
    sface = _ranked([("A", 0.62), ("B", 0.4), *_bulk("x", 50, 0.3, 0.002)])
    dlib = _ranked([("A", 0.95), ("C", 0.93), *_bulk("x", 50, 0.9, 0.0005)])
    facenet = _ranked([("B", 0.7), ("A", 0.65), *_bulk("x", 50, 0.4, 0.002)])
    for method in ("zsum", "rrf"):
        out = fuse({"sface": sface, "dlib": dlib, "facenet": facenet}, 5, method=method)
        assert out[0].subject_id == "A", method
        assert out[0].engines == {"sface": (1, 0.62), "dlib": (1, 0.95), "facenet": (2, 0.65)}
        assert [c.rank for c in out] == [1, 2, 3, 4, 5]
        assert all(a.fused_score >= b.fused_score for a, b in itertools.pairwise(out))


def test_zsum_is_not_fooled_by_incomparable_raw_scores():
    # dlib's raw scores are all high; a subject only dlib returns must not win on raw magnitude.
    sface = _ranked([("A", 0.55), *_bulk("s", 60, 0.25, 0.002)])
    dlib = _ranked([("D", 0.93), *_bulk("d", 60, 0.92, 0.0001)])
    out = fuse({"sface": sface, "dlib": dlib}, 3, method="zsum")
    assert out[0].subject_id == "A"


def test_missing_engine_and_empty_lists():
    sface = _ranked([("A", 0.6), ("B", 0.3), ("C", 0.2)])
    out = fuse({"sface": sface, "dlib": []}, 10)
    assert [c.subject_id for c in out] == ["A", "B", "C"]
    assert out[0].engines == {"sface": (1, 0.6)}
    assert fuse({}, 10) == []


def test_top_n_and_weights_and_unknown_method():
    a = _ranked([("A", 0.9), ("B", 0.5), *_bulk("x", 20, 0.3, 0.01)])
    b = _ranked([("B", 0.9), ("A", 0.5), *_bulk("x", 20, 0.3, 0.01)])
    assert len(fuse({"a": a, "b": b}, 3)) == 3
    assert fuse({"a": a, "b": b}, 1, weights={"a": 2.0})[0].subject_id == "A"
    assert fuse({"a": a, "b": b}, 1, weights={"b": 2.0})[0].subject_id == "B"
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse({"a": a}, 1, method="vote")


# ---- calibrated fusion -------------------------------------------------------------------------

import json  # noqa: E402

from structlog.testing import capture_logs  # noqa: E402

from quorum.evaluation.fitting import FitProbe, fit, fit_logistic  # noqa: E402
from quorum.workers.fusion import Calibration, EngineCalibration, load_calibration  # noqa: E402


def _synthetic(seed=0, probes=300, gallery=60, engines=(("a", 0.0, 0.1, 0.3), ("b", 0.8, 0.02, 0.05))):
    """Per probe, every engine scores the whole gallery: impostors N(mu, sd), the mate mu + gap + noise."""
    rng = np.random.default_rng(seed)
    out = []
    gen = {e: [] for e, *_ in engines}
    imp = {e: [] for e, *_ in engines}
    for p in range(probes):
        mate = f"s{rng.integers(gallery)}" if p % 4 else None
        lists = {}
        for e, mu, sd, gap in engines:
            scores = {f"s{j}": rng.normal(mu, sd) for j in range(gallery)}
            if mate:
                scores[mate] = mu + gap + rng.normal(0, sd)
                gen[e].append(scores[mate])
            imp[e] += [v for s, v in scores.items() if s != mate]
            top = sorted(scores.items(), key=lambda kv: -kv[1])[:20]
            lists[e] = [Ranked(s, i + 1, v) for i, (s, v) in enumerate(top)]
        out.append(FitProbe(lists, mate))
    return out, {e: (np.asarray(gen[e]), np.asarray(imp[e])) for e in gen}


def test_fit_logistic_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40000, 2))
    p = 1 / (1 + np.exp(-(2.0 * x[:, 0] - 1.0 * x[:, 1] - 0.5)))
    y = (rng.random(40000) < p).astype(float)
    coef, intercept = fit_logistic(x, y, l2=0.0)
    assert np.allclose(coef, [2.0, -1.0], atol=0.1) and abs(intercept + 0.5) < 0.1


def test_fit_learns_each_engines_normalisation_and_every_subset_model():
    probes, scores = _synthetic()
    cal = fit(probes, scores, {"a": "va", "b": "vb"})
    assert abs(cal.engines["a"].impostor_mean - 0.0) < 0.01 and abs(cal.engines["a"].impostor_std - 0.1) < 0.01
    assert abs(cal.engines["b"].impostor_mean - 0.8) < 0.01 and abs(cal.engines["b"].impostor_std - 0.02) < 0.005
    assert cal.engines["a"].version == "va"
    assert set(cal.logit) == {"a", "b", "a+b"}
    # Both engines are informative (gap/sd = 3 and 2.5): the fused model weights both.
    z_coef = cal.logit["a+b"].coef
    assert z_coef[0] > 0 and z_coef[3] > 0


def test_calibrated_methods_rank_fused_better_than_either_engine(tmp_path):
    probes, scores = _synthetic(seed=2)
    cal = fit(probes, scores, {"a": "va", "b": "vb"})
    test, _ = _synthetic(seed=3)
    hits = {}
    for method in ("zsum_cal", "llr", "logit", "zsum", "rrf"):
        hits[method] = sum(fuse(p.lists, 1, method, calibration=cal)[0].subject_id == p.mate for p in test if p.mate)
    single = {e: sum(p.lists[e][0].subject_id == p.mate for p in test if p.mate) for e in ("a", "b")}
    assert hits["logit"] > max(single.values())
    assert hits["zsum_cal"] > max(single.values())


def test_calibration_round_trips_through_json(tmp_path):
    probes, scores = _synthetic(probes=80)
    cal = fit(probes, scores, {"a": "va", "b": "vb"}, default_method="logit", meta={"data": "synthetic"})
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.to_dict() == cal.to_dict()
    assert json.loads(path.read_text())["engines"]["a"]["version"] == "va"
    p = probes[1]
    assert fuse(p.lists, 5, "logit", calibration=back) == fuse(p.lists, 5, "logit", calibration=cal)
    assert load_calibration(tmp_path / "nope.json") is None


def test_version_mismatch_falls_back_to_calibration_free_fusion_with_a_warning():
    probes, scores = _synthetic(probes=80)
    cal = fit(probes, scores, {"a": "va", "b": "vb"})
    p = probes[1]
    with capture_logs() as logs:
        out = fuse(p.lists, 5, "logit", calibration=cal, versions={"a": "va", "b": "v-new"})
    assert out == fuse(p.lists, 5, "zsum")
    assert any(e["event"] == "fusion.calibration_mismatch" for e in logs)
    with capture_logs() as logs:
        assert fuse(p.lists, 5, "zsum_cal", calibration=None) == fuse(p.lists, 5, "zsum")
    assert logs and logs[0]["log_level"] == "warning"
    with capture_logs() as logs:
        fuse(p.lists, 5, "logit", calibration=cal, versions={"a": "va", "b": "vb"})
    assert not logs


def test_engine_missing_for_a_probe_uses_the_model_fitted_without_it():
    probes, scores = _synthetic(probes=120)
    cal = fit(probes, scores, {"a": "va", "b": "vb"})
    p = probes[1]
    only_a = fuse({"a": p.lists["a"], "b": []}, 5, "logit", calibration=cal)
    m = cal.logit["a"]
    ranked = p.lists["a"]
    z = cal.engines["a"].z(np.asarray([r.score for r in ranked]))
    pz = robust_z(np.asarray([r.score for r in ranked]))
    expect = {
        r.subject_id: m.coef[0] * zi + m.coef[1] * pzi + m.coef[2] * 1.0 + m.intercept
        for r, zi, pzi in zip(ranked, z, pz, strict=False)
    }
    assert [c.subject_id for c in only_a] == sorted(expect, key=lambda s: (-expect[s], s))[:5]
    assert only_a[0].fused_score == pytest.approx(max(expect.values()), abs=1e-5)


def test_candidate_missing_from_one_engine_gets_that_engines_lowest_score():
    cal = Calibration(
        {"a": EngineCalibration("a", "va", 0.0, 0.1, 0.5, 0.1), "b": EngineCalibration("b", "vb", 0.8, 0.02, 0.9, 0.02)}
    )
    a = _ranked([("X", 0.5), ("Y", 0.3), ("Z", 0.1)])
    b = _ranked([("Y", 0.86), ("Z", 0.84), ("W", 0.82)])
    out = {c.subject_id: c.fused_score for c in fuse({"a": a, "b": b}, 10, "zsum_cal", calibration=cal)}
    # X is absent from b: b's lowest returned score (0.82) stands in; mean of the two engines' z.
    assert out["X"] == pytest.approx(((0.5 - 0.0) / 0.1 + (0.82 - 0.8) / 0.02) / 2)
    assert out["W"] == pytest.approx(((0.1 - 0.0) / 0.1 + (0.82 - 0.8) / 0.02) / 2)
    assert out["Y"] == pytest.approx(((0.3 - 0.0) / 0.1 + (0.86 - 0.8) / 0.02) / 2)
    # An engine missing for the whole probe: the average is over the engines present.
    only_a = {c.subject_id: c.fused_score for c in fuse({"a": a, "b": []}, 10, "zsum_cal", calibration=cal)}
    assert only_a["X"] == pytest.approx(5.0)
