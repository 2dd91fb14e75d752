"""Accountability through the real queue and real workers (the disk stack): policy violations refused
with their codes before any face is detected, each audited; the usage report matches what this
test submitted; tampering with the audit rows is caught by `quorum audit verify`; expunging a
subject removes it from all three engines' lists; probes are never enrolled; anchors on S3 are
locked."""

from __future__ import annotations

import base64
import csv
import io
import json
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
import redis

from quorum.accountability import audit, db, registry
from quorum.broker import keys, signing
from quorum.broker.client import QuorumClient, new_request_id
from quorum.cli.stack import settings_env
from quorum.core.errors import Code, InputError
from quorum.core.objectstore import content_key, open_store
from quorum.gallery.enrol import enrol
from quorum.gallery.expunge import expunge
from quorum.schemas import CandidateList, ErrorResult, parse_result
from tests.integration import slices
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FAR = date.today() + timedelta(days=365)
A, B, S, Q, GHOST = "acc-a", "acc-b", "acc-s", "acc-q", "acc-ghost"


@pytest.fixture(scope="module")
def world(disk_stack, data_dir):

    s = disk_stack
    eng = db.get_engine(s)
    creds = {
        ag: registry.add_agency(eng, ag, ag.upper(), daily_quota=1 if ag == Q else 0, actor="test-op")
        for ag in (A, B, S, Q)
    }
    users = [
        ("inv", A, "investigator", "T-1", FAR),
        ("sup", A, "supervisor", "T-2", FAR),
        ("aud", A, "auditor", "T-3", FAR),
        ("op", A, "operator", "T-4", FAR),
        ("nocert", A, "investigator", None, None),
        ("old", A, "investigator", "T-5", date(2020, 1, 1)),
        ("gone", A, "investigator", "T-6", FAR),
        ("binv", B, "investigator", "T-7", FAR),
        ("sinv", S, "investigator", "T-8", FAR),
        ("qinv", Q, "investigator", "T-9", FAR),
    ]
    for uid, ag, role, cert, exp in users:
        registry.add_user(eng, uid, ag, role, cert_id=cert, cert_expires=exp, actor="test-op")
    registry.set_user_active(eng, "gone", False, actor="test-op")
    registry.set_agency_status(eng, S, "suspended", reason="test", actor="test-op")
    registry.add_offence(eng, "PC211", "robbery", actor="test-op")
    ci = data_dir / "ci" / "faces"
    people = [ci / r.identity for r in slices.rows(data_dir, "accountability")]
    report = enrol(s, open_store(s), [(d.name, sorted(d.iterdir())[0]) for d in people], actor="test-op")
    assert all(n == len(people) for n in report.enrolled.values()), report
    return s, eng, creds, people


def _doc(agency, user="inv", **kw) -> dict:
    doc = {
        "schema_version": 1,
        "request_id": new_request_id(),
        "agency_id": agency,
        "user_id": user,
        "case_number": "2026-000123",
        "offence_code": "PC211",
        "purpose": "criminal-investigation",
    }
    doc.update(kw)
    return doc


def _with_image(doc: dict, data: bytes) -> dict:
    return {**doc, "image": {"data_b64": base64.b64encode(data).decode()}}


def _answers(r, wanted: set[tuple[str, str]], timeout=60.0) -> dict[tuple[str, str], ErrorResult]:
    """``wanted``: (agency, intake entry id) pairs — entry ids are per stream, so two agencies' streams
    can hand out the same one. Error results name the intake entry they answer."""
    got: dict[tuple[str, str], ErrorResult] = {}
    deadline = time.monotonic() + timeout
    while wanted - set(got) and time.monotonic() < deadline:
        for agency in {a for a, _ in wanted}:
            for _, fields in r.xrange(keys.results_stream(agency)):
                res = parse_result(fields[b"payload"])
                if isinstance(res, ErrorResult) and (agency, res.stream_entry_id) in wanted:
                    got[(agency, res.stream_entry_id)] = res
        time.sleep(0.3)
    return got


