"""The main job on real parts: radosgw (S3), redis-server, Celery worker processes, three real
engines on real faces. Enrol the ci gallery and distractors, search every probe through the queue."""

from __future__ import annotations

import pytest

from quorum.cli.demo import enrol_and_search
from quorum.core.engines import DEFAULT_ENGINES
from quorum.evaluation.ci_split import read_split
from quorum.schemas import CandidateList

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(s3_stack, data_dir):
    lines: list[str] = []
    card, extra = enrol_and_search(s3_stack, read_split(data_dir / "ci"), echo=lines.append)
    print("\n".join(lines))  # each engine's figure, visible with -s and in CI logs on failure
    return card, extra


def test_every_gallery_image_enrolled_in_every_engine(run):
    _, extra = run
    report = extra["enrol"]
    assert report.images == 320
    for engine in DEFAULT_ENGINES:
        failed = len(report.failed.get(engine, []))
        assert report.enrolled[engine] + failed == 320
        assert failed <= 3, report.failed[engine]  # LFW deep-funneled: a face is found in nearly all


def test_fused_rank1_hit_rate(run):
    card, _ = run
    assert card.mated == 442 and card.non_mated == 100
    assert not card.errors, card.errors
    assert card.degraded == 0
    print({who: round(card.rate(who), 3) for who in (*DEFAULT_ENGINES, "fused")})
    assert card.rate("fused") >= 0.95
    # Each engine is a working face recogniser on its own (a broken one would sit near 1/320).
    for engine in DEFAULT_ENGINES:
        assert card.rate(engine) >= 0.80, engine


def test_unknown_probes_come_back_with_scores(run):
    card, extra = run
    unknown = [rid for rid, who in extra["truth"].items() if who is None]
    assert len(unknown) == 100
    for rid in unknown:
        res = extra["results"][rid]
        assert isinstance(res, CandidateList)
        assert len(res.candidates) == 250
        assert all(set(c.engines) for c in res.candidates)
    # Mated probes' best matches stand out more than non-mated ones' do.
    import statistics

    assert statistics.median(card.mated_top_scores) > statistics.median(card.non_mated_top_scores)


def test_candidate_list_contract(run):
    _, extra = run
    res = next(r for r in extra["results"].values() if isinstance(r, CandidateList))
    assert res.notice.startswith("INVESTIGATIVE LEAD ONLY")
    assert [c.rank for c in res.candidates] == list(range(1, 251))
    assert res.engines_contributed == sorted(DEFAULT_ENGINES) == ["arcface", "facenet", "sface"]
    # Production runs the fusion the shipped calibration measured best: had the calibration not
    # matched the running engines' versions, fusion would have fallen back to zsum.
    from quorum.workers.fusion import load_calibration

    assert res.fusion_method == load_calibration().default_method
    assert len(res.probe_sha256) == 64 and res.face.faces_found >= 1


def test_every_line_of_every_process_log_is_a_json_record(run, s3_stack):
    """QUORUM_LOG_JSON=true: one format for a log shipper, whichever library wrote the line (Celery,
    kombu, onnxruntime, the supervisor, a print). redis.log is redis-server's own log, not ours."""
    import json
    from pathlib import Path

    logs = [p for p in sorted((Path(s3_stack.home) / "logs").glob("*.log")) if p.name != "redis.log"]
    assert len(logs) >= 6  # gateway, intake, fusion, three engines (and the gallery worker)
    plain = []
    for path in logs:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and {"event", "level", "timestamp"} <= set(record)
            except ValueError:
                ok = False
            if not ok:
                plain.append(f"{path.name}:{n}: {line[:200]}")
    assert not plain, "\n".join(plain[:20])
