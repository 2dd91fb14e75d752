"""Retries key on the retryable flag: a retryable error is tried again, an input error never."""

from __future__ import annotations

import pytest

from quorum.core.errors import Code, InputError, ServiceError
from quorum.core.retry import call_with_retries


def test_retryable_error_retried_until_success() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ServiceError(Code.STORE_UNAVAILABLE, "down")
        return "ok"

    assert call_with_retries(flaky, attempts=3, first_wait_s=0.001) == "ok"
    assert len(calls) == 3


def test_gives_up_after_attempts_with_the_last_error() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise ServiceError(Code.AUDIT_UNAVAILABLE, f"try {len(calls)}")

    with pytest.raises(ServiceError, match="try 2"):
        call_with_retries(down, attempts=2, first_wait_s=0.001)
    assert len(calls) == 2


def test_input_error_not_retried() -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise InputError(Code.NOT_AN_IMAGE, "no")

    with pytest.raises(InputError):
        call_with_retries(bad, attempts=5, first_wait_s=0.001)
    assert calls == [1]
