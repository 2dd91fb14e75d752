"""Who may search, and why: one pure function, :func:`check`, run by the gateway before any image is
stored or any face detected.

``check(request, snapshot, now)`` returns ``None`` (allowed) or the :class:`~core.errors.InputError`
that refuses it, checking in this order (the first failure wins):

==========================  ==================================================================
code                        when
==========================  ==================================================================
``UNKNOWN_AGENCY``          the agency is not in the registry
``AGENCY_SUSPENDED``        the agency is suspended
``USER_UNKNOWN``            no such user
``USER_OTHER_AGENCY``       the user belongs to another agency
``USER_INACTIVE``           the user was deactivated
``ROLE_NOT_ALLOWED``        only investigators and supervisors search (not auditors, operators)
``CERTIFICATE_MISSING``     no face-search training certificate on record
``CERTIFICATE_EXPIRED``     the certificate expired before ``now`` (valid through its expiry day)
``CASE_NUMBER_MISSING``     blank or a placeholder (``N/A``, ``NONE``, ``UNKNOWN``, ``TBD``, ...)
``CASE_NUMBER_MALFORMED``   not 3-40 of ``A-Z a-z 0-9 . / _ -`` starting alphanumeric, with a digit
``OFFENCE_UNKNOWN``         the offence code is not in the registry
``PURPOSE_NOT_ALLOWED``     a refused purpose (general identification with no investigation, a
                            search on behalf of a non-member agency, live or crowd scanning) or
                            one the registry does not know
==========================  ==================================================================

Signatures, replays and the daily quota need state (Redis) and are checked by the gateway around
this function (``broker.signing``, ``workers.admission``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Protocol

from ..core.errors import Code, InputError

SEARCH_ROLES = frozenset({"investigator", "supervisor"})
ROLES = ("investigator", "supervisor", "auditor", "operator")
CASE_NUMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9./_-]{2,39}$")
CASE_PLACEHOLDERS = frozenset(
    {
        "NA",
        "N/A",
        "NONE",
        "NULL",
        "NIL",
        "UNKNOWN",
        "TBD",
        "TBA",
        "PENDING",
        "0",
        "000",
        "XXX",
        "NOCASE",
        "NO-CASE",
        "NO_CASE",
        "-",
        "?",
    }
)


@dataclass(frozen=True)
class Agency:
    id: str
    name: str
    status: str = "active"  # active | suspended
    member: bool = True
    daily_quota: int = 0  # 0: unlimited


@dataclass(frozen=True)
class User:
    id: str
    agency_id: str
    role: str
    cert_id: str | None = None
    cert_expires: date | None = None
    active: bool = True

    def certified(self, today: date) -> bool:
        return bool(self.cert_id) and self.cert_expires is not None and self.cert_expires >= today


@dataclass(frozen=True)
class RegistrySnapshot:
    version: int = 0
    agencies: dict[str, Agency] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    offences: frozenset[str] = frozenset()
    purposes: dict[str, bool] = field(default_factory=dict)  # code -> allowed
    purpose_descriptions: dict[str, str] = field(default_factory=dict)


class SearchRequest(Protocol):
    """What the policy reads of a search request (read-only)."""

    @property
    def agency_id(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def case_number(self) -> str: ...
    @property
    def offence_code(self) -> str: ...
    @property
    def purpose(self) -> str: ...


def case_number_problem(value: object) -> InputError | None:
    if value is None or not isinstance(value, str) or not value.strip() or value.strip().upper() in CASE_PLACEHOLDERS:
        return InputError(Code.CASE_NUMBER_MISSING, "a search needs the case number of an open investigation")
    if not CASE_NUMBER.match(value) or not any(c.isdigit() for c in value):
        return InputError(
            Code.CASE_NUMBER_MALFORMED,
            f"case number {value[:64]!r} is malformed (3-40 of A-Z a-z 0-9 . / _ -, with a digit)",
        )
    return None


def check_agency(agency_id: str, snap: RegistrySnapshot) -> InputError | None:
    agency = snap.agencies.get(agency_id)
    if agency is None:
        return InputError(Code.UNKNOWN_AGENCY, f"agency {agency_id!r} is not a registered member")
    if agency.status != "active" or not agency.member:
        return InputError(Code.AGENCY_SUSPENDED, f"agency {agency_id!r} is suspended")
    return None


def check_user(
    user_id: str, agency_id: str, snap: RegistrySnapshot, today: date, roles: frozenset[str] = SEARCH_ROLES
) -> InputError | None:
    """A certified, active user of ``agency_id`` with one of ``roles`` (also used for dispositions)."""
    user = snap.users.get(user_id)
    if user is None:
        return InputError(Code.USER_UNKNOWN, f"user {user_id!r} is not registered")
    if user.agency_id != agency_id:
        return InputError(Code.USER_OTHER_AGENCY, f"user {user_id!r} belongs to another agency")
    if not user.active:
        return InputError(Code.USER_INACTIVE, f"user {user_id!r} is deactivated")
    if user.role not in roles:
        return InputError(Code.ROLE_NOT_ALLOWED, f"role {user.role!r} may not do this (allowed: {sorted(roles)})")
    if not user.cert_id or user.cert_expires is None:
        return InputError(Code.CERTIFICATE_MISSING, f"user {user_id!r} has no face-search training certificate")
    if user.cert_expires < today:
        return InputError(
            Code.CERTIFICATE_EXPIRED,
            f"user {user_id!r}'s certificate {user.cert_id} expired on {user.cert_expires.isoformat()}",
        )
    return None


def check(req: SearchRequest, snap: RegistrySnapshot, now: datetime) -> InputError | None:
    """The refusal for ``req`` under ``snap`` at ``now``, or None when the search is allowed."""
    err = check_agency(req.agency_id, snap) or check_user(req.user_id, req.agency_id, snap, now.date())
    if err:
        return err
    err = case_number_problem(req.case_number)
    if err:
        return err
    if req.offence_code not in snap.offences:
        return InputError(Code.OFFENCE_UNKNOWN, f"offence code {req.offence_code[:32]!r} is not in the registry")
    allowed = snap.purposes.get(req.purpose)
    if allowed is None:
        return InputError(Code.PURPOSE_NOT_ALLOWED, f"purpose {req.purpose[:64]!r} is not a registered purpose")
    if not allowed:
        why = snap.purpose_descriptions.get(req.purpose, "")
        return InputError(
            Code.PURPOSE_NOT_ALLOWED, f"purpose {req.purpose!r} is not allowed" + (f": {why}" if why else "")
        )
    return None
