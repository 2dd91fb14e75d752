"""The contract: models round-trip, the published JSON Schema files are current and validate."""

import base64
import json

import jsonschema
import pytest
from pydantic import ValidationError

from quorum.schemas import (
    INVESTIGATIVE_LEAD_NOTICE,
    CandidateList,
    EngineHit,
    EngineResult,
    ErrorResult,
    FaceInfo,
    FusedCandidate,
    InlineImage,
    ObjectImage,
    ProbeRequest,
    parse_result,
)
from quorum.schemas.export import SCHEMA_DIR, generated, render


def _probe(**kw):
    base = dict(
        request_id="req-0001",
        agency_id="lasd",
        user_id="u42",
        case_number="CASE-2026-0001",
        offence_code="PC211",
        purpose="criminal-investigation",
        image=InlineImage(data_b64=base64.b64encode(b"\xff\xd8jpeg").decode()),
    )
    base.update(kw)
    return ProbeRequest(**base)


def _candidate_list():
    return CandidateList(
        request_id="req-0001",
        agency_id="lasd",
        case_number="CASE-1",
        probe_sha256="ab" * 32,
        face=FaceInfo(index=0, faces_found=2, box=(1.0, 2.0, 30.0, 40.0), detector_score=0.9, chosen_by="largest"),
        candidates=[
            FusedCandidate(rank=1, subject_id="s1", fused_score=3.2, engines={"sface": EngineHit(rank=1, score=0.71)})
        ],
        fusion_method="zsum",
        engines_contributed=["sface"],
        engines_failed={"dlib": "ENGINE_TIMEOUT"},
        degraded=True,
        duration_ms=12.5,
    )


def test_probe_round_trip_and_defaults():
    p = _probe()
    assert p.schema_version == 1 and p.candidates == 250 and p.face_index is None
    assert ProbeRequest.model_validate_json(p.model_dump_json()) == p
    o = _probe(image=ObjectImage(key="probes/" + "a" * 64))
    assert ProbeRequest.model_validate_json(o.model_dump_json()).image == o.image


@pytest.mark.parametrize(
    "bad",
    [
        {"candidates": 0},
        {"candidates": 251},
        {"face_index": -1},
        {"request_id": ""},
        {"request_id": "has space"},
        {"case_number": ""},
        {"schema_version": 2},
    ],
)
def test_probe_rejects_bad_fields(bad):
    with pytest.raises(ValidationError):
        _probe(**bad)


def test_probe_forbids_unknown_fields_and_missing_ones():
    doc = json.loads(_probe().model_dump_json())
    with pytest.raises(ValidationError):
        ProbeRequest.model_validate({**doc, "purpose_typo": "x"})
    doc.pop("case_number")
    with pytest.raises(ValidationError):
        ProbeRequest.model_validate(doc)


def test_results_round_trip_by_type():
    cl = _candidate_list()
    assert cl.notice == INVESTIGATIVE_LEAD_NOTICE
    back = parse_result(cl.model_dump_json())
    assert isinstance(back, CandidateList) and back == cl
    err = ErrorResult(
        request_id=None, agency_id="lasd", code="NOT_AN_IMAGE", message="x", retryable=False, stage="intake"
    )
    back = parse_result(err.model_dump_json())
    assert isinstance(back, ErrorResult) and back == err
    er = EngineResult(request_id="r", engine="sface", engine_version="v", status="ok")
    assert EngineResult.model_validate_json(er.model_dump_json()) == er


def test_json_schema_files_are_current():
    for name, schema in generated().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{path} missing: run python -m quorum.schemas.export"
        assert path.read_text() == render(schema), f"{path} is stale: run python -m quorum.schemas.export"


def test_json_schema_files_validate_messages_without_python_models():
    """What an agency's non-Python software does: validate JSON against the published files."""
    probe_schema = json.loads((SCHEMA_DIR / "probe-request.schema.json").read_text())
    result_schema = json.loads((SCHEMA_DIR / "result.schema.json").read_text())
    jsonschema.validate(json.loads(_probe().model_dump_json()), probe_schema)
    jsonschema.validate(json.loads(_candidate_list().model_dump_json()), result_schema)
    bad = json.loads(_probe().model_dump_json())
    bad["candidates"] = 9999
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, probe_schema)
    bad = json.loads(_probe().model_dump_json())
    del bad["purpose"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, probe_schema)