def _cli(s, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args],
        env={**settings_env(s), **(env or {})},
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_policy_violations_are_refused_before_detection_and_audited(world):
    s, eng, creds, people = world
    r = redis.Redis.from_url(s.redis_url)
    store = open_store(s)
    face = sorted(people[0].iterdir())[1].read_bytes()
    sa, sb = creds[A].secret, creds[B].secret
    n = 0

    def image() -> bytes:  # unique bytes per violation (JPEG decoders ignore trailing bytes)
        nonlocal n
        n += 1
        return face + b"\0violation-%d" % n

    now = int(time.time())
    replay_nonce = signing.new_nonce()
    # name -> (agency written to, doc, entry fields builder, expected code)
    cases: list[tuple[str, str, dict, object, Code]] = []

    def add(name, agency, doc, code, *, secret=sa, fields=None):
        doc = _with_image(doc, image())
        payload = json.dumps(doc)
        f = fields(payload) if fields else signing.sign(secret, payload)
        cases.append((name, agency, doc, f, code))

    add("unknown agency", GHOST, _doc(GHOST), Code.UNKNOWN_AGENCY)
    add("suspended agency", S, _doc(S, "sinv"), Code.AGENCY_SUSPENDED, secret=creds[S].secret)
    add("unsigned", A, _doc(A), Code.BAD_SIGNATURE, fields=lambda p: {"payload": p})
    add("signed with another agency's secret", A, _doc(A), Code.BAD_SIGNATURE, secret=sb)

    def tampered(p):
        f = signing.sign(sa, p)
        return {**f, "payload": p.replace("2026-000123", "2026-000999")}

    add("payload changed after signing", A, _doc(A), Code.BAD_SIGNATURE, fields=tampered)
    add("stale timestamp", A, _doc(A), Code.STALE_TIMESTAMP, fields=lambda p: signing.sign(sa, p, timestamp=now - 900))
    add(
        "timestamp in the future",
        A,
        _doc(A),
        Code.STALE_TIMESTAMP,
        fields=lambda p: signing.sign(sa, p, timestamp=now + 900),
    )
    add(
        "unknown offence (its nonce is replayed next)",
        A,
        _doc(A, offence_code="JAYWALK"),
        Code.OFFENCE_UNKNOWN,
        fields=lambda p: signing.sign(sa, p, nonce=replay_nonce),
    )
    add("replayed nonce", A, _doc(A), Code.REPLAYED_NONCE, fields=lambda p: signing.sign(sa, p, nonce=replay_nonce))
    add("unknown user", A, _doc(A, "nobody"), Code.USER_UNKNOWN)
    add("user of another agency", A, _doc(A, "binv"), Code.USER_OTHER_AGENCY)
    add("deactivated user", A, _doc(A, "gone"), Code.USER_INACTIVE)
    add("auditor searching", A, _doc(A, "aud"), Code.ROLE_NOT_ALLOWED)
    add("operator searching", A, _doc(A, "op"), Code.ROLE_NOT_ALLOWED)
    add("no certificate", A, _doc(A, "nocert"), Code.CERTIFICATE_MISSING)
    add("expired certificate", A, _doc(A, "old"), Code.CERTIFICATE_EXPIRED)
    no_case = _doc(A)
    del no_case["case_number"]
    add("no case number", A, no_case, Code.CASE_NUMBER_MISSING)
    add("placeholder case number", A, _doc(A, case_number="N/A"), Code.CASE_NUMBER_MISSING)
    add("malformed case number", A, _doc(A, case_number="case one!"), Code.CASE_NUMBER_MALFORMED)
    add("general identification", A, _doc(A, purpose="general-identification"), Code.PURPOSE_NOT_ALLOWED)
    add("for a non-member agency", A, _doc(A, purpose="non-member-request"), Code.PURPOSE_NOT_ALLOWED)
    add("live scanning", A, _doc(A, purpose="live-scanning"), Code.PURPOSE_NOT_ALLOWED)
    add("crowd scanning", A, _doc(A, purpose="crowd-scanning"), Code.PURPOSE_NOT_ALLOWED)
    add("unregistered purpose", A, _doc(A, purpose="curiosity"), Code.PURPOSE_NOT_ALLOWED)
    # The quota: Q may search once a day; its first search is accepted, the second refused.
    q_ok = _with_image(_doc(Q, "qinv"), sorted(people[1].iterdir())[1].read_bytes())
    qc = QuorumClient(s.redis_url, Q, "qinv", creds[Q].secret)
    qc.submit_raw(json.dumps(q_ok))
    add("over the daily quota", Q, _doc(Q, "qinv"), Code.QUOTA_EXCEEDED, secret=creds[Q].secret)
    assert len(cases) >= 20

    entries = {}
    for name, agency, doc, fields, code in cases:
        entry = r.xadd(keys.intake_stream(agency), fields).decode()
        entries[(agency, entry)] = (name, agency, doc, code)
    assert len(entries) == len(cases)
    answers = _answers(r, set(entries))
    assert isinstance(qc.wait(q_ok["request_id"], timeout=120), CandidateList)
    for entry, (name, agency, doc, code) in entries.items():
        assert entry in answers, f"no answer for: {name}"
        assert answers[entry].code == code.value, (name, answers[entry].message)
        sha = json.loads(signing.canonical_payload(doc))["image"]["sha256"]
        # Refused before the image was stored or any face detected: no probe object, no job.
        assert store.size(f"probes/{sha}") is None, name
        assert not r.exists(keys.job_key(doc["request_id"])), name
        trail = audit.query(eng, request_id=doc["request_id"])
        assert [(t["action"], t["outcome"], t["code"]) for t in trail] == [
            (audit.SEARCH_SUBMITTED, "refused", code.value)
        ], name
        assert trail[0]["agency"] == agency and trail[0]["probe_sha256"] == sha
        assert trail[0]["purpose"] == doc["purpose"] and trail[0]["details"]
    assert audit.verify(eng).ok


