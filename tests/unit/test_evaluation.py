"""Evaluation metrics on hand-made score matrices; expected numbers computed independently here."""

from pathlib import Path

import numpy as np
import pytest

from quorum.evaluation.cache import OK, EmbeddingCache, file_key
from quorum.evaluation.demographics import demographics, group_of, rates_by_group, read_group_labels
from quorum.evaluation.metrics import cmc, det_curve, fnir_at, fnir_at_fpir, fpir_at
from quorum.evaluation.protocol import Image, SplitProtocol, make_protocol
from quorum.evaluation.runs import EngineRun, Run, engine_outcome

# A hand-made 1:N experiment: 4 enrolled subjects (columns), 6 mated probes and 5 non-mated probes
# (rows), every probe scored against every subject. mates[i] is the column of mated probe i.
SCORES_MATED = np.array(
    [
        [0.90, 0.10, 0.20, 0.30],  # mate 0 at rank 1
        [0.50, 0.60, 0.10, 0.20],  # mate 0 at rank 2
        [0.10, 0.20, 0.30, 0.80],  # mate 3 at rank 1
        [0.40, 0.45, 0.35, 0.30],  # mate 3 at rank 4
        [0.20, 0.70, 0.10, 0.05],  # mate 1 at rank 1
        [0.20, 0.15, 0.65, 0.10],  # mate 2 at rank 1
    ]
)
MATES = [0, 0, 3, 3, 1, 2]
SCORES_NONMATED = np.array(
    [
        [0.55, 0.10, 0.10, 0.10],
        [0.20, 0.25, 0.10, 0.10],
        [0.10, 0.10, 0.72, 0.10],
        [0.30, 0.10, 0.10, 0.10],
        [0.10, 0.42, 0.10, 0.10],
    ]
)


def _lists(scores, top_n):
    """Each probe's top-N list (subject, score), as a search would return it."""
    out = []
    for row in scores:
        order = sorted(range(len(row)), key=lambda j: -row[j])[:top_n]
        out.append([(j, row[j]) for j in order])
    return out


def _outcome(top_n):
    ranks, mate_scores = [], []
    for lst, mate in zip(_lists(SCORES_MATED, top_n), MATES, strict=False):
        pos = [r for r, (j, _) in enumerate(lst) if j == mate]
        ranks.append(pos[0] + 1 if pos else 0)
        mate_scores.append(lst[pos[0]][1] if pos else np.nan)
    tops = [lst[0][1] for lst in _lists(SCORES_NONMATED, top_n)]
    return np.array(ranks), np.array(mate_scores), np.array(tops)


def test_cmc_on_a_score_matrix():
    ranks, _, _ = _outcome(top_n=4)
    assert ranks.tolist() == [1, 2, 1, 4, 1, 1]
    got = cmc(ranks, (1, 2, 3, 4))
    assert got == {1: pytest.approx(4 / 6), 2: pytest.approx(5 / 6), 3: pytest.approx(5 / 6), 4: pytest.approx(1.0)}
    # With a top-3 list the rank-4 mate is not returned: a miss at every rank.
    ranks3, scores3, _ = _outcome(top_n=3)
    assert ranks3[3] == 0 and np.isnan(scores3[3])
    assert cmc(ranks3, (3, 250))[250] == pytest.approx(5 / 6)


def test_fnir_at_fpir_on_a_score_matrix():
    _, mate_scores, tops = _outcome(top_n=4)
    # Non-mated top scores: 0.55, 0.25, 0.72, 0.30, 0.42. FPIR 0.2 allows one of five: the smallest
    # threshold is just above the second highest (0.55), so 0.72 alone is a false positive.
    # Mate scores 0.90, 0.50, 0.80, 0.30, 0.70, 0.65: 0.50 and 0.30 fall below -> FNIR 2/6.
    (row,) = fnir_at_fpir(mate_scores, tops, [0.2])
    assert row["threshold"] == pytest.approx(0.55) and row["threshold"] > 0.55
    assert row["fpir"] == pytest.approx(1 / 5) and row["fnir"] == pytest.approx(2 / 6) and row["resolvable"]
    # FPIR 0: above the highest non-mate (0.72): 0.90 and 0.80 pass, FNIR 4/6; 0.01 of 5 probes
    # cannot be resolved.
    (row,) = fnir_at_fpir(mate_scores, tops, [0.01])
    assert row["fpir"] == 0 and row["fnir"] == pytest.approx(4 / 6) and not row["resolvable"]
    # FPIR 0.4: above 0.42 -> 0.72 and 0.55 pass: FNIR counts mates <= 0.42: only 0.30.
    (row,) = fnir_at_fpir(mate_scores, tops, [0.4])
    assert row["fpir"] == pytest.approx(2 / 5) and row["fnir"] == pytest.approx(1 / 6)


