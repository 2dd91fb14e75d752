"""ANSI/NIST-ITL transactions (core.nist, gallery.nist) built with nistitl's writer from real ci faces:
what is read, and each bad file or record with its stable code."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from quorum.core import nist
from quorum.core.config import load_settings
from quorum.core.errors import Code, InputError
from quorum.evaluation.ci_split import read_split
from quorum.gallery.nist import nist_items
from tests.nist_builder import Face, reencode, transaction

LIMIT = 15 * 1024 * 1024


@pytest.fixture(scope="module")
def jpegs(data_dir) -> list[bytes]:
    rows = [r for r in read_split(data_dir / "ci") if r.role == "gallery"][:3]
    return [r.path.read_bytes() for r in rows]


def _read(tmp_path, data: bytes, name: str = "t.eft") -> nist.Transaction:
    path = tmp_path / name
    path.write_bytes(data)
    return nist.read_transaction(path, max_record_bytes=LIMIT)


def _code(tmp_path, data: bytes) -> Code:
    with pytest.raises(InputError) as ei:
        _read(tmp_path, data)
    return ei.value.code


def test_fields_faces_and_poses_are_read(tmp_path, jpegs):
    data = transaction(
        [
            Face(jpegs[0]),
            Face(reencode(jpegs[0], "MIRROR"), pose="R"),
            Face(reencode(jpegs[1], "PNG"), compression="PNG", pose=None, photo_date=None),
            Face(reencode(jpegs[2], "JPEG2000"), compression="JP2"),
            Face(jpegs[2], image_type="SMT"),
        ],
        type2={15: "SID-1", 10: "CASE-7"},
    )
    tx = _read(tmp_path, data)
    assert tx.value("2.015") == "SID-1" and tx.value("2.10") == "CASE-7" and tx.value("1.009") == "TCN-0001"
    assert [(f.compression, f.pose, f.frontal) for f in tx.faces] == [
        ("JPEGB", "F", True),
        ("JPEGB", "R", False),
        ("PNG", "", True),
        ("JP2", "F", True),
    ]
    assert tx.other_images == 1 and tx.refused == []
    assert tx.faces[0].photo_date == "2026-11-30" and tx.faces[2].photo_date is None
    path = tmp_path / "t.eft"
    assert nist.face_bytes(path, tx.faces[0]) == jpegs[0]  # JPEG as stored
    png = nist.face_bytes(path, tx.faces[3])  # JPEG 2000 decoded, kept losslessly as PNG
    assert png.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(png)) as im:
        assert im.size == Image.open(io.BytesIO(jpegs[2])).size
    assert nist.first_frontal(tx) == tx.faces[0]


def test_bad_files_have_their_codes(tmp_path, jpegs):
    good = transaction([Face(jpegs[0])], type2={15: "SID-1"})
    assert _code(tmp_path, b"GIF89a not a transaction") == Code.NIST_NOT_A_TRANSACTION
    assert _code(tmp_path, good[: len(good) - 500]) == Code.NIST_TRUNCATED
    # Type-2's length field says 5 bytes fewer than it has: its record no longer ends where it says
    two = good.index(b"\x1c2.001:") + 1
    m = re.match(rb"2\.001:(\d+)", good[two:])
    assert m
    lying = good[:two] + b"2.001:" + str(int(m[1]) - 5).zfill(len(m[1])).encode() + good[two + m.end() :]
    assert _code(tmp_path, lying) == Code.NIST_LENGTH_MISMATCH
    assert _code(tmp_path, good + b"extra") == Code.NIST_LENGTH_MISMATCH
    ten = good.index(b"\x1c10.001:") + 1
    m = re.match(rb"10\.001:(\d+)", good[ten:])
    assert m
    huge = good[:ten] + b"10.001:99999999999" + good[ten + m.end() :]
    assert _code(tmp_path, huge) == Code.NIST_RECORD_TOO_LARGE


def test_bad_records_are_refused_with_their_codes_and_the_rest_kept(tmp_path, jpegs):
    data = transaction(
        [
            Face(b""),  # a Type-10 with no image field
            Face(jpegs[0], compression="WSQ20"),
            Face(jpegs[0], compression="PNG"),  # declared PNG, is a JPEG
            Face(jpegs[1]),
        ],
        type2={15: "SID-1"},
    )
    tx = _read(tmp_path, data)
    assert [(r.record, r.code) for r in tx.refused] == [
        (2, Code.NIST_NO_IMAGE),
        (3, Code.NIST_UNSUPPORTED_COMPRESSION),
        (4, Code.NIST_UNSUPPORTED_COMPRESSION),
    ]
    assert [f.record for f in tx.faces] == [5]
    only_bad = _read(tmp_path, transaction([Face(b"")], type2={15: "S"}), "bad.eft")
    with pytest.raises(InputError) as ei:
        nist.first_frontal(only_bad)
    assert ei.value.code == Code.NIST_NO_IMAGE


def test_gallery_items_subject_booking_profiles_and_refusals(tmp_path, jpegs):
    s = load_settings(env={})
    folder = tmp_path / "bookings"
    folder.mkdir()
    (folder / "a.eft").write_bytes(
        transaction([Face(jpegs[0]), Face(reencode(jpegs[0], "MIRROR"), pose="L")], type2={15: "SID-A"}, tcn="BK-1")
    )
    (folder / "b.eft").write_bytes(transaction([Face(jpegs[1], photo_date=None)], type2={15: "SID-B"}))
    (folder / "c.eft").write_bytes(transaction([Face(jpegs[2])], type2={16: "no SID here"}))
    (folder / "d.eft").write_bytes(b"1.001:garbage")
    found = nist_items(s, [folder])
    assert found.transactions == 3 and found.profiles_skipped == 1
    assert [(it.subject_id, it.booking_date, it.booking_number) for it in found.items] == [
        ("SID-A", "2026-11-30", "BK-1"),
        ("SID-B", "2026-12-01", "TCN-0001"),  # no 10.005: the transaction's date (1.005)
    ]
    assert found.items[0].read_bytes() == jpegs[0]
    assert sorted(r.code for r in found.refused) == [Code.NIST_MALFORMED, Code.NIST_SUBJECT_MISSING]
    with_profiles = nist_items(s, [folder], profiles=True)
    assert len(with_profiles.items) == 3 and with_profiles.profiles_skipped == 0
    other_field = nist_items(s.model_copy(update={"nist_subject_field": "2.016"}), [folder / "c.eft"])
    assert [it.subject_id for it in other_field.items] == ["no SID here"]
    # the same files are the same items (a rerun resumes the same job)
    assert [it.source for it in nist_items(s, [folder]).items] == [it.source for it in found.items]