def test_usage_report_matches_the_searches_made(world):
    s, _eng, creds, people = world
    since = datetime.now(UTC).date().isoformat()
    until = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    before = _report_rows(s, since, until)
    client = QuorumClient(s.redis_url, A, "inv", creds[A].secret)
    made = Counter()
    rids = []
    plan = [
        ("criminal-investigation", "PC211"),
        ("criminal-investigation", "PC211"),
        ("missing-person", "PC211"),
        ("crowd-scanning", "PC211"),
        ("criminal-investigation", "NOPE"),
    ]
    for i, (purpose, offence) in enumerate(plan):
        rid = client.submit(
            sorted(people[2 + i % 3].iterdir())[1], case_number="2026-777", offence_code=offence, purpose=purpose
        )
        rids.append(rid)
    results = client.wait_all(rids, timeout=180)
    for (purpose, offence), rid in zip(plan, rids, strict=True):
        res = results[rid]
        outcome = "accepted" if isinstance(res, CandidateList) else f"refused:{res.code}"
        made[("search", A, purpose, offence, outcome)] += 1
        if isinstance(res, CandidateList):
            made[("result", A, "", "", "degraded" if res.degraded else "ok")] += 1
    assert made[("search", A, "crowd-scanning", "PC211", "refused:PURPOSE_NOT_ALLOWED")] == 1
    assert made[("search", A, "criminal-investigation", "NOPE", "refused:OFFENCE_UNKNOWN")] == 1
    assert made[("search", A, "criminal-investigation", "PC211", "accepted")] == 2
    # A disposition, with the second look, through the CLI.
    out = _cli(
        s, "disposition", "record", rids[0], "--outcome", "lead_pursued", "--candidate", people[2].name, "--user", "inv"
    )
    assert out.returncode == 0 and '"status": "pending"' in out.stdout, out.stderr
    did = json.loads(out.stdout.splitlines()[0])["id"]
    assert _cli(s, "disposition", "confirm", str(did), "--user", "inv").returncode == 2  # not the same user
    # Nor the same person at the same keyboard naming another user: the CLI's operator recorded it.
    same = _cli(s, "disposition", "confirm", str(did), "--user", "sup")
    assert same.returncode == 2 and "SECOND_PERSON_REQUIRED" in same.stderr, same.stdout + same.stderr
    assert "Traceback" not in same.stderr
    from quorum.accountability import dispositions

    done = dispositions.confirm(db.get_engine(s), did, "sup", via="review")  # as the review app does for sup
    assert done.status == "confirmed"
    made[("disposition", A, "", "", "lead_pursued/confirmed")] += 1
    time.sleep(1)  # the fusion worker audits right after publishing
    after = _report_rows(s, since, until)
    diff = Counter({k: after[k] - before.get(k, 0) for k in after if k[1] == A and after[k] != before.get(k, 0)})
    assert diff == made
    md = _cli(s, "report", "usage", "--from", since, "--to", until)
    assert md.returncode == 0 and "## Searches per agency" in md.stdout and f"| {A} |" in md.stdout


