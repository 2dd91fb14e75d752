"""Sign-in for quorum review: one-time tokens, sessions re-checked against the registry on every use."""

from __future__ import annotations

import fakeredis
import pytest

from quorum.accountability import audit, registry
from quorum.core.errors import Code, InputError
from quorum.review import signin
from tests.unit.accountability_db import eng, pg_database  # noqa: F401  (fixtures)


def _people(e):
    registry.provision(e, "lasd", users={"inv-1": "investigator", "aud-1": "auditor"}, offences=("PC211",))


def test_a_token_signs_in_once_and_the_session_follows_the_registry(eng):  # noqa: F811
    _people(eng)
    r = fakeredis.FakeRedis()
    token = signin.issue_token(r, eng, "inv-1", actor="op")
    stored = r.keys("quorum:review:token:*")
    assert len(stored) == 1 and token.encode() not in stored[0]  # only its hash
    session, who = signin.sign_in(r, eng, token)
    assert (who.user_id, who.agency_id, who.role) == ("inv-1", "lasd", "investigator")
    assert signin.reviewer(r, eng, session) == who
    with pytest.raises(InputError) as used:
        signin.sign_in(r, eng, token)
    assert used.value.code == Code.USER_UNKNOWN
    registry.set_user_active(eng, "inv-1", False, actor="op")
    with pytest.raises(InputError) as gone:
        signin.reviewer(r, eng, session)
    assert gone.value.code == Code.USER_INACTIVE
    signin.sign_out(r, session)
    assert signin.reviewer(r, eng, session) is None
    outcomes = [(x["actor"], x["outcome"]) for x in audit.query(eng, action=signin.REVIEW_SIGNIN)]
    assert outcomes == [("inv-1", "ok"), ("", "refused")]
    assert [x["agency"] for x in audit.query(eng, action=signin.REVIEW_TOKEN_ISSUED)] == ["lasd"]


def test_no_token_for_a_role_that_may_not_review(eng):  # noqa: F811
    _people(eng)
    with pytest.raises(InputError) as refused:
        signin.issue_token(fakeredis.FakeRedis(), eng, "aud-1", actor="op")
    assert refused.value.code == Code.ROLE_NOT_ALLOWED
    with pytest.raises(InputError) as unknown:
        signin.issue_token(fakeredis.FakeRedis(), eng, "nobody", actor="op")
    assert unknown.value.code == Code.USER_UNKNOWN
