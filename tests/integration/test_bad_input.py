"""Bad input through the real queue: each gets an error result with a stable code, the workers stay
alive, nothing is lost (every intake entry is answered and acknowledged); and an engine that is down
yields a degraded list after the fusion deadline instead of no answer."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import cv2
import numpy as np
import pytest
import redis

from quorum.broker import keys
from quorum.broker.client import QuorumClient, new_request_id
from quorum.cli.stack import Stack, stack_roles
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.schemas import CandidateList, ErrorResult
from tests.integration import slices

pytestmark = pytest.mark.integration

AGENCY = "test-agency"


@pytest.fixture(scope="module")
def env(disk_stack, data_dir):

    ci = data_dir / "ci" / "faces"
    # People with 4+ images (the split's gallery role), so each has images left to search with.
    subjects = [ci / r.identity for r in slices.rows(data_dir, "bad_input")]
    items = [(d.name, sorted(d.iterdir())[0]) for d in subjects]
    report = enrol(disk_stack, open_store(disk_stack), items)
    assert all(n == len(subjects) for n in report.enrolled.values()), report
    from quorum.accountability import db, registry

    secret = registry.provision(
        db.get_engine(disk_stack),
        AGENCY,
        users={"u1": "investigator"},
        offences=("PC211",),
        purposes=("investigation",),
    )
    client = QuorumClient(disk_stack.redis_url, AGENCY, "u1", secret)
    return disk_stack, client, subjects


def _probe(image: dict, **kw) -> str:
    doc = {
        "schema_version": 1,
        "request_id": new_request_id(),
        "agency_id": AGENCY,
        "user_id": "u1",
        "case_number": "C-1",
        "offence_code": "PC211",
        "purpose": "investigation",
        "image": image,
    }
    doc.update(kw)
    return json.dumps(doc)


def _b64(data: bytes) -> dict:
    return {"data_b64": base64.b64encode(data).decode()}


def _png_claiming(w: int, h: int) -> bytes:
    """A complete, well-formed PNG whose header claims w x h pixels: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 65536, 9))
        + chunk(b"IEND", b"")
    )


def _wait_entry_answers(r, entry_ids: list[str], timeout=120.0) -> dict[str, ErrorResult]:
    """Error results carry the intake entry they answer; collect them from the result stream."""
    import time

    from quorum.schemas import parse_result

    want, got = set(entry_ids), {}
    deadline = time.monotonic() + timeout
    while want - set(got) and time.monotonic() < deadline:
        for _, fields in r.xrange(keys.results_stream(AGENCY)):
            res = parse_result(fields[b"payload"])
            if isinstance(res, ErrorResult) and res.stream_entry_id in want:
                got[res.stream_entry_id] = res
        time.sleep(0.3)
    return got


