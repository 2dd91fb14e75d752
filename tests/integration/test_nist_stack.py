"""ANSI/NIST-ITL in and out through the real stack: a gallery enrolled from booking transactions (written
with nistitl from real ci faces: frontal JPEG, PNG and JPEG 2000 records, a profile record each), searched
with a transaction probe (right person first; case number and offence from its Type-2 fields unless the
search gives them), and each bad file answered with its stable code."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from quorum.broker import keys
from quorum.cli.stack import settings_env
from quorum.evaluation.ci_split import read_split
from quorum.schemas import CandidateList
from tests.integration import slices
from tests.nist_builder import Face, reencode, transaction

pytestmark = pytest.mark.integration

FORMATS = (("JPEGB", None), ("PNG", "PNG"), ("JP2", "JPEG2000"))


def _quorum(s, *args, timeout=300, **env):
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args],
        env={**settings_env(s), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def nist_gallery(disk_stack, member_client, data_dir, tmp_path_factory):
    """Ten people enrolled from one transaction each (one frontal record, one profile record); beside
    them a truncated transaction and one without the subject field, refused with their codes."""
    from quorum.accountability.registry import DEMO_AGENCY, DEMO_USER

    member_client(DEMO_AGENCY, DEMO_USER)  # the CLI's default agency
    gallery = slices.rows(data_dir, "nist_stack")
    assert len(gallery) == 10
    folder = tmp_path_factory.mktemp("bookings")
    for i, row in enumerate(gallery):
        cga, fmt = FORMATS[i % len(FORMATS)]
        jpeg = row.path.read_bytes()
        frontal = Face(reencode(jpeg, fmt) if fmt else jpeg, compression=cga, photo_date=f"202611{10 + i}")
        profile = Face(reencode(jpeg, "MIRROR"), pose="R")
        (folder / f"{i:02d}.eft").write_bytes(transaction([frontal, profile], type2={15: row.identity}, tcn=f"BK-{i}"))
    whole = (folder / "00.eft").read_bytes()
    (folder / "cut.eft").write_bytes(whole[: len(whole) // 2])
    (folder / "nosid.eft").write_bytes(transaction([Face(gallery[0].path.read_bytes())], type2={16: "x"}))
    out = _quorum(disk_stack, "enroll", "--nist", str(folder))
    assert out.returncode == 0, out.stdout + out.stderr
    return disk_stack, gallery, folder, out.stdout


def test_enrol_from_transactions_keeps_bookings_and_says_what_it_left(nist_gallery):
    s, gallery, folder, stdout = nist_gallery
    assert "11 transaction(s): 10 face image(s) to enrol" in stdout
    assert "not enrolled: 10 profile face(s)" in stdout
    assert re.search(r"refused: NIST_TRUNCATED: .*cut\.eft", stdout), stdout
    assert re.search(r"refused: NIST_SUBJECT_MISSING: .*nosid\.eft.*2\.015", stdout), stdout
    added = re.search(r"templates added: (\{[^}]*\})", stdout)
    assert added and set(json.loads(added[1].replace("'", '"')).values()) == {10}, stdout
    import redis

    r = redis.Redis.from_url(s.redis_url)
    for i, row in enumerate(gallery):
        rec = json.loads(r.hget(keys.GALLERY_SUBJECTS, row.identity))
        assert f"2026-11-{10 + i}" in rec["booking_dates"].values()
        assert f"BK-{i}" in rec["booking_numbers"].values()
    again = _quorum(s, "enroll", "--nist", str(folder))  # resumes: everything was enrolled
    assert again.returncode == 0 and "10 images (10 already enrolled by an earlier run, skipped)" in again.stdout


def test_a_transaction_probe_finds_its_person_first(nist_gallery, data_dir, member_client, tmp_path):
    s, gallery, _, _ = nist_gallery
    probes = {r.identity: r.path for r in read_split(data_dir / "ci") if r.role == "probe"}
    person = next(r.identity for r in gallery if r.identity in probes)
    probe = tmp_path / "probe.eft"
    probe.write_bytes(
        transaction(
            [Face(reencode(probes[person].read_bytes(), "MIRROR"), pose="L"), Face(probes[person].read_bytes())],
            type2={10: "NIST-CASE-1", 99: "PC211"},
        )
    )
    out = _quorum(s, "search", str(probe), "--purpose", "investigation", "--json", QUORUM_NIST_OFFENCE_FIELD="2.099")
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["candidates"][0]["subject_id"] == person and doc["case_number"] == "NIST-CASE-1"
    # The Python client: what the search gives is never overridden by the transaction.
    client = member_client("nistpd")
    rid = client.submit_transaction(probe, purpose="investigation", case_number="GIVEN-9", offence_field="2.099")
    result = client.wait(rid, timeout=300)
    assert isinstance(result, CandidateList), result
    assert result.case_number == "GIVEN-9" and result.candidates[0].subject_id == person


def test_bad_transactions_answer_with_their_codes(nist_gallery, tmp_path):
    s, gallery, _, _ = nist_gallery
    jpeg = gallery[0].path.read_bytes()
    good = transaction([Face(jpeg)], type2={10: "C-1", 15: "S"})
    two = good.index(b"\x1c2.001:") + 1
    m2 = re.match(rb"2\.001:(\d+)", good[two:])
    ten = good.index(b"\x1c10.001:") + 1
    m10 = re.match(rb"10\.001:(\d+)", good[ten:])
    assert m2 and m10
    cases = {
        "NIST_NOT_A_TRANSACTION": b"this is not a transaction",
        "NIST_TRUNCATED": good[:-700],
        "NIST_LENGTH_MISMATCH": good[:two] + f"2.001:{int(m2[1]) - 3}".encode() + good[two + m2.end() :],
        "NIST_NO_IMAGE": transaction([Face(b"")], type2={10: "C-1"}),
        "NIST_UNSUPPORTED_COMPRESSION": transaction([Face(jpeg, compression="WSQ20")], type2={10: "C-1"}),
        "NIST_RECORD_TOO_LARGE": good[:ten] + b"10.001:9999999999" + good[ten + m10.end() :],
    }
    for code, data in cases.items():
        path = tmp_path / f"{code.lower()}.eft"
        path.write_bytes(data)
        out = _quorum(s, "search", str(path), "--offence", "PC211", "--purpose", "investigation")
        assert out.returncode == 2 and out.stderr.startswith(f"error: {code}: "), (code, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
