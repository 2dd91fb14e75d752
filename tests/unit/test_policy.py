"""The policy is a pure function: each rule on its own, with a snapshot built in memory."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from types import SimpleNamespace

import pytest

from quorum.accountability.policy import Agency, RegistrySnapshot, User, case_number_problem, check
from quorum.core.errors import Code

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
SNAP = RegistrySnapshot(
    version=1,
    agencies={"a": Agency("a", "A"), "b": Agency("b", "B"), "s": Agency("s", "S", status="suspended")},
    users={
        "inv": User("inv", "a", "investigator", "C1", date(2026, 12, 31)),
        "sup": User("sup", "a", "supervisor", "C2", date(2026, 3, 1)),  # valid through today
        "old": User("old", "a", "investigator", "C3", date(2026, 2, 28)),
        "nocert": User("nocert", "a", "investigator"),
        "aud": User("aud", "a", "auditor", "C4", date(2030, 1, 1)),
        "op": User("op", "a", "operator", "C5", date(2030, 1, 1)),
        "gone": User("gone", "a", "investigator", "C6", date(2030, 1, 1), active=False),
        "binv": User("binv", "b", "investigator", "C7", date(2030, 1, 1)),
        "sinv": User("sinv", "s", "investigator", "C8", date(2030, 1, 1)),
    },
    offences=frozenset({"PC211", "PC187"}),
    purposes={"criminal-investigation": True, "general-identification": False, "crowd-scanning": False},
)
OK = SimpleNamespace(
    agency_id="a", user_id="inv", case_number="2026-001234", offence_code="PC211", purpose="criminal-investigation"
)


def req(**kw):
    return SimpleNamespace(**{**OK.__dict__, **kw})


def test_a_proper_request_is_allowed():
    assert check(OK, SNAP, NOW) is None
    assert check(req(user_id="sup"), SNAP, NOW) is None  # certificate valid through its expiry day


@pytest.mark.parametrize(
    "change, code",
    [
        ({"agency_id": "zz"}, Code.UNKNOWN_AGENCY),
        ({"agency_id": "s", "user_id": "sinv"}, Code.AGENCY_SUSPENDED),
        ({"user_id": "nobody"}, Code.USER_UNKNOWN),
        ({"user_id": "binv"}, Code.USER_OTHER_AGENCY),
        ({"user_id": "gone"}, Code.USER_INACTIVE),
        ({"user_id": "aud"}, Code.ROLE_NOT_ALLOWED),
        ({"user_id": "op"}, Code.ROLE_NOT_ALLOWED),
        ({"user_id": "nocert"}, Code.CERTIFICATE_MISSING),
        ({"user_id": "old"}, Code.CERTIFICATE_EXPIRED),
        ({"case_number": "   "}, Code.CASE_NUMBER_MISSING),
        ({"case_number": "N/A"}, Code.CASE_NUMBER_MISSING),
        ({"case_number": "unknown"}, Code.CASE_NUMBER_MISSING),
        ({"case_number": "case one!"}, Code.CASE_NUMBER_MALFORMED),
        ({"case_number": "ABCDEF"}, Code.CASE_NUMBER_MALFORMED),  # no digit
        ({"case_number": "1" * 41}, Code.CASE_NUMBER_MALFORMED),
        ({"offence_code": "JAYWALK"}, Code.OFFENCE_UNKNOWN),
        ({"purpose": "general-identification"}, Code.PURPOSE_NOT_ALLOWED),
        ({"purpose": "crowd-scanning"}, Code.PURPOSE_NOT_ALLOWED),
        ({"purpose": "curiosity"}, Code.PURPOSE_NOT_ALLOWED),
    ],
)
def test_each_rule_refuses_with_its_code(change, code):
    err = check(req(**change), SNAP, NOW)
    assert err is not None and err.code == code, (change, err)
    assert not err.retryable


def test_first_failure_wins_in_the_documented_order():
    err = check(req(user_id="old", case_number="", offence_code="X", purpose="curiosity"), SNAP, NOW)
    assert err.code == Code.CERTIFICATE_EXPIRED


def test_non_member_agency_is_refused_like_a_suspended_one():
    snap = replace(SNAP, agencies={**SNAP.agencies, "a": Agency("a", "A", member=False)})
    assert check(OK, snap, NOW).code == Code.AGENCY_SUSPENDED


def test_case_number_rules():
    assert case_number_problem("C-1") is None
    assert case_number_problem("2026/000123.a_b") is None
    assert case_number_problem(None).code == Code.CASE_NUMBER_MISSING
    assert case_number_problem("").code == Code.CASE_NUMBER_MISSING
