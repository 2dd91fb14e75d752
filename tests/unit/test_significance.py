"""evaluation.significance: exact McNemar and the paired, people-clustered bootstrap, on hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quorum.evaluation.significance import (
    Paired,
    discordant,
    fnir_at_fpir_replicate,
    mcnemar_exact,
    paired_bootstrap,
)


def test_mcnemar_exact_hand_computed():
    # b=7, c=5: n=12, P(X<=5) = (1+12+66+220+495+792)/4096 = 1586/4096; two-sided 3172/4096
    assert mcnemar_exact(7, 5) == pytest.approx(3172 / 4096, abs=1e-15)
    assert mcnemar_exact(5, 7) == mcnemar_exact(7, 5)
    # b=0, c=6: 2 * (1/2)^6
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64, abs=1e-15)
    # b=1, c=9: 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-15)
    # no discordant probes, or a perfectly balanced split: no evidence at all
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(1, 1) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_exact_large_counts_stay_exact():
    # large n: the integer sum does not underflow; symmetric around n/2 means p == 1
    assert mcnemar_exact(500, 500) == 1.0
    p = mcnemar_exact(400, 600)
    assert 0 < p < 1e-9
    assert math.isfinite(p)


def test_discordant_counts():
    a = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    b = np.array([1, 0, 1, 0, 0, 0], dtype=bool)
    assert discordant(a, b) == (2, 1)
    with pytest.raises(ValueError):
        discordant(a, b[:3])


def test_fnir_at_fpir_of_a_replicate_rederives_the_threshold():
    nonmated = np.array([0.9, 0.5, 0.4])
    mated = np.array([0.45, 0.6, np.nan])
    # all drawn once: 3 non-mated, FPIR 34 % allows floor(1.02) = 1 false positive -> T just above 0.5,
    # so 0.45 and the absent mate miss, 0.6 hits: FNIR 2/3
    assert fnir_at_fpir_replicate(mated, nonmated, np.ones(3, int), np.ones(3, int), 0.34) == pytest.approx(2 / 3)
    # the 0.9 impostor not drawn, 0.5 drawn twice: [0.5, 0.5, 0.4]; one false positive allowed but
    # 0.5 appears twice, so T goes just above 0.5 again: same FNIR
    assert fnir_at_fpir_replicate(mated, nonmated, np.ones(3, int), np.array([0, 2, 1]), 0.34) == pytest.approx(2 / 3)
    # impostors [0.4, 0.4, 0.4] only (0.4 drawn 3 times): one allowed, T just above 0.4 -> 0.45 and 0.6 hit
    assert fnir_at_fpir_replicate(mated, nonmated, np.ones(3, int), np.array([0, 0, 3]), 0.34) == pytest.approx(1 / 3)
    # mated weights: the absent mate drawn twice, the 0.6 one not: [0.45, nan, nan] at T > 0.5 -> 3/3
    assert fnir_at_fpir_replicate(mated, nonmated, np.array([1, 0, 2]), np.ones(3, int), 0.34) == 1.0


def _paired(hits, mate, top):
    return Paired(np.asarray(hits, dtype=bool), np.asarray(mate, dtype=float), np.asarray(top, dtype=float))


def test_bootstrap_identical_systems_give_zero_everywhere():
    rng = np.random.default_rng(1)
    hits = rng.random(40) < 0.8
    mate = rng.random(40)
    top = rng.random(30)
    s = _paired(hits, mate, top)
    r = paired_bootstrap(s, s, [f"m{i // 4}" for i in range(40)], [f"n{i // 3}" for i in range(30)], n_boot=200)
    d = r.to_dict()
    assert d["rank1_miss_rate_diff"]["ci95"] == [0.0, 0.0]
    assert d["fnir_diff"]["ci95"] == [0.0, 0.0]
    assert d["rank1_miss_ratio"]["estimate"] == 1.0


def test_bootstrap_a_system_that_always_wins():
    # B misses every mate at rank 1 and scores it below every impostor; A hits every mate above every impostor
    a = _paired([1, 1, 1, 1], [0.9, 0.9, 0.9, 0.9], [0.1, 0.2, 0.3])
    b = _paired([0, 0, 0, 0], [0.05, 0.05, 0.05, 0.05], [0.1, 0.2, 0.3])
    r = paired_bootstrap(a, b, ["p", "q", "r", "s"], ["x", "y", "z"], n_boot=100, seed=3)
    assert r.miss_rate_diff == -1.0 and r.miss_ratio == 0.0 and r.fnir_diff == -1.0
    assert np.all(r.rep_miss_rate_diff == -1.0)
    assert np.all(r.rep_fnir_diff == -1.0)
    assert r.to_dict()["rank1_miss_ratio"]["ci95"] == [0.0, 0.0]


def test_bootstrap_resamples_people_not_probes():
    # identity X: 2 mated probes that A misses and B hits; identity Y: 2 probes both hit.
    # Drawing identities gives {X,X}, {X,Y}, {Y,Y} (1/4, 1/2, 1/4): miss-rate differences 1, 1/2, 0 only.
    # Resampling single probes would also give 1/4 and 3/4.
    a = _paired([0, 0, 1, 1], [0.9] * 4, [0.1, 0.2])
    b = _paired([1, 1, 1, 1], [0.9] * 4, [0.1, 0.2])
    r = paired_bootstrap(a, b, ["X", "X", "Y", "Y"], ["U", "V"], n_boot=2000, seed=0)
    vals, counts = np.unique(r.rep_miss_rate_diff, return_counts=True)
    assert set(vals.tolist()) <= {0.0, 0.5, 1.0}
    assert counts[list(vals).index(0.5)] / 2000 == pytest.approx(0.5, abs=0.05)
    assert r.miss_rate_diff == 0.5
    assert r.to_dict()["rank1_miss_rate_diff"]["ci95"] == [0.0, 1.0]
    # B never misses: the ratio is undefined in every replicate
    d = r.to_dict()["rank1_miss_ratio"]
    assert d["ci95"] == [None, None] and d["undefined_replicates"] == 2000


def test_bootstrap_is_seeded_and_checks_pairing():
    a = _paired([1, 0, 1, 0, 1], [0.9, 0.2, 0.8, 0.1, 0.7], [0.3, 0.6, 0.2, 0.4])
    b = _paired([1, 1, 0, 0, 1], [0.8, 0.7, 0.1, 0.2, 0.6], [0.5, 0.1, 0.3, 0.2])
    cm, cn = ["a", "a", "b", "c", "c"], ["u", "v", "v", "w"]
    r1 = paired_bootstrap(a, b, cm, cn, n_boot=300, seed=7)
    r2 = paired_bootstrap(a, b, cm, cn, n_boot=300, seed=7)
    assert r1.to_dict() == r2.to_dict()
    assert np.array_equal(r1.rep_fnir_diff, r2.rep_fnir_diff)
    with pytest.raises(ValueError):
        paired_bootstrap(a, _paired([1], [0.1], [0.2]), cm, cn)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, cm[:3], cn)