def test_failures_count_against_fnir_and_never_as_false_positives():
    mate = np.array([0.9, np.nan, 0.8])  # the second probe failed
    tops = np.array([0.1, np.nan, 0.2, 0.3])  # the second non-mated probe had no candidates
    assert fnir_at(mate, 0.5) == pytest.approx(1 / 3)
    assert fpir_at(tops, 0.15) == pytest.approx(2 / 4)
    assert cmc(np.array([1, 0, 1]), (1,))[1] == pytest.approx(2 / 3)


def test_det_curve_matches_brute_force():
    _, mate_scores, tops = _outcome(top_n=3)
    fp, fn, thr = det_curve(mate_scores, tops)
    assert np.all(np.diff(thr) < 0)
    for f, n, t in zip(fp, fn, thr, strict=False):
        assert f == pytest.approx(sum(1 for s in tops if s >= t) / len(tops))
        assert n == pytest.approx(sum(1 for s in mate_scores if not (s >= t)) / len(mate_scores))
    assert fp[-1] == 1.0 and fn[0] == pytest.approx(5 / 6)


def _images(spec):
    return [
        Image(ident, f"{ident}/{ident}_{k:04d}.jpg", Path(f"/x/{ident}/{ident}_{k:04d}.jpg"))
        for ident, n in spec
        for k in range(1, n + 1)
    ]


def test_protocol_is_seeded_and_identity_disjoint():
    spec = [(f"m{i:02d}", 2 + i % 4) for i in range(40)] + [(f"s{i:02d}", 1) for i in range(30)]
    images = _images(spec)
    p = make_protocol(images, seed=3, holdout=0.25)
    q = make_protocol(images, seed=3, holdout=0.25)
    assert [im.rel for im in p.gallery] == [im.rel for im in q.gallery] and p.split == q.split
    gal_ids = [im.identity for im in p.gallery]
    assert len(gal_ids) == len(set(gal_ids)) == 30 + 30 and p.distractors == 30
    held = {im.identity for im in p.nonmated}
    assert len(held) == 10 and not held & set(gal_ids)
    assert {im.identity for im in p.mated} == {i for i in gal_ids if i.startswith("m")}
    assert not {im.rel for im in p.mated} & {im.rel for im in p.gallery}
    assert len(p.mated) + len(p.nonmated) + len(p.gallery) == len(images)
    fit_m, fit_n = p.probes("fit")
    test_m, test_n = p.probes("test")
    assert not ({im.identity for im in fit_m + fit_n} & {im.identity for im in test_m + test_n})
    assert len(fit_m) + len(test_m) == len(p.mated) and fit_n and test_n
    small = make_protocol(images, seed=3, holdout=0.25, gallery_size=35)
    assert len(small.gallery) == 35 and small.distractors == 5
    assert make_protocol(images, seed=4, holdout=0.25).split != p.split


def test_rates_by_group_counts_ratio_and_bootstrap():
    # Group A: people a1 (3 trials, 1 error), a2 (2 trials, 0 errors) -> 1/5.
    # Group B: people b1 (2 trials, 2 errors), b2 (2 trials, 0), b3 (1, 1) -> 3/5.
    rows = [
        ("A", "a1", 1),
        ("A", "a1", 0),
        ("A", "a1", 0),
        ("A", "a2", 0),
        ("A", "a2", 0),
        ("B", "b1", 1),
        ("B", "b1", 1),
        ("B", "b2", 0),
        ("B", "b2", 0),
        ("B", "b3", 1),
    ]
    groups = [r[0] for r in rows]
    clusters = [r[1] for r in rows]
    errors = np.array([r[2] for r in rows], dtype=float)
    out = rates_by_group(errors, groups, clusters, n_boot=500, seed=7)
    a, b = out["groups"]["A"], out["groups"]["B"]
    assert out["best_group"] == "A"
    assert (a["trials"], a["errors"], a["clusters"]) == (5, 1, 2)
    assert (b["trials"], b["errors"], b["clusters"]) == (5, 3, 3)
    assert a["rate"] == pytest.approx(0.2) and b["rate"] == pytest.approx(0.6)
    assert a["ratio_to_best"] == pytest.approx(1.0) and b["ratio_to_best"] == pytest.approx(3.0)
    for g in (a, b):
        assert g["ci"][0] <= g["rate"] <= g["ci"][1]
    assert b["ratio_ci"][0] <= 3.0 <= b["ratio_ci"][1]
    # Resampling people: A's replicates are 0/k or mixes of a1's 1/3 -> never above 1/3.
    assert a["ci"][1] <= 1 / 3 + 1e-12
    assert rates_by_group(errors, groups, clusters, n_boot=500, seed=7) == out
    # Weighted rows (errors out of counts), as for impostor pairs.
    w = rates_by_group(
        np.array([1.0, 0.0, 4.0]), ["A", "A", "B"], ["p", "q", "r"], n_boot=50, counts=np.array([10.0, 10.0, 8.0])
    )
    assert w["groups"]["A"]["rate"] == pytest.approx(1 / 20) and w["groups"]["B"]["rate"] == pytest.approx(0.5)
    assert w["groups"]["B"]["ratio_to_best"] == pytest.approx(10.0)


