"""Sign-in for ``quorum review``: one-time tokens issued by ``quorum registry user review-token``, and
sessions.

A token is 32 random bytes (URL-safe base64), printed once; only its SHA-256 is kept, in Redis, for
``ttl_s`` (default a day), naming the user it was issued to. Signing in consumes it (``GETDEL``: it
works once). The session that replaces it is another 32 random bytes in an ``HttpOnly``,
``SameSite=Strict`` cookie; Redis keeps its SHA-256 with the user and a per-session form token (every
form posts it back) for ``SESSION_TTL_S``. Whether the user may review is checked against the registry
on every request, not only at sign-in: a user deactivated, moved or whose certificate expired is
refused at once. Only investigators and supervisors (the roles that may search) are let in.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..accountability import audit, policy
from ..accountability.registry import snapshot
from ..broker import keys
from ..core.errors import Code, InputError

TOKEN_TTL_S = 24 * 3600
SESSION_TTL_S = 8 * 3600
REVIEW_TOKEN_ISSUED = "registry.user.review_token"
REVIEW_SIGNIN = "review.signin"


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


@dataclass(frozen=True)
class Reviewer:
    user_id: str
    agency_id: str
    role: str
    form_token: str


def reviewer_check(eng: Any, user_id: str, *, now: datetime | None = None) -> tuple[str, str]:
    """(agency, role) of a user who may review now, else the registry's refusal (a coded InputError)."""
    snap = snapshot(eng)
    user = snap.users.get(user_id)
    if user is None:
        raise InputError(Code.USER_UNKNOWN, f"user {user_id!r} is not registered")
    err = policy.check_user(user_id, user.agency_id, snap, (now or datetime.now(UTC)).date())
    if err:
        raise err
    return user.agency_id, user.role


def issue_token(redis: Any, eng: Any, user_id: str, *, actor: str, ttl_s: int = TOKEN_TTL_S) -> str:
    """A one-time sign-in token for ``user_id`` (who must be allowed to review now); audited."""
    agency, _ = reviewer_check(eng, user_id)
    token = secrets.token_urlsafe(32)
    redis.set(keys.review_token(_sha(token)), user_id, ex=ttl_s)
    audit.append(
        eng,
        audit.AuditEvent(
            action=REVIEW_TOKEN_ISSUED,
            outcome="ok",
            actor=actor,
            agency=agency,
            details={"user_id": user_id, "ttl_s": ttl_s},
        ),
    )
    return token


def sign_in(redis: Any, eng: Any, token: str) -> tuple[str, Reviewer]:
    """Consume ``token``; returns (session cookie value, reviewer). Audited, refusals too."""
    raw = redis.getdel(keys.review_token(_sha(token))) if token else None
    user_id = keys.as_str(raw) if raw else ""
    try:
        if not user_id:
            raise InputError(Code.USER_UNKNOWN, "this sign-in token is unknown, used or expired: ask for a new one")
        agency, role = reviewer_check(eng, user_id)
    except InputError as err:
        audit.append(
            eng,
            audit.AuditEvent(action=REVIEW_SIGNIN, outcome="refused", code=err.code.value, actor=user_id),
        )
        raise
    session = secrets.token_urlsafe(32)
    form_token = secrets.token_urlsafe(24)
    redis.set(keys.review_session(_sha(session)), json.dumps({"user": user_id, "form": form_token}), ex=SESSION_TTL_S)
    audit.append(eng, audit.AuditEvent(action=REVIEW_SIGNIN, outcome="ok", actor=user_id, agency=agency))
    return session, Reviewer(user_id, agency, role, form_token)


def reviewer(redis: Any, eng: Any, session: str | None) -> Reviewer | None:
    """The signed-in reviewer of a session cookie (None: not signed in); raises the registry's refusal
    when the user may no longer review."""
    if not session:
        return None
    raw = redis.get(keys.review_session(_sha(session)))
    if not raw:
        return None
    rec = json.loads(raw)
    agency, role = reviewer_check(eng, rec["user"])
    return Reviewer(rec["user"], agency, role, rec["form"])


def sign_out(redis: Any, session: str | None) -> None:
    if session:
        redis.delete(keys.review_session(_sha(session)))
