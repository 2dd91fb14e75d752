"""Retries keyed on the error's ``retryable`` flag (never its text), with exponential backoff (tenacity)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import structlog
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .errors import QuorumError

log = structlog.get_logger()
T = TypeVar("T")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, QuorumError) and exc.retryable


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("retrying", attempt=state.attempt_number, error=str(exc), what=getattr(state.fn, "__name__", "?"))


def call_with_retries(
    fn: Callable[[], T], *, attempts: int = 3, first_wait_s: float = 0.5, max_wait_s: float = 8.0
) -> T:
    """Call ``fn``; a retryable :class:`QuorumError` is retried up to ``attempts`` calls in all,
    waiting ``first_wait_s`` then doubling; the last error is raised as it is."""
    retrying = Retrying(
        retry=retry_if_exception(_retryable),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=first_wait_s, max=max_wait_s),
        before_sleep=_log_retry,
        reraise=True,
    )
    return retrying(fn)
