"""``quorum review`` as two people use it, in headless Chromium: an investigator signs in with a
one-time token, opens a search of their agency as its candidate sheet and records a lead on a
candidate; a second certified user signs in and confirms it; the confirmed lead is then in ``quorum
report usage``, and every sign-in, page view and decision in the audit trail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from quorum.accountability import audit, db, registry
from quorum.broker.client import QuorumClient
from quorum.cli.stack import settings_env
from quorum.core.objectstore import open_store
from quorum.gallery.enrol import enrol
from quorum.review.sheet import NOTICE_SHORT
from quorum.schemas import CandidateList
from tests.chromium import Browser
from tests.integration import slices
from tests.integration.servers import free_port

pytestmark = pytest.mark.integration

AGENCY, FIRST, SECOND = "review-agency", "rev-inv-1", "rev-inv-2"
SCREENSHOT_TO = os.environ.get("QUORUM_REVIEW_SCREENSHOT")  # e.g. docs/review-confirmed.png


def _quorum(s, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "quorum.cli", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def searched(disk_stack, data_dir):
    s = disk_stack
    secret = registry.provision(
        db.get_engine(s),
        AGENCY,
        users={FIRST: "investigator", SECOND: "supervisor", "rev-auditor": "auditor"},
        offences=("PC211",),
        purposes=("investigation",),
    )
    rows = slices.rows(data_dir, "review")
    distractors = slices.rows(data_dir, "review", "distractor_gallery")
    items = [(r.identity, r.path) for r in rows + distractors]
    report = enrol(s, open_store(s), items)
    assert all(n == len(items) for n in report.enrolled.values()), report
    client = QuorumClient(s.redis_url, AGENCY, FIRST, secret)
    probe = sorted((data_dir / "ci" / "faces" / rows[0].identity).iterdir())[1]
    rid = client.submit(probe, case_number="REV-1", offence_code="PC211", purpose="investigation")
    result = client.wait(rid, timeout=180)
    assert isinstance(result, CandidateList), result
    return s, rid, result


@pytest.fixture(scope="module")
def server(searched):
    s = searched[0]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "quorum.cli", "review", "--port", str(port)],
        env=settings_env(s),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/signin", timeout=2) as resp:
                assert resp.status == 200
                assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "quorum review did not come up"
            time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def _token(s, user: str) -> str:
    out = _quorum(s, "registry", "user", "review-token", user, "--actor", "op-1")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _sign_in(browser: Browser, base: str, token: str):
    browser.open(f"{base}/signin")
    browser.fill("input[name=token]", token)
    return browser.click("#signin button")


def test_a_lead_recorded_by_one_user_and_confirmed_by_another(searched, server, tmp_path):
    s, rid, result = searched
    first = Browser(tmp_path / "first")
    second = Browser(tmp_path / "second")
    try:
        # the first investigator: sign in, see the agency's search, open its sheet
        token = _token(s, FIRST)
        home = _sign_in(first, server, token)
        assert home.by_id("reviewer").text() == FIRST  # type: ignore[union-attr]
        row = home.find("tr", data_request_id=rid)
        assert row is not None and "REV-1" in row.text()
        sheet = first.click(f'tr[data-request-id="{rid}"] a')
        assert [n.attrs["id"] for n in sheet.find_all(cls="notice")] == ["notice-top", "notice-bottom"]
        assert all(NOTICE_SHORT in n.text() for n in sheet.find_all(cls="notice"))
        assert sheet.by_id("probe") is not None
        assert len(sheet.find_all("img", cls="thumb")) == len(result.candidates)
        top = result.candidates[0]
        card = sheet.find("article", data_rank="1")
        assert card is not None and card.attrs["data-subject"] == top.subject_id
        for engine, hit in top.engines.items():
            assert card.find("tr", data_engine=engine).find(cls="engine-rank").text() == str(hit.rank)  # type: ignore[union-attr]
        # record "lead" on rank 1: pending, and the recorder cannot confirm it
        first.js('document.querySelector(\'article[data-rank="1"] select[name=decision]\').value = "lead"')
        after = first.click('article[data-rank="1"] form.decide button')
        d = after.find("article", data_rank="1").find(cls="disposition")  # type: ignore[union-attr]
        assert d is not None and d.attrs["data-status"] == "pending" and "awaiting a second user" in d.text()
        assert d.find("form", cls="confirm") is None
        # a "no match" on rank 2 is final at once
        first.js('document.querySelector(\'article[data-rank="2"] select[name=decision]\').value = "no_match"')
        after = first.click('article[data-rank="2"] form.decide button')
        d2 = after.find("article", data_rank="2").find(cls="disposition")  # type: ignore[union-attr]
        assert d2 is not None and d2.attrs["data-status"] == "final" and "No match" in d2.text()
        # a used token does not sign in again
        again = Browser(tmp_path / "again")
        try:
            refused = _sign_in(again, server, token)
            assert "USER_UNKNOWN" in refused.by_id("signin-error").text()  # type: ignore[union-attr]
        finally:
            again.close()

        # the second user confirms
        _sign_in(second, server, _token(s, SECOND))
        page = second.open(f"{server}/search/{rid}")
        assert page.by_id("reviewer").text() == SECOND  # type: ignore[union-attr]
        confirmed = second.click('article[data-rank="1"] form.confirm button')
        d = confirmed.find("article", data_rank="1").find(cls="disposition")  # type: ignore[union-attr]
        assert d is not None and d.attrs["data-status"] == "confirmed" and f"by {SECOND}" in d.text()
        shot = Path(SCREENSHOT_TO).resolve() if SCREENSHOT_TO else tmp_path / "review-confirmed.png"
        second.js("document.querySelector('article[data-rank=\"1\"]').scrollIntoView()")
        second.screenshot(shot)
        assert shot.stat().st_size > 20_000
        # a search id that is not this agency's: a coded page, no traceback
        missing = second.open(f"{server}/search/not-a-request")
        assert missing.by_id("error-code").text() == "REQUEST_UNKNOWN"  # type: ignore[union-attr]
    finally:
        first.close()
        second.close()

    # the confirmed lead in the usage report
    today = datetime.now(UTC).date()
    rep = _quorum(s, "report", "usage", "--from", str(today), "--to", str(today + timedelta(days=1)), "--format", "csv")
    assert rep.returncode == 0, rep.stderr
    assert f"disposition,{AGENCY},,,lead_pursued/confirmed,1" in rep.stdout.splitlines()
    assert f"disposition,{AGENCY},,,candidate_excluded/final,1" in rep.stdout.splitlines()
    # every sign-in, page view and decision audited
    eng = db.get_engine(s)
    signins = [(r["actor"], r["outcome"]) for r in audit.query(eng, action="review.signin")]
    assert (FIRST, "ok") in signins and (SECOND, "ok") in signins and ("", "refused") in signins
    assert {r["actor"] for r in audit.query(eng, action="review.page", agency=AGENCY)} >= {FIRST}
    views = [
        (r["actor"], json.loads(r["details"])["via"])
        for r in audit.query(eng, action=audit.SEARCH_VIEWED, request_id=rid)
        if r["outcome"] == "ok"
    ]
    assert views.count((FIRST, "review")) >= 3 and views.count((SECOND, "review")) >= 2
    recorded = audit.query(eng, action=audit.DISPOSITION_RECORDED, request_id=rid)
    assert [(r["actor"], r["outcome"]) for r in recorded] == [(FIRST, "pending"), (FIRST, "final")]
    confirmed_rec = audit.query(eng, action=audit.DISPOSITION_CONFIRMED, request_id=rid)
    assert [(r["actor"], r["outcome"]) for r in confirmed_rec] == [(SECOND, "confirmed")]
    assert audit.verify(eng).ok


def test_only_certified_investigators_and_supervisors_get_a_token(searched):
    s = searched[0]
    out = _quorum(s, "registry", "user", "review-token", "rev-auditor")
    assert out.returncode == 2 and "ROLE_NOT_ALLOWED" in out.stderr and "Traceback" not in out.stderr
