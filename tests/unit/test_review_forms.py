"""The review app's sign-in form and cookies, driven through its ASGI interface (no server, no network;
fakeredis for the sessions): a sign-in posted without the form's own token (from another site) is refused,
and served remotely the cookies are Secure and ``__Host-`` prefixed."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import urlencode

import fakeredis
import pytest

from quorum.accountability import db, registry
from quorum.core.config import load_settings
from quorum.review import app as review_app
from quorum.review import signin


def _call(app, method: str, path: str, *, form: dict | None = None, cookies: dict | None = None):
    """One request: returns (status, headers as (name, value) pairs, body)."""
    body = urlencode(form or {}).encode()
    headers = [(b"host", b"review.example"), (b"content-type", b"application/x-www-form-urlencoded")]
    if cookies:
        headers.append((b"cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("review.example", 443),
        "root_path": "",
    }
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], [(k.decode(), v.decode()) for k, v in start["headers"]], out.decode()


def _cookies(headers) -> dict[str, str]:
    return {v.split("=", 1)[0]: v for k, v in headers if k == "set-cookie"}


@pytest.fixture
def world(tmp_path, monkeypatch):
    r = fakeredis.FakeRedis()
    monkeypatch.setattr(review_app, "connect", lambda url: r)
    s = load_settings(env={}, home=str(tmp_path / "home"))
    db.dispose_all()
    eng = db.get_engine(s)
    registry.provision(eng, "lasd", users={"inv-1": "investigator"}, offences=("PC211",))
    yield s, r, eng
    db.dispose_all()


@pytest.mark.parametrize("remote", [False, True])
def test_sign_in_needs_the_forms_own_token(world, remote):
    s, r, eng = world
    app = review_app.create_app(s, remote=remote)
    prefix = "__Host-" if remote else ""
    status, headers, page = _call(app, "GET", "/signin")
    assert status == 200
    form_cookie = _cookies(headers)[prefix + review_app.SIGNIN_COOKIE]
    token_in_cookie = form_cookie.split("=", 1)[1].split(";", 1)[0]
    (token_in_page,) = re.findall(r'name="form_token" value="([^"]+)"', page)
    assert token_in_page == token_in_cookie
    flags = form_cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "path=/" in flags
    assert ("secure" in flags) is remote and "domain=" not in flags
    # A form posted from another site carries a valid one-time token but not the form's token: refused,
    # and the one-time token is not spent.
    token = signin.issue_token(r, eng, "inv-1", actor="op")
    status, headers, page = _call(app, "POST", "/signin", form={"token": token})
    assert status == 403 and "FORM_EXPIRED" in page and prefix + review_app.COOKIE not in _cookies(headers)
    wrong = {"token": token, "form_token": "x" * len(token_in_page)}
    status, _, _ = _call(app, "POST", "/signin", form=wrong, cookies={prefix + review_app.SIGNIN_COOKIE: token_in_page})
    assert status == 403
    # From the page itself: signed in, with the session cookie flagged as the form's.
    status, headers, _ = _call(
        app,
        "POST",
        "/signin",
        form={"token": token, "form_token": token_in_page},
        cookies={prefix + review_app.SIGNIN_COOKIE: token_in_page},
    )
    assert status == 303, status
    session = _cookies(headers)[prefix + review_app.COOKIE].lower()
    assert "httponly" in session and "samesite=strict" in session and ("secure" in session) is remote
