"""The retry policy's table (evolink_provider/hooks/retry.py), row by row, without HTTP: the loops that ask
it are exercised over loopback in test_hook.py, test_hostile.py, test_storage.py and test_trigger.py."""

from __future__ import annotations

import time

import pytest

from evolink_provider.exceptions import (
    EvolinkBadAnswerError,
    EvolinkError,
    EvolinkTransportError,
    error_for_status,
)
from evolink_provider.hooks.retry import Kind, RetryPolicy, Verdict
from evolink_provider.polling import PollFailureBudget

REFUSED = EvolinkTransportError("connection refused", request_sent=False)
RESET = EvolinkTransportError("reset after sending", request_sent=True)
GARBLED = EvolinkBadAnswerError("not JSON")


def status(code: int, error_code: str | None = None) -> EvolinkError:
    return error_for_status(code, "test", code=error_code)


REPEATED = {
    Kind.READ: [
        REFUSED,
        RESET,
        GARBLED,
        status(429),
        status(500),
        status(503),
        status(400, "no_available_channel"),
        status(400, "channel_selection_failed"),
    ],
    Kind.SUBMISSION: [REFUSED, RESET, GARBLED, status(429), status(502), status(409, "paid_outcome_unknown")],
    Kind.UPLOAD: [REFUSED, status(429), status(503)],
    Kind.DOWNLOAD: [REFUSED, RESET, status(429), status(500), status(504)],
    Kind.POLL: [RESET, GARBLED, status(429), status(503)],
}
NEVER = {
    Kind.READ: [status(400), status(401), status(402, "token_daily_quota_exceeded"), status(404)],
    Kind.SUBMISSION: [status(400), status(402), status(409, "idempotency_conflict")],
    Kind.UPLOAD: [RESET, GARBLED, status(500), status(502), status(400, "no_available_channel")],
    Kind.DOWNLOAD: [status(403), status(404), status(410), status(400)],
    Kind.POLL: [status(401), status(403), status(404)],
}


@pytest.mark.parametrize(("kind", "error"), [(k, e) for k, errors in REPEATED.items() for e in errors])
def test_repeated(kind: Kind, error: EvolinkError) -> None:
    decision = RetryPolicy().decide(kind, 1, error)
    assert decision.verdict is Verdict.REPEAT
    assert 0 < decision.delay <= 1.0  # attempt 1: between half and all of backoff_base


@pytest.mark.parametrize(("kind", "error"), [(k, e) for k, errors in NEVER.items() for e in errors])
def test_never_repeated(kind: Kind, error: EvolinkError) -> None:
    assert RetryPolicy().decide(kind, 1, error).verdict is Verdict.GIVE_UP


def test_attempts_are_bounded_and_retry_after_is_capped() -> None:
    policy = RetryPolicy(max_attempts=3, retry_after_max=7.0)
    busy = error_for_status(429, "slow down", retry_after=3600.0)
    assert policy.decide(Kind.READ, 2, busy).verdict is Verdict.REPEAT
    assert 7.0 <= policy.decide(Kind.READ, 2, busy).delay <= 7.0 + 0.2
    assert policy.decide(Kind.READ, 3, busy).verdict is Verdict.GIVE_UP


def test_no_wait_ends_past_the_deadline() -> None:
    busy = error_for_status(429, "slow down", retry_after=60.0)
    decision = RetryPolicy().decide(Kind.READ, 1, busy, deadline=time.time() + 30)
    assert decision.verdict is Verdict.OUT_OF_TIME
    assert RetryPolicy().decide(Kind.READ, 1, busy, deadline=time.time() + 120).verdict is Verdict.REPEAT


def test_failed_polls_double_from_the_poll_interval_until_the_budget_is_spent() -> None:
    budget = PollFailureBudget(4, poll_interval=2.0, max_poll_interval=5.0)
    delays = [budget.after_failure(RESET).delay for _ in range(3)]
    assert delays == [2.0, 4.0, 5.0]
    assert budget.after_failure(RESET).verdict is Verdict.GIVE_UP
    budget.success()
    assert budget.after_failure(RESET).verdict is Verdict.REPEAT
    assert budget.after_failure(status(404)).verdict is Verdict.GIVE_UP
    assert budget.after_failure(RESET, deadline=time.time() + 1).verdict is Verdict.OUT_OF_TIME
