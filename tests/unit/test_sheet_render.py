"""The candidate sheet as HTML (review.sheet.build + review.render.render), checked through a parsed DOM."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from quorum.review import bands as bands_mod
from quorum.review.images import probe_uri, thumbnail_uri
from quorum.review.render import render
from quorum.review.sheet import NOTICE_SHORT, SECTION_SIZE, agreement, build
from quorum.schemas import CandidateList, FaceInfo, FusedCandidate
from quorum.schemas.case import CaseContext
from tests.htmldom import parse

ENGINES = ["dlib", "facenet", "sface"]


def _jpeg(color=(120, 90, 60), size=(64, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _candidate(rank: int, subject: str, score: float, ranks: dict[str, int]) -> FusedCandidate:
    return FusedCandidate(
        rank=rank,
        subject_id=subject,
        fused_score=score,
        engines={e: {"rank": r, "score": 0.9 - r / 1000} for e, r in ranks.items()},
    )


def _result(candidates, *, method="logit", face_index=0, faces=2, failed=None) -> CandidateList:
    return CandidateList(
        request_id="req-1",
        agency_id="lasd",
        case_number="2026-001234",
        probe_sha256="0" * 64,
        face=FaceInfo(
            index=face_index, faces_found=faces, box=(40, 30, 60, 70), detector_score=0.9, chosen_by="largest"
        ),
        candidates=candidates,
        fusion_method=method,
        engines_contributed=ENGINES if not failed else [e for e in ENGINES if e not in failed],
        engines_failed=failed or {},
        degraded=bool(failed),
        duration_ms=1200.0,
        created_at=datetime(2026, 11, 29, 23, 0, tzinfo=UTC),
    )


def _sheet(result, **kw):
    probe = np.full((200, 160, 3), 128, dtype=np.uint8)
    subjects = [c.subject_id for c in result.candidates]
    said = {"user_id": kw.pop("user", "inv-0042"), "offence_code": "PC211", "purpose": "criminal-investigation"}
    case = CaseContext(
        agency_id=result.agency_id,
        request_id=result.request_id,
        case_number=result.case_number,
        probe_sha256=result.probe_sha256,
        **said,
    )
    defaults = dict(
        case=case,
        submitted_at="2026-11-29 22:59:58 UTC",
        probe_uri=probe_uri(probe),
        probe_size=(160, 200),
        faces=[(40, 30, 60, 70), (100, 120, 30, 30)],
        min_face_pixels=20,
        thumbs={s: thumbnail_uri(_jpeg()) for s in subjects},
        images={s: 1 for s in subjects},
        bands=bands_mod.load(),
        generated_by="inv-0042",
    )
    defaults.update(kw)
    return build(result, **defaults)


def _three():
    return _result(
        [
            _candidate(1, "Alice_A", 9.5, {"dlib": 1, "facenet": 1, "sface": 1}),
            _candidate(2, "Bob_B", 0.5, {"dlib": 2, "sface": 3}),  # not in facenet's list
            _candidate(3, "Carol_C", -4.0, {"dlib": 40, "facenet": 3, "sface": 2}),  # ranks far apart
        ]
    )


def test_notice_at_top_and_bottom_with_the_case_details():
    dom = parse(render(_sheet(_three())))
    top, bottom = dom.by_id("notice-top"), dom.by_id("notice-bottom")
    assert top is not None and bottom is not None
    for n in (top, bottom):
        assert NOTICE_SHORT in n.text() and "not an identification" in n.text()
    body = dom.find("body")
    assert body is not None
    first, last = body.find_all(cls="notice")[0], body.find_all(cls="notice")[-1]
    assert first is top and last is bottom
    for ident, value in {
        "request-id": "req-1",
        "agency": "lasd",
        "user": "inv-0042",
        "case-number": "2026-001234",
        "offence": "PC211",
        "purpose": "criminal-investigation",
        "submitted-at": "2026-11-29 22:59:58 UTC",
        "answered-at": "2026-11-29 23:00:00 UTC",
    }.items():
        node = dom.by_id(ident)
        assert node is not None and node.text() == value, ident


def test_probe_is_embedded_with_every_face_numbered_and_the_searched_one_marked():
    dom = parse(render(_sheet(_three())))
    svg = dom.by_id("probe")
    assert svg is not None and svg.attrs["viewbox"] == "0 0 160 200"
    image = svg.find("image")
    assert image is not None and image.attrs["href"].startswith("data:image/jpeg;base64,")
    groups = svg.find_all("g", cls="face")
    assert [g.attrs["data-face-index"] for g in groups] == ["0", "1"]
    assert [("searched" in g.classes) for g in groups] == [True, False]
    assert [g.find("text").text() for g in groups] == ["0", "1"]  # type: ignore[union-attr]
    items = dom.by_id("face-list").find_all("li")  # type: ignore[union-attr]
    assert "searched" in items[0].text() and "searched" not in items[1].text()
    assert "--face-index" in dom.text()


def test_candidates_in_rank_order_with_thumbnails_engine_ranks_and_agreement_cues():
    dom = parse(render(_sheet(_three())))
    cards = dom.find_all("article", cls="candidate")
    assert [c.attrs["data-rank"] for c in cards] == ["1", "2", "3"]
    assert [c.attrs["data-subject"] for c in cards] == ["Alice_A", "Bob_B", "Carol_C"]
    thumbs = dom.find_all("img", cls="thumb")
    assert len(thumbs) == 3 and all(t.attrs["src"].startswith("data:image/jpeg;base64,") for t in thumbs)
    ranks = {
        row.attrs["data-engine"]: row.find(cls="engine-rank").text()  # type: ignore[union-attr]
        for row in cards[2].find_all("tr")
        if "data-engine" in row.attrs
    }
    assert ranks == {"dlib": "40", "facenet": "3", "sface": "2"}
    assert "disagree" not in cards[0].classes and "engines agree" in cards[0].text()
    assert "disagree" in cards[1].classes and "not in facenet's top 250" in cards[1].text()
    assert "—" in cards[1].find("tr", data_engine="facenet").text()  # type: ignore[union-attr]
    assert "disagree" in cards[2].classes and "ranks far apart: sface #2, dlib #40" in cards[2].text()


def test_bands_from_the_measured_thresholds():
    b = bands_mod.load()
    strong, moderate = b.bands[0].min_score, b.bands[1].min_score
    assert strong is not None and moderate is not None
    dom = parse(render(_sheet(_three())))
    labels = [c.find(cls="band").text() for c in dom.find_all("article", cls="candidate")]  # type: ignore[union-attr]
    assert labels == ["Strong", "Moderate", "Weak"]  # 9.5 >= strong; 0.5 >= moderate; -4.0 below
    assert b.band_for(strong, "logit").name == "strong"  # type: ignore[union-attr]
    assert b.band_for(strong - 1e-6, "logit").name == "moderate"  # type: ignore[union-attr]
    assert b.band_for(moderate - 1e-6, "logit").name == "weak"  # type: ignore[union-attr]
    assert "bench/results/lfw-dev/report.json" in dom.by_id("bands").text()  # type: ignore[union-attr]


def test_no_band_for_a_list_fused_with_another_method():
    dom = parse(
        render(_sheet(_result([_candidate(1, "Alice_A", 12.0, {"dlib": 1, "facenet": 1, "sface": 1})], method="zsum")))
    )
    assert dom.find(cls="band") is None
    assert "fused with 'zsum'" in dom.by_id("bands").text()  # type: ignore[union-attr]


def test_bands_file_is_what_the_report_and_calibration_give():
    doc = bands_mod.derive(
        json.loads(bands_mod.DEFAULT_REPORT.read_text()),
        json.loads(bands_mod.DEFAULT_CALIBRATION.read_text()),
        report_name="bench/results/lfw-dev/report.json",
    )
    assert doc == json.loads(bands_mod.BANDS_FILE.read_text())  # python -m quorum.review.bands rewrites it


def test_a_removed_subject_shows_as_removed_and_nowhere_by_name():
    res = _three()
    html = render(_sheet(res, removed=frozenset({"Bob_B"})))
    dom = parse(html)
    cards = dom.find_all("article", cls="candidate")
    assert [c.attrs["data-rank"] for c in cards] == ["1", "2", "3"]
    assert "removed" in cards[1].classes and "data-subject" not in cards[1].attrs
    assert "Bob_B" not in html
    assert len(dom.find_all("img", cls="thumb")) == 2
    assert "1 removed" in dom.by_id("candidate-count").text()  # type: ignore[union-attr]


def test_values_are_escaped_never_markup():
    evil = '<script>alert(1)</script>"x'
    res = _result([_candidate(1, evil, 1.0, {"dlib": 1, "facenet": 1, "sface": 1})])
    html = render(_sheet(res, user="<b>u</b>"))
    dom = parse(html)
    assert dom.find("script") is None and dom.find("b") is None
    assert dom.find("article", cls="candidate").attrs["data-subject"] == evil  # type: ignore[union-attr]
    assert dom.by_id("user").text() == "<b>u</b>"  # type: ignore[union-attr]


def test_250_candidates_in_sections_and_nothing_outside_the_file():
    cands = [_candidate(i, f"S_{i:03d}", 5.0 - i / 10, {"dlib": i, "facenet": i, "sface": i}) for i in range(1, 251)]
    html = render(_sheet(_result(cands)))
    dom = parse(html)
    sections = dom.find_all("section", cls="ranks")
    assert len(sections) == 250 // SECTION_SIZE
    assert [len(s.find_all("article")) for s in sections] == [SECTION_SIZE] * len(sections)
    assert sections[1].attrs["id"] == "ranks-26-50"
    links = [a.attrs["href"] for a in dom.find("nav").find_all("a")]  # type: ignore[union-attr]
    assert links == [f"#{s.attrs['id']}" for s in sections]
    assert len(dom.find_all("img", cls="thumb")) == 250
    for n in dom.iter():  # self-contained: every picture inline, no script, no stylesheet link
        assert n.tag not in {"script", "link", "iframe"}
        for attr in ("src", "href"):
            v = n.attrs.get(attr)
            assert v is None or v.startswith(("data:", "#")), v


def test_degraded_list_names_the_missing_engine():
    res = _result([_candidate(1, "Alice_A", 1.0, {"dlib": 1, "sface": 1})], failed={"facenet": "ENGINE_TIMEOUT"})
    dom = parse(render(_sheet(res)))
    assert "DEGRADED" in dom.by_id("engines").text() and "facenet ENGINE_TIMEOUT" in dom.by_id("engines").text()  # type: ignore[union-attr]
    card = dom.find("article", cls="candidate")
    assert card.find("tr", data_engine="facenet") is None and "engines agree" in card.text()  # type: ignore[union-attr]


def test_a_purged_probe_is_said_so():
    dom = parse(
        render(
            _sheet(
                _three(), probe_uri=None, probe_size=None, faces=[], probe_note="the probe image is no longer stored"
            )
        )
    )
    assert dom.by_id("probe") is None
    assert "no longer stored" in dom.by_id("probe-missing").text()  # type: ignore[union-attr]


def test_agreement_rules():
    assert agreement({"a": (1, 0.9), "b": (2, 0.8)}, ["a", "b"], 250) == ()
    assert agreement({"a": (1, 0.9), "b": (11, 0.8)}, ["a", "b"], 250) == ("ranks far apart: a #1, b #11",)
    assert agreement({"a": (120, 0.9), "b": (135, 0.8)}, ["a", "b"], 250) == ()
    assert agreement({"a": (1, 0.9)}, ["a", "b", "c"], 250) == ("not in b, c's top 250",)


def test_the_newest_booking_photo_comes_first():
    from quorum.review.gather import newest_booking_first

    rec = {
        "images": ["gallery/a", "gallery/b", "gallery/c", "gallery/d"],
        "booking_dates": {"gallery/b": "2019-05-01", "gallery/d": "2024-02-11"},
    }
    assert newest_booking_first(rec) == ["gallery/d", "gallery/b", "gallery/a", "gallery/c"]
    assert newest_booking_first({"images": ["gallery/z", "gallery/y"]}) == ["gallery/y", "gallery/z"]


def test_a_candidates_booking_date_and_number_show_under_the_photo():
    from quorum.review.gather import booking_label

    rec = {
        "images": ["gallery/a", "gallery/b"],
        "booking_dates": {"gallery/a": "2024-02-11"},
        "booking_numbers": {"gallery/a": "B-1234", "gallery/b": "B-99"},
    }
    assert booking_label(rec, "gallery/a") == "booked 2024-02-11 · no. B-1234"
    assert booking_label(rec, "gallery/b") == "no. B-99"
    assert booking_label({"images": ["gallery/c"]}, "gallery/c") == ""
    dom = parse(render(_sheet(_three(), bookings={"Alice_A": "booked 2024-02-11 · no. B-1234"})))
    labels = [n.text() for n in dom.find_all(cls="booking")]
    assert labels == ["booked 2024-02-11 · no. B-1234"]  # only where the booking system gave one
