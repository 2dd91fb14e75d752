"""``quorum review``: an agency's certified users review its searches in a browser.

A small Starlette app (served by uvicorn on loopback by default). After signing in with a one-time
token (``review.signin``), a reviewer sees the candidate lists of their own agency's searches, opens
one as its candidate sheet (the same page ``quorum sheet`` writes, audited as ``search.viewed`` with
``via: review``), and records a decision per candidate, through the same rules as ``quorum
disposition`` (``accountability.dispositions``, which audits every decision and refusal):

=============  ========================  ==========================================================
decision       disposition recorded      status
=============  ========================  ==========================================================
no match       ``candidate_excluded``    final
possible lead  ``inconclusive``          final
lead           ``lead_pursued``          pending until a *second* certified user confirms it
=============  ========================  ==========================================================

Every page view is audited (the list: ``review.page``; a sheet: ``search.viewed``). Forms carry the
session's form token and the session cookie is ``SameSite=Strict``; pages forbid framing, caching and
any outside resource. Errors a user can act on come back as a page with the stable code, never a
traceback.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from ..accountability import audit, db, dispositions
from ..broker.redis_errors import connect
from ..core.config import Settings
from ..core.errors import Code, QuorumError
from . import signin
from .render import environment, render

log = structlog.get_logger()

COOKIE = "quorum_review"  # the session; "__Host-" prefixed and Secure when served remotely (behind TLS)
SIGNIN_COOKIE = "quorum_signin"  # the sign-in form's token (double submit: a cross-site form cannot send it)
SIGNIN_FORM_TTL_S = 900
REVIEW_PAGE = "review.page"
LIST_LIMIT = 200
# decision (what the reviewer picks) -> (disposition outcome, label)
DECISIONS = {
    "no_match": ("candidate_excluded", "No match"),
    "possible_lead": ("inconclusive", "Possible lead"),
    "lead": ("lead_pursued", "Lead"),
}
OUTCOME_LABELS = {outcome: label for outcome, label in DECISIONS.values()}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
STATUS = {
    Code.REQUEST_UNKNOWN: 404,
    Code.NO_CANDIDATE_LIST: 404,
    Code.RESULT_EXPIRED: 410,
    Code.DISPOSITION_REFUSED: 409,
}


def _page(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    return HTMLResponse(environment().get_template(name).render(**ctx), status_code=status, headers=HEADERS)


def _error(err: QuorumError, reviewer: signin.Reviewer | None = None) -> HTMLResponse:
    status = STATUS.get(err.code, 403 if err.code.value.startswith(("USER_", "ROLE_", "CERTIFICATE_")) else 400)
    return _page("review_error.html.j2", status, code=err.code.value, message=err.message, reviewer=reviewer)


def _see(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303, headers=HEADERS)


def searches(eng: Any, agency: str, limit: int = LIST_LIMIT) -> list[dict]:
    """The agency's answered searches with a candidate list, newest first, with their dispositions."""
    rows = [
        r for r in audit.query(eng, agency=agency, action=audit.SEARCH_RESULT) if r["outcome"] in {"ok", "degraded"}
    ]
    rows = rows[-limit:][::-1]
    counts: dict[str, int] = {}
    for d in dispositions.list_for(eng, agency=agency):
        counts[d["request_id"]] = counts.get(d["request_id"], 0) + 1
    return [
        {
            "request_id": r["request_id"],
            "ts": r["ts"][:19].replace("T", " ") + " UTC",
            "user": r["actor"],
            "case_number": r["case_number"],
            "offence_code": r["offence_code"],
            "purpose": r["purpose"],
            "outcome": r["outcome"],
            "candidates": json.loads(r["details"] or "{}").get("candidates", ""),
            "dispositions": counts.get(r["request_id"], 0),
        }
        for r in rows
    ]