def _report_rows(s, since, until) -> Counter:
    out = _cli(s, "report", "usage", "--from", since, "--to", until, "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    assert tuple(rows[0]) == ("section", "agency", "purpose", "offence_code", "outcome", "count")
    return Counter({tuple(row[:5]): int(row[5]) for row in rows[1:]})


def test_audit_verify_catches_edit_delete_and_reorder(world, tmp_path):
    s, eng, _creds, _ = world
    out = _cli(s, "audit", "anchor")
    assert out.returncode == 0, out.stderr
    ok = _cli(s, "audit", "verify")
    assert ok.returncode == 0 and ok.stdout.startswith("OK:") and "anchors match" in ok.stdout, ok.stdout + ok.stderr
    live = db.database_url(s).split("sqlite:///", 1)[1]
    target = audit.query(eng, agency=A, action=audit.SEARCH_SUBMITTED, limit=3)[-1]["seq"]
    tampers = {
        "edit": [f"UPDATE audit_log SET purpose = 'criminal-investigation', code = '' WHERE seq = {target}"],
        "delete": [f"DELETE FROM audit_log WHERE seq = {target}"],
        "reorder": [
            f"UPDATE audit_log SET seq = -1 WHERE seq = {target}",
            f"UPDATE audit_log SET seq = {target} WHERE seq = {target + 1}",
            f"UPDATE audit_log SET seq = {target + 1} WHERE seq = -1",
        ],
    }
    for kind, statements in tampers.items():
        copy = tmp_path / f"{kind}.db"
        with sqlite3.connect(live) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
            for sql in statements:
                dst.execute(sql)
            dst.commit()
        res = _cli(s, "audit", "verify", env={"QUORUM_DATABASE_URL": f"sqlite:///{copy}"})
        assert res.returncode == 1, (kind, res.stdout, res.stderr)
        assert res.stdout.startswith(f"BROKEN at seq {target}"), (kind, res.stdout)

    # The newest records deleted leave an intact chain; the audit head in Redis, moved by every writer of the
    # stack (gateway, workers, this process) once its record committed, says what is missing.
    for i in range(2):  # the newest two records: plain registry changes (nothing else refers to them)
        registry.add_offence(eng, f"TAIL{i}", "cut off the end", actor="test-op")
    last = max(int(r["seq"]) for r in audit.rows(eng))
    assert "the outside head confirms the last record" in _cli(s, "audit", "verify").stdout
    copy = tmp_path / "cut.db"
    with sqlite3.connect(live) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
        dst.execute(f"DELETE FROM audit_log WHERE seq > {last - 2}")
        dst.commit()
    env = {"QUORUM_DATABASE_URL": f"sqlite:///{copy}"}
    cut = _cli(s, "audit", "verify", "--no-anchors", env=env)
    assert cut.returncode == 1 and cut.stdout.startswith(f"BROKEN at seq {last - 1}"), cut.stdout + cut.stderr
    assert "newest records were deleted" in cut.stdout
    assert _cli(s, "audit", "verify", "--no-anchors", "--no-head", env=env).returncode == 0  # the chain alone is fine
    # Redis out of reach: the chain is checked, its completeness cannot be, and the exit status says so.
    away = _cli(s, "audit", "verify", env={"QUORUM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert away.returncode == 3 and away.stdout.startswith("OK:"), away.stdout + away.stderr
    assert "completeness not checked" in away.stdout


def test_expunge_removes_the_subject_from_every_engine(world):
    s, eng, creds, people = world
    client = QuorumClient(s.redis_url, A, "inv", creds[A].secret)
    person = people[5]
    probe = sorted(person.iterdir())[1]

    def engines_listing(res) -> set[str]:
        assert isinstance(res, CandidateList), res
        return {e for c in res.candidates if c.subject_id == person.name for e in c.engines}

    rid = client.submit(probe, case_number="2026-888", offence_code="PC211", purpose="criminal-investigation")
    before = client.wait(rid, timeout=120)
    assert engines_listing(before) == {"sface", "facenet", "arcface"}
    assert before.candidates[0].subject_id == person.name
    # The probe can never be enrolled (refused and audited), not even under another name.
    with pytest.raises(InputError) as exc:
        enrol(s, open_store(s), [("someone-else", probe)], actor="test-op")
    assert exc.value.code == Code.PROBE_ENROL_REFUSED
    assert audit.query(eng, action=audit.GALLERY_ENROL)[-1]["code"] == Code.PROBE_ENROL_REFUSED.value
    out = expunge(s, open_store(s), person.name, reason="no charge filed", actor="test-op")
    assert out["known"] and out["images_deleted"] == 1
    gallery_key = content_key("gallery", sorted(person.iterdir())[0].read_bytes())
    assert open_store(s).size(gallery_key) is None
    assert not redis.Redis.from_url(s.redis_url).hexists(keys.GALLERY_SUBJECTS, person.name)
    rid = client.submit(probe, case_number="2026-888", offence_code="PC211", purpose="criminal-investigation")
    after = client.wait(rid, timeout=120)
    assert engines_listing(after) == set()
    assert all(c.subject_id != person.name for c in after.candidates)
    exp = audit.query(eng, action=audit.GALLERY_EXPUNGE)[-1]
    assert json.loads(exp["details"])["subject_id"] == person.name and exp["actor"] == "test-op"


def test_anchor_on_s3_is_locked(s3_server, tmp_path):
    from minio import Minio
    from minio.error import S3Error

    from quorum.core.config import load_settings

    env = s3_server.env
    s = load_settings(
        env={},
        home=str(tmp_path),
        s3_endpoint=env["S3_ENDPOINT"],
        s3_access_key=env["S3_ACCESS_KEY"],
        s3_secret_key=env["S3_SECRET_KEY"],
        s3_bucket="quorum-anchor-test",
        audit_anchor_retention_days=1,
    )
    eng = db.get_engine(s)
    audit.append(eng, audit.AuditEvent(action="test.anchor", outcome="ok"))
    anchors = audit.open_anchors(s)
    assert anchors.kind == "s3"
    doc = audit.anchor(eng, anchors)
    assert audit.verify(eng, anchors).anchors_checked == 1
    client = Minio(env["S3_ENDPOINT"], access_key=env["S3_ACCESS_KEY"], secret_key=env["S3_SECRET_KEY"], secure=False)
    key = audit.anchor_key(doc["seq"])
    version = client.stat_object("quorum-anchor-test-audit", key).version_id
    with pytest.raises(S3Error):  # COMPLIANCE retention: not even the owner may delete this version
        client.remove_object("quorum-anchor-test-audit", key, version_id=version)
    assert json.loads(anchors.get(key))["hash"] == doc["hash"]