def test_each_bad_input_gets_its_code_and_nothing_is_lost(env, data_dir):
    s, client, subjects = env
    r = redis.Redis.from_url(s.redis_url)
    face_jpeg = sorted(subjects[0].iterdir())[1].read_bytes()
    no_face = cv2.imencode(".png", np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1)))[1].tobytes()
    cases = {
        "NOT_AN_IMAGE": _probe(_b64(b"this is a text file, not a picture" * 20)),
        "IMAGE_EMPTY": _probe({"data_b64": ""}),
        "IMAGE_TRUNCATED": _probe(_b64(face_jpeg[: len(face_jpeg) // 2])),
        "NO_FACE": _probe(_b64(no_face)),
        "IMAGE_TOO_LARGE": _probe(_b64(b"\xff\xd8\xff" + b"\0" * (s.max_image_bytes + 10))),
        "IMAGE_TOO_LARGE ": _probe(_b64(_png_claiming(100_000, 100_000))),  # decompression bomb
        "CASE_NUMBER_MISSING": _probe(_b64(face_jpeg), case_number=None),
        "INVALID_MESSAGE": _probe(_b64(face_jpeg), candidates="many"),  # breaks the schema
        "INVALID_MESSAGE ": "{not json",
        "INVALID_MESSAGE  ": _probe({"data_b64": "@@@ not base64 @@@"}),
        "INVALID_MESSAGE   ": _probe(_b64(face_jpeg), surprise_field=1),
        "UNSUPPORTED_SCHEMA_VERSION": _probe(_b64(face_jpeg), schema_version=99),
        "AGENCY_MISMATCH": _probe(_b64(face_jpeg), agency_id="someone-else"),
        "IMAGE_MISSING": _probe({"key": "probes/" + "0" * 64}),
        "FACE_INDEX_OUT_OF_RANGE": _probe(_b64(face_jpeg), face_index=7),
    }
    entries = {code: client.submit_raw(payload) for code, payload in cases.items()}
    no_payload = r.xadd(keys.intake_stream(AGENCY), {"something": "else"}).decode()
    entries["INVALID_MESSAGE    "] = no_payload
    answers = _wait_entry_answers(r, list(entries.values()))
    for code, entry in entries.items():
        assert entry in answers, f"no answer for {code.strip()}"
        assert answers[entry].code == code.strip(), (code, answers[entry].message)
        assert answers[entry].retryable is False
    # Every entry acknowledged: nothing pending in the gateway's group.
    assert r.xpending(keys.intake_stream(AGENCY), keys.INTAKE_GROUP)["pending"] == 0
    # ... and deleted: no probe image stays base64-encoded in the intake stream once handled.
    assert r.xlen(keys.intake_stream(AGENCY)) == 0
    # Every process still alive, and a good probe still gets its list.
    assert set(Stack(s).status().values()) <= {"up", "running"}
    rid = client.submit(
        sorted(subjects[3].iterdir())[1], case_number="C-2", offence_code="PC211", purpose="investigation"
    )
    res = client.wait(rid, timeout=120)
    assert isinstance(res, CandidateList) and res.candidates[0].subject_id == subjects[3].name


def test_replayed_request_is_refused_and_original_answered_once(env):
    s, client, subjects = env
    image = sorted(subjects[5].iterdir())[1]
    rid = client.submit(image, case_number="C-3", offence_code="PC211", purpose="investigation")
    client.submit(image, case_number="C-3", offence_code="PC211", purpose="investigation", request_id=rid)
    res = client.wait(rid, timeout=120)
    assert isinstance(res, CandidateList) and res.candidates[0].subject_id == subjects[5].name
    r = redis.Redis.from_url(s.redis_url)
    import time

    time.sleep(2)
    answers = [
        json.loads(f[b"payload"]) for _, f in r.xrange(keys.results_stream(AGENCY)) if f[b"request_id"].decode() == rid
    ]
    kinds = sorted(a.get("code") or a["type"] for a in answers)
    assert kinds == ["DUPLICATE_REQUEST", "candidate_list"]


def test_several_faces_use_the_requested_or_the_largest(env, data_dir):
    _s, client, _ = env
    group = data_dir / "ci" / "extras" / "multi_face_group.jpg"
    rid = client.submit(group, case_number="C-4", offence_code="PC211", purpose="investigation", face_index=2)
    res = client.wait(rid, timeout=120)
    assert isinstance(res, CandidateList)
    assert res.face.faces_found >= 4 and res.face.index == 2 and res.face.chosen_by == "request"
    rid = client.submit(group, case_number="C-4", offence_code="PC211", purpose="investigation")
    res0 = client.wait(rid, timeout=120)
    assert res0.face.index == 0 and res0.face.chosen_by == "largest"
    assert res0.face.box[2] * res0.face.box[3] >= res.face.box[2] * res.face.box[3]


def test_engine_down_gives_degraded_list_after_deadline(env):
    s, client, subjects = env
    stack = Stack(s)
    assert stack.stop_process("facenet")
    try:
        rid = client.submit(
            sorted(subjects[7].iterdir())[1], case_number="C-5", offence_code="PC211", purpose="investigation"
        )
        res = client.wait(rid, timeout=120)
        assert isinstance(res, CandidateList)
        assert res.degraded and res.engines_failed == {"facenet": "ENGINE_TIMEOUT"}
        assert res.engines_contributed == ["arcface", "sface"]
        assert res.candidates[0].subject_id == subjects[7].name
        assert res.duration_ms >= s.fusion_deadline_s * 1000 * 0.9
    finally:
        stack.start_process("facenet")
        stack.wait_ready(stack_roles(s), timeout=180)