def create_app(s: Settings, *, remote: bool = False) -> Starlette:
    """``remote``: served on a non-loopback address behind TLS (``quorum review --allow-remote``): cookies
    are ``Secure`` and ``__Host-`` prefixed (HTTPS only, this host only, path ``/``)."""
    eng = db.get_engine(s)
    r = connect(s.redis_url)
    prefix = "__Host-" if remote else ""
    session_cookie, form_cookie = prefix + COOKIE, prefix + SIGNIN_COOKIE

    def set_cookie(resp: Response, name: str, value: str, max_age: int) -> None:
        resp.set_cookie(name, value, max_age=max_age, httponly=True, samesite="strict", secure=remote, path="/")

    def who(request: Request) -> signin.Reviewer | None:
        return signin.reviewer(r, eng, request.cookies.get(session_cookie))

    Handler = Callable[[Request, signin.Reviewer], Awaitable[Response]]

    def signed_in(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                rv = await run_in_threadpool(who, request)
            except QuorumError as err:  # the user may no longer review (deactivated, certificate expired ...)
                resp = _error(err)
                resp.delete_cookie(session_cookie, secure=remote, httponly=True, samesite="strict")
                return resp
            if rv is None:
                return _see("/signin")
            if request.method == "POST":
                form = await request.form()
                if not secrets.compare_digest(str(form.get("form_token", "")), rv.form_token):
                    return _page(
                        "review_error.html.j2", 403, code="FORM_EXPIRED", message="reload the page", reviewer=rv
                    )
            try:
                return await handler(request, rv)
            except QuorumError as err:
                return _error(err, rv)

        return endpoint

    def signin_page(status: int = 200, message: str = "") -> Response:
        token = secrets.token_urlsafe(24)
        resp = _page("review_signin.html.j2", status, message=message, form_token=token)
        set_cookie(resp, form_cookie, token, SIGNIN_FORM_TTL_S)
        return resp

    async def signin_form(request: Request) -> Response:
        return signin_page()

    async def signin_post(request: Request) -> Response:
        form = await request.form()
        sent, kept = str(form.get("form_token", "")), request.cookies.get(form_cookie, "")
        if not kept or not secrets.compare_digest(sent, kept):  # a form posted from another site, or stale
            log.warning("review.signin_form_refused")
            return signin_page(403, "FORM_EXPIRED: sign in from this page (it was reloaded)")
        try:
            session, rv = await run_in_threadpool(signin.sign_in, r, eng, str(form.get("token", "")).strip())
        except QuorumError as err:
            return signin_page(403, f"{err.code.value}: {err.message}")
        log.info("review.signed_in", user=rv.user_id, agency=rv.agency_id)
        resp = _see("/")
        set_cookie(resp, session_cookie, session, signin.SESSION_TTL_S)
        resp.delete_cookie(form_cookie, secure=remote, httponly=True, samesite="strict")
        return resp

    async def signout(request: Request) -> Response:
        signin.sign_out(r, request.cookies.get(session_cookie))
        resp = _see("/signin")
        resp.delete_cookie(session_cookie, secure=remote, httponly=True, samesite="strict")
        return resp

    async def home(request: Request, rv: signin.Reviewer) -> Response:
        def work() -> list[dict]:
            audit.append(
                eng,
                audit.AuditEvent(
                    action=REVIEW_PAGE, outcome="ok", actor=rv.user_id, agency=rv.agency_id, details={"page": "list"}
                ),
            )
            return searches(eng, rv.agency_id)

        return _page("review_list.html.j2", reviewer=rv, searches=await run_in_threadpool(work))

    async def sheet_page(request: Request, rv: signin.Reviewer) -> Response:
        from .gather import view_sheet

        rid = request.path_params["request_id"]

        def work() -> str:
            sheet = view_sheet(s, rid, actor=rv.user_id, agency=rv.agency_id, via="review")
            by_candidate: dict[str, list[dict]] = {}
            for d in dispositions.list_for(eng, request_id=rid, agency=rv.agency_id):
                d["label"] = OUTCOME_LABELS.get(d["outcome"], d["outcome"])
                by_candidate.setdefault(d["candidate"], []).append(d)
            review = {
                "user": rv.user_id,
                "form_token": rv.form_token,
                "dispositions": by_candidate,
                "decisions": [(k, label) for k, (_, label) in DECISIONS.items()],
                "action": f"/search/{rid}/decide",
            }
            return render(sheet, review=review)

        return HTMLResponse(await run_in_threadpool(work), headers=HEADERS)

    async def decide(request: Request, rv: signin.Reviewer) -> Response:
        from ..core.errors import InputError
        from ..core.objectstore import open_store
        from .gather import shown_candidates

        rid = request.path_params["request_id"]
        form = await request.form()
        decision, subject = str(form.get("decision", "")), str(form.get("candidate", ""))

        def work() -> int:
            if decision not in DECISIONS:
                raise InputError(Code.DISPOSITION_REFUSED, f"decision must be one of {', '.join(DECISIONS)}")
            # What the sheet shows (this agency's search, its list still kept, removed subjects left out),
            # without decoding the probe and the thumbnails again; a subject not on it is refused (audited).
            shown = shown_candidates(s, r, eng, rid, rv.agency_id, open_store(s))
            if not subject:
                raise InputError(Code.DISPOSITION_REFUSED, "that candidate is not on this search's sheet")
            outcome = DECISIONS[decision][0]
            note = f"review: {DECISIONS[decision][1].lower()}"
            d = dispositions.record(
                eng, rid, outcome, rv.user_id, candidate=subject, note=note, via="review", shown=shown
            )
            log.info("review.decided", request_id=rid, user=rv.user_id, outcome=outcome, status=d.status)
            return shown[subject]

        rank = await run_in_threadpool(work)
        return _see(f"/search/{rid}#rank-{rank}")

    async def confirm(request: Request, rv: signin.Reviewer) -> Response:
        did = int(request.path_params["disposition_id"])

        def work() -> str:
            d = dispositions.confirm(eng, did, rv.user_id, via="review")
            log.info("review.confirmed", disposition=did, user=rv.user_id)
            return d.request_id

        rid = await run_in_threadpool(work)
        return _see(f"/search/{rid}")

    return Starlette(
        routes=[
            Route("/signin", signin_form, methods=["GET"]),
            Route("/signin", signin_post, methods=["POST"]),
            Route("/signout", signout, methods=["POST"]),
            Route("/", signed_in(home), methods=["GET"]),
            Route("/search/{request_id}", signed_in(sheet_page), methods=["GET"]),
            Route("/search/{request_id}/decide", signed_in(decide), methods=["POST"]),
            Route("/dispositions/{disposition_id:int}/confirm", signed_in(confirm), methods=["POST"]),
        ]
    )