def test_ratio_undefined_when_best_group_has_no_errors():
    out = rates_by_group(np.array([0.0, 0.0, 1.0, 0.0]), ["A", "A", "B", "B"], ["a", "b", "c", "d"], n_boot=20)
    assert out["groups"]["B"]["ratio_to_best"] is None and out["best_group"] == "A"


def test_group_labels_by_image_file_or_identity(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("image_or_identity,group\nAnn/Ann_0002.jpg,g2\nAnn,g1\nBob_0001.jpg,g3\n")
    labels = read_group_labels(f)
    ann1, ann2, bob1 = (
        Image("Ann", "Ann/Ann_0001.jpg", Path("/d/Ann/Ann_0001.jpg")),
        Image("Ann", "Ann/Ann_0002.jpg", Path("/d/Ann/Ann_0002.jpg")),
        Image("Bob", "Bob/Bob_0001.jpg", Path("/d/Bob/Bob_0001.jpg")),
    )
    assert [group_of(i, labels) for i in (ann1, ann2, bob1)] == ["g1", "g2", "g3"]
    assert group_of(Image("Cy", "Cy/Cy_0001.jpg", Path("/d/Cy/Cy_0001.jpg")), labels) is None


def _toy_run():
    """A run on 2-d embeddings: enough structure for every 1:N and 1:1 count to be checked by hand."""
    spec = [("p1", 3), ("p2", 3), ("p3", 2), ("p4", 2), ("d1", 1), ("d2", 1)]
    images = _images(spec)
    by = {im.rel: im for im in images}
    gallery = [
        by["p1/p1_0001.jpg"],
        by["p2/p2_0001.jpg"],
        by["p3/p3_0001.jpg"],
        by["d1/d1_0001.jpg"],
        by["d2/d2_0001.jpg"],
    ]
    mated = [
        by["p1/p1_0002.jpg"],
        by["p1/p1_0003.jpg"],
        by["p2/p2_0002.jpg"],
        by["p2/p2_0003.jpg"],
        by["p3/p3_0002.jpg"],
    ]
    nonmated = [by["p4/p4_0001.jpg"], by["p4/p4_0002.jpg"]]
    proto = SplitProtocol(0, 0.2, gallery, mated, nonmated, {i: "test" for i in ("p1", "p2", "p3", "p4")}, 2)

    def unit(deg):
        return np.array([np.cos(np.radians(deg)), np.sin(np.radians(deg))], dtype=np.float32)

    gal_angles = [0, 90, 180, 30, 200]  # p1, p2, p3, d1, d2
    probe_angles = [5, 40, 95, 150, 182, 25, 260]  # p1 x2, p2 x2, p3, p4 x2
    g = np.stack([unit(a) for a in gal_angles])
    pv = np.stack([unit(a) for a in probe_angles])
    subjects = [im.identity for im in gallery]
    hits = []
    for v in pv:
        sc = g @ v
        order = np.argsort(-sc)[:3]
        hits.append((order.astype(np.int32), sc[order].astype(np.float32)))
    er = EngineRun("toy", "v1", [OK] * 5, [OK] * 7, g, pv, hits)
    return Run(proto, subjects, {"toy": er}, top_n=3), g, pv


def test_demographics_on_a_labelled_toy_run():
    run, g, pv = _toy_run()
    labels = {"p1": "X", "p2": "Y", "p3": "Y", "p4": "X", "d1": "X", "d2": "Y"}
    o = engine_outcome(run, "toy")
    # Mated: p1@5 -> mate p1 rank 1; p1@40 -> d1(30) first, p1 second; p2@95 rank 1; p2@150 -> p3(180,
    # 30 deg away) and d2(200, 50 deg) before p2 (60 deg) -> rank 3; p3@182 rank 1.
    assert o.mate_rank.tolist() == [1, 2, 1, 3, 1]
    rep = demographics(run, {"toy": o}, labels, part="test", operating_fpir=0.5, operating_fmr=0.34, n_boot=200, seed=1)
    s = rep["systems"]["toy"]
    # 1:N threshold for FPIR 0.5 over the two non-mated searches: tops are cos(5deg) (p4@25 -> d1@30)
    # and cos(60deg) (p4@260 -> d2@200). One false positive allowed: T just above cos(60).
    top = sorted([float(np.cos(np.radians(5))), float(np.cos(np.radians(60)))])
    assert s["threshold_1n"] == pytest.approx(top[0])
    mate_cos = [np.cos(np.radians(a)) for a in (5, 40, 5, 60, 2)]
    fn_x = sum(1 for c in mate_cos[:2] if not c > top[0])
    fn_y = sum(1 for c in mate_cos[2:] if not c > top[0])
    assert (s["fnir"]["groups"]["X"]["errors"], s["fnir"]["groups"]["X"]["trials"]) == (fn_x, 2)
    assert (s["fnir"]["groups"]["Y"]["errors"], s["fnir"]["groups"]["Y"]["trials"]) == (fn_y, 3)
    assert fn_x == 0 and fn_y == 1
    assert s["fpir"]["groups"]["X"]["errors"] == 1 and s["fpir"]["groups"]["X"]["trials"] == 2
    # 1:1: every probe against every enrolled template of another person (independent count).
    imp, gen_pairs = [], []
    probes = run.protocol.mated + run.protocol.nonmated
    for i, im in enumerate(probes):
        for j, gi in enumerate(run.protocol.gallery):
            c = float(pv[i] @ g[j])
            if gi.identity == im.identity:
                gen_pairs.append((labels[im.identity], c))
            else:
                imp.append((labels[im.identity], labels[gi.identity], c))
    scores = sorted((c for *_, c in imp), reverse=True)
    k = int(np.floor(0.34 * len(scores)))  # a threshold with no near-tie (float32 sums)
    thr = scores[k]
    assert s["threshold_1to1"] == pytest.approx(thr) and s["threshold_1to1"] > thr
    for grp in ("X", "Y"):
        within = [c for a, b, c in imp if a == grp and b == grp]
        assert s["fmr"]["groups"][grp]["trials"] == len(within)
        assert s["fmr"]["groups"][grp]["errors"] == sum(1 for c in within if c > thr)
        gens = [c for a, c in gen_pairs if a == grp]
        assert s["fnmr"]["groups"][grp]["trials"] == len(gens)
        assert s["fnmr"]["groups"][grp]["errors"] == sum(1 for c in gens if not c > thr)
    for metric in ("fnir", "fpir", "fnmr", "fmr"):
        for r in s[metric]["groups"].values():
            assert r["ci"][0] <= r["rate"] <= r["ci"][1]
    again = demographics(
        run, {"toy": o}, labels, part="test", operating_fpir=0.5, operating_fmr=0.34, n_boot=200, seed=1
    )
    assert again == rep


def test_embedding_cache_is_keyed_by_engine_version(tmp_path):
    c = EmbeddingCache(tmp_path)
    c.put_embeddings("sface", "v1|det", [("k1", OK, np.ones(4)), ("k2", "NO_FACE", None)])
    c.put_embeddings("sface", "v2|det", [("k1", OK, np.zeros(4))])
    assert c.done("sface", "v1|det") == {"k1", "k2"} and c.done("sface", "v2|det") == {"k1"}
    got = c.embeddings("sface", "v1|det", 4)
    assert got["k1"][0] == OK and np.allclose(got["k1"][1], 1.0) and got["k2"] == ("NO_FACE", None)
    assert c.versions("sface") == {"v1|det": 2, "v2|det": 1} and c.done("dlib", "v1|det") == set()
    f = tmp_path / "img.jpg"
    f.write_bytes(b"abc")
    assert c.keys([f]) == [file_key(f)] == c.keys([f])
