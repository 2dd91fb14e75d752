"""Bulk enrolment's input: a booking system's manifest, and the job id that lets a rerun resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from quorum.core.errors import Code, InputError
from quorum.gallery.items import EnrolItem, enrol_job_id, manifest_items


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "m.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_a_manifest_names_files_relative_to_itself_and_objects_by_key(tmp_path):
    m = _write(
        tmp_path,
        "subject_id,image,booking_date,booking_number\n"
        "bk-1,photos/a.jpg,2024-03-01,B-77\nbk-2,key:booking/abc,,\nbk-3,/abs/b.png,,\n",
    )
    items = manifest_items(m)
    assert items == [
        EnrolItem("bk-1", path=tmp_path / "photos" / "a.jpg", booking_date="2024-03-01", booking_number="B-77"),
        EnrolItem("bk-2", key="booking/abc"),
        EnrolItem("bk-3", path=Path("/abs/b.png")),
    ]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("subject,image\nbk-1,a.jpg\n", "missing ['subject_id']"),
        ("subject_id,image\n,a.jpg\n", "m.csv:2"),
        ("subject_id,image\nbk-1,a.jpg\nbk-2,\n", "m.csv:3"),
        ("subject_id,image,booking_date\nbk-1,a.jpg,01/03/2024\n", "not YYYY-MM-DD"),
        ("subject_id,image,booking_number\nbk-1,a.jpg," + "9" * 65 + "\n", "booking_number"),
    ],
)
def test_a_malformed_manifest_is_refused_naming_the_line(tmp_path, text, where):
    with pytest.raises(InputError) as exc:
        manifest_items(_write(tmp_path, text))
    assert exc.value.code == Code.INVALID_MESSAGE and where in exc.value.message


def test_the_same_items_for_the_same_engines_are_the_same_job():
    a = [EnrolItem("p1", path=Path("/x/1.jpg")), EnrolItem("p2", key="booking/2")]
    assert enrol_job_id(a, ["sface", "dlib"]) == enrol_job_id(list(a), ["sface", "dlib"])
    assert enrol_job_id(a, ["sface", "dlib"]) != enrol_job_id(a[:1], ["sface", "dlib"])
    assert enrol_job_id(a, ["sface", "dlib"]) != enrol_job_id(a, ["sface"])
    assert enrol_job_id(a, ["sface"]) != enrol_job_id(list(reversed(a)), ["sface"])  # positions are the bitmap's
