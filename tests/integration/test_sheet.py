"""The candidate sheet as a person sees it: a real search of a ci probe through the running stack,
its sheet written by the CLI, rendered by headless Chromium (the Debian package), and the rendered
DOM checked (probe, thumbnails, notice at top and bottom, engine ranks); a screenshot is saved.
Then the refusals (unknown request, an error answer, a result gone from Redis) and an expunged
candidate (shown as removed, never named), each view in the audit trail."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis as redis_lib

from quorum.accountability import audit, db
from quorum.accountability.registry import DEMO_AGENCY
from quorum.broker import keys
from quorum.broker.results import fetch
from quorum.cli.stack import settings_env
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.review.sheet import NOTICE_SHORT
from quorum.schemas import CandidateList
from tests.htmldom import parse
from tests.integration import slices

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Set to a path (e.g. docs/candidate-sheet.png) to keep the screenshot the test takes.
SCREENSHOT_TO = os.environ.get("QUORUM_SHEET_SCREENSHOT")
MULTI_FACE_PROBE = "Sarah_Hughes_0004.jpg"


@pytest.fixture(scope="module")
def gallery(disk_stack, member_client, data_dir):
    from quorum.accountability.registry import DEMO_USER

    member_client(DEMO_AGENCY, DEMO_USER)  # the CLI's default agency and user
    # This module's own slices: mated people (with probes), and distractors for a longer list.
    rows = slices.rows(data_dir, "sheet")
    distractors = slices.rows(data_dir, "sheet", "distractor_gallery")
    items = [(r.identity, r.path) for r in rows + distractors]
    report = enrol(disk_stack, open_store(disk_stack), items)
    assert all(n == len(items) for n in report.enrolled.values()), report
    return disk_stack, rows


def _quorum(s, *args, cwd=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "chromium is not installed: apt-get install -y chromium (scripts/setup.sh)"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _search(s, probe: Path, tmp_path: Path, *extra: str) -> tuple[str, Path]:
    sheet = tmp_path / "sheet.html"
    out = _quorum(
        s,
        "search",
        str(probe),
        "--case",
        "SHEET-1",
        "--offence",
        "PC211",
        "--purpose",
        "investigation",
        "--json",
        "--sheet",
        str(sheet),
        *extra,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)  # standard output stays the one JSON document
    assert f"wrote {sheet}" in out.stderr
    return doc["request_id"], sheet


@pytest.fixture(scope="module")
def searched(gallery, data_dir, tmp_path_factory):
    s, rows = gallery
    # A probe of this slice in which the detector finds two faces: both boxed and numbered on the sheet.
    probe = data_dir / "ci" / "faces" / MULTI_FACE_PROBE.split("_00")[0] / MULTI_FACE_PROBE
    assert probe.parent.name in {r.identity for r in rows}
    rid, sheet = _search(s, probe, tmp_path_factory.mktemp("sheet"))
    result = fetch(redis_lib.Redis.from_url(s.redis_url), DEMO_AGENCY, rid)
    assert isinstance(result, CandidateList)
    return s, rows, rid, sheet, result


def test_sheet_in_chromium_shows_probe_candidates_ranks_and_notice(searched, tmp_path):
    from quorum.accountability.registry import DEMO_USER

    _, _, _, sheet, result = searched
    dumped = _chromium("--dump-dom", sheet.resolve().as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = parse(dumped.stdout)
    # the notice, first and last thing on the page
    notices = dom.find_all(cls="notice")
    assert [n.attrs["id"] for n in notices] == ["notice-top", "notice-bottom"]
    assert all(NOTICE_SHORT in n.text() for n in notices)
    # the probe, with the searched face boxed
    probe = dom.by_id("probe")
    assert probe is not None and probe.find("image").attrs["href"].startswith("data:image/jpeg;base64,")  # type: ignore[union-attr]
    searched_box = probe.find_all("g", cls="searched")
    assert len(searched_box) == 1 and searched_box[0].attrs["data-face-index"] == str(result.face.index)
    assert result.face.faces_found == 2
    assert [g.attrs["data-face-index"] for g in probe.find_all("g", cls="face")] == ["0", "1"]
    # every candidate in rank order, each with its enrolled image
    cards = dom.find_all("article", cls="candidate")
    assert [int(c.attrs["data-rank"]) for c in cards] == [c.rank for c in result.candidates]
    assert [c.attrs["data-subject"] for c in cards] == [c.subject_id for c in result.candidates]
    assert cards[0].attrs["data-subject"] == "Sarah_Hughes"
    thumbs = dom.find_all("img", cls="thumb")
    assert len(thumbs) == len(result.candidates)
    assert all(t.attrs["src"].startswith("data:image/jpeg;base64,") for t in thumbs)
    # each engine's rank, as the list has it
    for card, cand in zip(cards[:5], result.candidates[:5], strict=True):
        for engine in result.engines_contributed:
            row = card.find("tr", data_engine=engine)
            assert row is not None
            want = str(cand.engines[engine].rank) if engine in cand.engines else "—"
            assert row.find(cls="engine-rank").text() == want  # type: ignore[union-attr]
    assert dom.by_id("case-number").text() == "SHEET-1"  # type: ignore[union-attr]
    assert dom.by_id("user").text() == DEMO_USER  # type: ignore[union-attr]
    # a screenshot a person can look at
    png = Path(SCREENSHOT_TO).resolve() if SCREENSHOT_TO else tmp_path / "candidate-sheet.png"
    shot = _chromium(f"--screenshot={png}", "--window-size=1280,1400", sheet.resolve().as_uri())
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {png}")


def test_quorum_sheet_writes_the_same_sheet_and_every_view_is_audited(searched, tmp_path):
    s, _, rid, _, result = searched
    out = _quorum(s, "sheet", rid, "--for", result_user(s, rid), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    written = tmp_path / f"sheet-{rid}.html"
    assert f"wrote {written.name}" in out.stdout and f"{len(result.candidates)} candidates" in out.stdout
    dom = parse(written.read_text())
    assert len(dom.find_all("img", cls="thumb")) == len(result.candidates)
    # A view for someone who is not a user of the search's agency is refused, and audited.
    other = _quorum(s, "sheet", rid, "--for", "reviewer-1", "--out", str(tmp_path / "other.html"))
    assert other.returncode == 2 and "USER_UNKNOWN" in other.stderr and "Traceback" not in other.stderr
    assert not (tmp_path / "other.html").exists()
    # The actor is the machine's account running the command (not a name typed), the user on behalf of.
    views = audit.query(db.get_engine(s), request_id=rid, action=audit.SEARCH_VIEWED)
    operator = f"cli:{pwd.getpwuid(os.geteuid()).pw_name}@{socket.gethostname()}"
    got = [
        (v["actor"], v["outcome"], json.loads(v["details"])["via"], json.loads(v["details"])["on_behalf_of"])
        for v in views
    ]
    assert got == [
        (operator, "ok", "search", result_user(s, rid)),
        (operator, "ok", "cli", result_user(s, rid)),
        (operator, "refused", "cli", "reviewer-1"),
    ]
    assert all(v["case_number"] == "SHEET-1" and v["agency"] == DEMO_AGENCY for v in views)
    assert audit.verify(db.get_engine(s)).ok


def result_user(s, rid: str) -> str:
    rec = audit.query(db.get_engine(s), request_id=rid, action=audit.SEARCH_SUBMITTED)
    return rec[0]["actor"]


def test_refusals_are_coded_without_a_traceback_and_audited(searched, tmp_path, data_dir):
    s, rows, _, _, _ = searched
    unknown = _quorum(s, "sheet", "no-such-request", "--out", str(tmp_path / "x.html"))
    assert unknown.returncode == 2 and "REQUEST_UNKNOWN" in unknown.stderr
    assert "Traceback" not in unknown.stderr and not (tmp_path / "x.html").exists()
    # a search answered with an error has no candidate list
    bogus = tmp_path / "notes.jpg"
    bogus.write_bytes(b"definitely not a jpeg" * 50)
    err = _quorum(
        s, "search", str(bogus), "--case", "SHEET-2", "--offence", "PC211", "--purpose", "investigation", "--json"
    )
    assert err.returncode == 2
    err_rid = json.loads(err.stdout)["request_id"]
    no_list = _quorum(s, "sheet", err_rid, "--out", str(tmp_path / "y.html"))
    assert no_list.returncode == 2 and "NO_CANDIDATE_LIST" in no_list.stderr and "NOT_AN_IMAGE" in no_list.stderr
    # a result past its time in Redis: a second search, whose result key is then let expire
    probe = sorted((data_dir / "ci" / "faces" / rows[1].identity).iterdir())[1]
    old_rid, _ = _search(s, probe, tmp_path, "--top", "3")
    r = redis_lib.Redis.from_url(s.redis_url)
    assert r.pexpire(keys.result_key(DEMO_AGENCY, old_rid), 1)
    # Let go by Redis, the answer is still read from its kept copy in the object store ...
    kept = _quorum(s, "sheet", old_rid, "--out", str(tmp_path / "kept.html"))
    assert kept.returncode == 0 and (tmp_path / "kept.html").exists(), kept.stdout + kept.stderr
    # ... until that copy is gone too (past QUORUM_RESULT_TTL_S: quorum probes purge).
    open_store(s).delete(keys.result_object(DEMO_AGENCY, old_rid))
    expired = _quorum(s, "sheet", old_rid, "--out", str(tmp_path / "z.html"))
    assert expired.returncode == 2 and "RESULT_EXPIRED" in expired.stderr and "Traceback" not in expired.stderr
    eng = db.get_engine(s)
    refused = [
        (v["request_id"], v["code"])
        for v in audit.query(eng, action=audit.SEARCH_VIEWED)
        if v["outcome"] == "refused" and v["request_id"] in {"no-such-request", err_rid, old_rid}
    ]
    assert refused == [
        ("no-such-request", "REQUEST_UNKNOWN"),
        (err_rid, "NO_CANDIDATE_LIST"),
        (old_rid, "RESULT_EXPIRED"),
    ]


def test_an_expunged_candidate_is_shown_as_removed_and_never_named(searched, tmp_path):
    s, rows, rid, _, result = searched
    mine = {r.identity for r in rows}
    gone = next(c for c in result.candidates[1:] if c.subject_id in mine)
    out = _quorum(s, "gallery", "expunge", gone.subject_id, "--reason", "court order (test)", "--actor", "op-1")
    assert out.returncode == 0, out.stderr
    sheet = tmp_path / "after.html"
    again = _quorum(s, "sheet", rid, "--out", str(sheet))
    assert again.returncode == 0, again.stderr
    assert "1 removed from the gallery" in again.stdout
    html = sheet.read_text()
    assert gone.subject_id not in html
    dom = parse(html)
    removed = dom.find_all("article", cls="removed")
    assert [int(c.attrs["data-rank"]) for c in removed] == [gone.rank]
    assert len(dom.find_all("img", cls="thumb")) == len(result.candidates) - 1
