"""YuNet, SCRFD-500M and YuNet with SCRFD as a fallback, compared under one engine on the 1:N protocol.

Usage:  python bench/compare_detectors.py [--data DIR] [--engine arcface] [--cache DIR] [--out report.json]

For each detector (``QUORUM_DETECTOR`` = yunet, scrfd, yunet+scrfd) this runs the protocol of
``quorum eval`` (``evaluation.protocol``, seed 0, the same searches through ``evaluation.runs``; the
embedding cache is keyed by the detector, so the three never mix) and reports:

* failure to detect over every image of the data (no face, or the largest face under the minimum size);
* the engine's rank-1 misses and FNIR at FPIR 1 % on the test part (and the probes it could not embed);
* exact McNemar p between each pair on rank-1, and the people-clustered paired bootstrap of the
  difference in FNIR at FPIR (``evaluation.significance``);
* detection time per image: CPU time of the process (all threads) and wall time, best of ``--repeats``
  passes over the same ``--time-images`` images, detectors interleaved pass by pass.

The cache defaults to ``~/.cache/quorum/eval-detectors`` (not the shared eval cache). The fallback
detector answers exactly YuNet's faces wherever YuNet finds one (``workers.detect.FallbackDetector``), so
after the YuNet pass its cache is seeded with YuNet's rows for those images (faces and embeddings,
copied under the fallback's own detector id) and only the images where YuNet found no face are computed
(``--no-reuse`` computes everything).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from quorum.evaluation.cache import OK, EmbeddingCache, _embed_version, detector_id
from quorum.evaluation.protocol import default_data_dir, list_dataset, make_protocol
from quorum.evaluation.runs import engine_outcome, failures, outcome_metrics, part_indices, run_searches
from quorum.evaluation.significance import Paired, discordant, mcnemar_exact, paired_bootstrap

DETECTORS = ("yunet", "scrfd", "yunet+scrfd")


def use_detector(kind: str) -> None:
    from quorum.core.config import settings

    os.environ["QUORUM_DETECTOR"] = kind
    settings.cache_clear()


def seed_fallback(cache: EmbeddingCache, engine: str, keys: list[str]) -> int:
    """Copy YuNet's rows into the fallback's cache for every image where YuNet did not answer NO_FACE."""
    from quorum.workers.engines import get_engine

    eng = get_engine(engine)
    use_detector("yunet")
    y_id = detector_id()
    use_detector("yunet+scrfd")
    f_id = detector_id()
    y_faces = cache.faces(y_id, keys)
    rows = [(k, st, face) for k, (st, face) in y_faces.items() if st != "NO_FACE"]
    cache.put_faces(f_id, rows)
    y_emb = cache.embeddings(engine, _embed_version(eng.version, y_id), eng.dim)
    copied = {k for k, _, _ in rows}
    cache.put_embeddings(
        engine, _embed_version(eng.version, f_id), [(k, st, v) for k, (st, v) in y_emb.items() if k in copied]
    )
    return len(rows)


def time_detectors(paths: list[Path], kinds: tuple[str, ...], repeats: int) -> dict[str, dict]:
    from quorum.core.config import settings
    from quorum.workers.detect import make_detector
    from quorum.workers.images import decode_image

    s = settings()
    images = [decode_image(p.read_bytes(), max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels) for p in paths]
    dets = {k: make_detector(k, "cpu") for k in kinds}
    for d in dets.values():  # warm-up
        d.detect(images[0])
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for k, d in dets.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for im in images:
                d.detect(im)
            cpu[k].append(1000.0 * (time.process_time() - c0) / len(images))
            wall[k].append(1000.0 * (time.perf_counter() - t0) / len(images))
    return {
        k: {"cpu_ms": round(min(cpu[k]), 2), "wall_ms": round(min(wall[k]), 2), "images": len(images)} for k in kinds
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data_dir() / "lfw-dev")
    ap.add_argument("--engine", default="arcface")
    ap.add_argument("--detectors", default=",".join(DETECTORS))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "quorum" / "eval-detectors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-identities", type=int, default=None)
    ap.add_argument("--fpir", type=float, default=0.01)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--time-images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-reuse", dest="reuse", action="store_false", help="compute the fallback from scratch")
    a = ap.parse_args()

    kinds = tuple(k.strip() for k in a.detectors.split(",") if k.strip())
    proto = make_protocol(list_dataset(a.data), seed=a.seed, max_identities=a.max_identities)
    images = proto.gallery + proto.mated + proto.nonmated
    mi, ni = part_indices_of(proto)
    mated_c = [proto.mated[int(i)].identity for i in mi]
    nonmated_c = [proto.nonmated[int(i)].identity for i in ni]
    cache = EmbeddingCache(a.cache)
    keys = cache.keys([im.path for im in images])
    rows: dict[str, dict] = {}
    paired: dict[str, Paired] = {}
    for kind in kinds:
        if kind == "yunet+scrfd" and a.reuse and "yunet" in rows:
            n = seed_fallback(cache, a.engine, keys)
            print(f"yunet+scrfd: {n} images' faces and embeddings copied from the yunet pass", file=sys.stderr)
        use_detector(kind)
        t0 = time.monotonic()
        run = run_searches(proto, [a.engine], a.cache, progress=False, echo=lambda m: print(m, file=sys.stderr))
        faces = cache.faces(detector_id(), keys)
        codes = Counter(faces[k][0] if k in faces else "MISSING" for k in keys)
        o = engine_outcome(run, a.engine)
        m = outcome_metrics(o, mi, ni, fpir_targets=[a.fpir])
        f = failures(run, a.engine)
        rows[kind] = {
            "detector_id": detector_id(),
            "images": len(keys),
            "faces": dict(sorted(codes.items())),
            "failure_to_detect": sum(v for c, v in codes.items() if c != OK),
            "engine_version": run.engines[a.engine].version,
            "test": m,
            "test_probe_failures": int(
                sum(run.engines[a.engine].probe_status[int(i)] != OK for i in mi)
                + sum(run.engines[a.engine].probe_status[len(proto.mated) + int(i)] != OK for i in ni)
            ),
            "failure_to_enrol": f["failure_to_enrol"],
            "elapsed_s": round(time.monotonic() - t0, 1),
        }
        rows[kind]["test_rank1_misses"] = sorted(
            (proto.mated[int(i)].rel, int(o.mate_rank[int(i)])) for i in mi if o.mate_rank[int(i)] != 1
        )
        paired[kind] = Paired(o.mate_rank[mi] == 1, o.mate_score[mi], o.top_score[ni])
        print(f"{kind}: done in {rows[kind]['elapsed_s']} s", file=sys.stderr)
    tests = []
    for x, y in combinations(kinds, 2):
        b, c = discordant(paired[x].rank1_hit, paired[y].rank1_hit)
        boot = paired_bootstrap(
            paired[x], paired[y], mated_c, nonmated_c, fpir=a.fpir, n_boot=a.bootstrap, seed=a.seed
        ).to_dict()
        tests.append(
            {
                "a": x,
                "b": y,
                "a_right_b_wrong": b,
                "b_right_a_wrong": c,
                "mcnemar_p": mcnemar_exact(b, c),
                "fnir_diff": boot["fnir_diff"],
                "rank1_miss_rate_diff": boot["rank1_miss_rate_diff"],
            }
        )
    rng = np.random.default_rng(a.seed)
    sample = [images[int(j)].path for j in sorted(rng.permutation(len(images))[: a.time_images])]
    timing = time_detectors(sample, kinds, a.repeats)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", *sys.argv]),
        "data": str(a.data),
        "engine": a.engine,
        "protocol": proto.summary(),
        "part": "test",
        "fpir": a.fpir,
        "detectors": rows,
        "tests": tests,
        "timing": timing,
    }
    print(format_table(report))
    if a.out:
        a.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {a.out}")


def part_indices_of(proto) -> tuple[np.ndarray, np.ndarray]:
    class _R:  # part_indices reads only .protocol
        protocol = proto

    return part_indices(_R(), "test")  # type: ignore[arg-type]


def format_table(r: dict) -> str:
    fp = format(100 * r["fpir"], "g")
    head = (
        f"{'detector':<14}{'no face':>9}{'too small':>11}{'r1 miss':>9}{'rank-1':>9}"
        f"{'FNIR@' + fp + '%':>12}{'probe fail':>12}{'cpu ms/img':>12}{'wall ms/img':>13}"
    )
    lines = [f"{r['engine']} on {Path(r['data']).name}, test part", head, "-" * len(head)]
    for k, d in r["detectors"].items():
        t = d["test"]
        lines.append(
            f"{k:<14}{d['faces'].get('NO_FACE', 0):>9}{d['faces'].get('FACE_TOO_SMALL', 0):>11}"
            f"{t['rank1_misses']:>9}{100 * t['cmc']['rank1']:>8.2f}%{100 * t['fnir_at_fpir'][0]['fnir']:>11.2f}%"
            f"{d['test_probe_failures']:>12}{r['timing'][k]['cpu_ms']:>12.1f}{r['timing'][k]['wall_ms']:>13.1f}"
        )
    lines.append("")
    for t in r["tests"]:
        ci = t["fnir_diff"]["ci95"]
        lines.append(
            f"{t['a']} vs {t['b']}: rank-1 {t['a_right_b_wrong']} right only with {t['a']}, "
            f"{t['b_right_a_wrong']} only with {t['b']}, McNemar p = {t['mcnemar_p']:.3g}; "
            f"FNIR difference {100 * t['fnir_diff']['estimate']:+.2f} pp "
            f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
