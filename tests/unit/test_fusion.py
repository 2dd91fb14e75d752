"""Fusion on hand-made lists."""

import numpy as np
import pytest

from workers.fusion import Ranked, fuse, robust_z


def _ranked(pairs):
    return [Ranked(s, i + 1, sc) for i, (s, sc) in enumerate(pairs)]


def _bulk(prefix, n, base, step):
    return [(f"{prefix}{i}", base - i * step) for i in range(n)]


def test_robust_z_centres_on_the_bulk():
    z = robust_z(np.array([0.9] + [0.2 + 0.001 * i for i in range(100)]))
    assert z[0] > 10 and abs(np.median(z)) < 1e-9


def test_agreement_wins_over_one_engines_outlier():
    # A is top of two engines and second in the third: it must beat B, top of one engine only.
    sface = _ranked([("A", 0.62), ("B", 0.40)] + _bulk("x", 50, 0.30, 0.002))
    dlib = _ranked([("A", 0.95), ("C", 0.93)] + _bulk("x", 50, 0.90, 0.0005))
    facenet = _ranked([("B", 0.70), ("A", 0.65)] + _bulk("x", 50, 0.40, 0.002))
    for method in ("zsum", "rrf"):
        out = fuse({"sface": sface, "dlib": dlib, "facenet": facenet}, 5, method=method)
        assert out[0].subject_id == "A", method
        assert out[0].engines == {"sface": (1, 0.62), "dlib": (1, 0.95), "facenet": (2, 0.65)}
        assert [c.rank for c in out] == [1, 2, 3, 4, 5]
        assert all(a.fused_score >= b.fused_score for a, b in zip(out, out[1:]))


def test_zsum_is_not_fooled_by_incomparable_raw_scores():
    # dlib's raw scores are all high; a subject only dlib returns must not win on raw magnitude.
    sface = _ranked([("A", 0.55)] + _bulk("s", 60, 0.25, 0.002))
    dlib = _ranked([("D", 0.93)] + _bulk("d", 60, 0.92, 0.0001))
    out = fuse({"sface": sface, "dlib": dlib}, 3, method="zsum")
    assert out[0].subject_id == "A"


def test_missing_engine_and_empty_lists():
    sface = _ranked([("A", 0.6), ("B", 0.3), ("C", 0.2)])
    out = fuse({"sface": sface, "dlib": []}, 10)
    assert [c.subject_id for c in out] == ["A", "B", "C"]
    assert out[0].engines == {"sface": (1, 0.6)}
    assert fuse({}, 10) == []


def test_top_n_and_weights_and_unknown_method():
    a = _ranked([("A", 0.9), ("B", 0.5)] + _bulk("x", 20, 0.3, 0.01))
    b = _ranked([("B", 0.9), ("A", 0.5)] + _bulk("x", 20, 0.3, 0.01))
    assert len(fuse({"a": a, "b": b}, 3)) == 3
    assert fuse({"a": a, "b": b}, 1, weights={"a": 2.0})[0].subject_id == "A"
    assert fuse({"a": a, "b": b}, 1, weights={"b": 2.0})[0].subject_id == "B"
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse({"a": a}, 1, method="vote")
