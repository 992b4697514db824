"""Nineteenth red-team pass: the money path at f72df8c (red-team 18's fixes: a bodiless intent checked by
min_credits, a failed balance read for a maybe-sent key retryable, ``reattach="never"`` messages).

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests. Fixed: F1 (a
first POST of a key that EvoLink answered with anything but an unknown outcome takes the body off the
intent, so the next POST of the key is checked by min_credits).

* F1 (spends below min_credits, Airflow 3.3): ``_submit`` records the body right before the POST, and
  ``resending_sent`` treats every intent *with* a body as "sent, so checked by the try that sent it". But
  a POST whose failure proves that EvoLink created nothing (the hook's own classification,
  ``hooks.retry.outcome_unknown`` False: connection refused / connect timeout / refused certificate
  (``request_sent=False``), a 429, a 402 ``token_daily_quota_exceeded`` (retryable), any 4xx) leaves that
  intent in the store unchanged. The retry (R02) resends the recorded key and body *unchecked*: EvoLink has
  never seen the key, so it creates and bills a new task, with the balance below ``min_credits`` (other runs
  of the account spent in the retry delay, or the quota that answered 402 is still short). Red-team 18's F1
  closed the same hole only for the bodiless intent (an upload that failed). A non-retryable refusal
  (401 with a revoked key) followed by a clear (R03) resends the same way.

Held: a 3.3 intent whose POST outcome is unknown is resent unchecked and collected (nothing extra bought);
a 3.3 bodiless intent with a balance read that fails for good (403) fails retryably and POSTs nothing; the
same intent after a top-up is POSTed once, checked, with the key it recorded; a 3.0-3.2 ``reattach="never"``
retry below min_credits fails for good without a POST; the ``reattach="never"`` retryable messages never
promise a later download or re-read; a replayed fixable failure after a bodied resend checks the new key.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkInsufficientCreditsError,
    EvolinkPermissionError,
    EvolinkRateLimitError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
    RetryLaterError,
)
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.retry import outcome_unknown
from evolink_provider.ledger import Ledger
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    hostile,  # noqa: F401 - the fixture
    task,
)
from tests.test_ledger import REQUEST, MemoryStore, context
from tests.test_redteam13 import NEW_ID, record_of
from tests.test_redteam17 import GENERATIONS, BillingHook, credits, key_of, post_keys

LOG = logging.getLogger("redteam19")
FIXABLE = {"code": "generation_failed_no_content", "message": "try again"}


def ledger(ctx: dict[str, Any], hook: Any, **kwargs: Any) -> Ledger:
    return Ledger(ctx, hook, LOG, lambda: REQUEST, sleep=lambda _: None, **kwargs)


def _refusing(hook: BillingHook, error: EvolinkError) -> Any:
    """A POST that fails with ``error`` and creates nothing (the key is never stored by EvoLink)."""

    def create(payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        raise error

    return create


NOTHING_CREATED = [
    pytest.param(
        EvolinkTransportError("POST /v1/videos/generations: connection refused", request_sent=False),
        id="connection-refused",
    ),
    pytest.param(EvolinkRateLimitError("slow down", status_code=429, code="rate_limit_exceeded"), id="429"),
    pytest.param(
        EvolinkInsufficientCreditsError("daily quota", status_code=402, code="token_daily_quota_exceeded"),
        id="402-daily-quota",
    ),
]


# -- F1: 3.3, an intent whose POST provably created nothing is resent unchecked by min_credits ------------


@pytest.mark.parametrize("error", NOTHING_CREATED)
def test_f1_an_intent_whose_post_created_nothing_is_resent_below_min_credits(error: EvolinkError) -> None:
    assert error.retryable and not outcome_unknown(error)  # the hook itself says: nothing was created
    store = MemoryStore()
    first = context(store, try_number=1)
    hook = BillingHook(credits=[500])
    hook.create_video_task = _refusing(hook, error)  # type: ignore[method-assign]
    with pytest.raises(EvolinkError) as raised:
        ledger(first, hook, min_credits=100).start(None)
    assert not isinstance(raised.value, AirflowFailException)  # an Airflow retry follows
    intent = record_of(store)
    assert intent.task_id is None and intent.payload is None  # the fix: no body, so not counted as sent

    # Retry delay: other runs of the account spent; the balance is now below min_credits.
    hook.create_video_task = BillingHook.create_video_task.__get__(hook)  # type: ignore[method-assign]
    hook.credits = [40]
    with contextlib.suppress(EvolinkError):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [], (
        f"POSTed {hook.keys}, a key EvoLink never stored (a new billed task), with 40 < min_credits=100 "
        f"and {hook.credit_reads - 1} balance read(s) in this try"
    )


def test_f1_end_to_end_a_429_then_the_retry_buys_below_min_credits(
    hostile: HostileServer,  # noqa: F811
) -> None:
    store = MemoryStore()
    hostile.json("/v1/credits", credits(500))
    hostile.json(GENERATIONS, {"error": {"code": "rate_limit_exceeded", "message": "slow down"}}, status=429)
    with pytest.raises(EvolinkRateLimitError):
        ledger(context(store, try_number=1), EvolinkHook("evolink_hostile"), min_credits=100).start(None)
    assert record_of(store).payload is None and record_of(store).task_id is None  # the fix
    refused_posts = len(post_keys(hostile))

    hostile.json("/v1/credits", credits(40))
    hostile.json(GENERATIONS, task(status="pending"))
    with contextlib.suppress(EvolinkError):
        ledger(context(store, try_number=2), EvolinkHook("evolink_hostile"), min_credits=100).start(None)
    assert len(post_keys(hostile)) == refused_posts, "the retry created a billed task below min_credits"


def test_f1_a_clear_after_a_refused_key_resends_below_min_credits() -> None:
    from evolink_provider.exceptions import EvolinkAuthenticationError

    store = MemoryStore()
    hook = BillingHook(credits=[500])
    refused = EvolinkAuthenticationError("bad key", status_code=401, code="invalid_api_key")
    hook.create_video_task = _refusing(hook, refused)  # type: ignore[method-assign]
    with pytest.raises(AirflowFailException):
        ledger(context(store, try_number=1), hook, min_credits=100).start(None)
    assert record_of(store).payload is None and record_of(store).task_id is None  # the fix

    # The user puts in a new key (whose own quota is 40) and clears the task instance.
    hook.create_video_task = BillingHook.create_video_task.__get__(hook)  # type: ignore[method-assign]
    hook.credits = [40]
    with contextlib.suppress(EvolinkError):
        ledger(context(store, max_tries=5, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [], f"the clear POSTed {hook.keys} (a new billed task) with 40 < min_credits=100"


# -- held ----------------------------------------------------------------------------------------------


def test_held_3_3_an_unknown_outcome_is_resent_unchecked_and_collected() -> None:
    """The sent-key case F1's fix must keep: an intent whose POST outcome is unknown is resent unchecked
    (its own cost may be what took the balance below min_credits) and the task is collected."""
    store = MemoryStore()
    first = context(store, try_number=1)
    k0 = key_of(first, 0)
    hook = BillingHook(answers={k0: task(status="pending")}, credits=[500])
    lost = EvolinkSubmissionUnknownError("answer lost", idempotency_key=k0)
    hook.create_video_task = _refusing(hook, lost)  # type: ignore[method-assign]
    with pytest.raises(EvolinkSubmissionUnknownError):
        ledger(first, hook, min_credits=100).start(None)
    hook.create_video_task = BillingHook.create_video_task.__get__(hook)  # type: ignore[method-assign]
    hook.credits = [40]
    got = ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert got["id"] == TASK_ID and hook.keys == [k0] and hook.credit_reads == 1


def _bodiless_intent(store: MemoryStore, ctx: dict[str, Any]) -> str:
    """Try 1 records its intent, then its upload fails (nothing POSTed): the bodiless intent of red-team
    18's F1."""
    from evolink_provider.records import SubmissionRecord

    key = key_of(ctx, 0)
    store.set(
        "evolink_submission",
        SubmissionRecord(REQUEST.fingerprint, 0, key, None, "seq-2").as_stored(),
    )
    return key


def test_held_3_3_a_bodiless_intent_with_a_forbidden_balance_read_fails_retryably() -> None:
    store = MemoryStore()
    key = _bodiless_intent(store, context(store, try_number=1))
    hook = BillingHook(credits=[EvolinkPermissionError("waf", status_code=403)])
    with pytest.raises(RetryLaterError, match=key):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == []
    # After the balance read recovers and allows it: one POST, the recorded key.
    hook.credits = [500]
    got = ledger(context(store, try_number=3), hook, min_credits=100).start(None)
    assert got["id"] == NEW_ID and hook.keys == [key]
    assert record_of(store).task_id == NEW_ID and record_of(store).payload == REQUEST.payload


def test_held_3_3_a_bodiless_intent_cleared_below_min_credits_posts_nothing() -> None:
    """R03 (a clear of an intent) resends: still checked when the body was never recorded."""
    store = MemoryStore()
    _bodiless_intent(store, context(store, try_number=1))
    hook = BillingHook(credits=[40])
    cleared = context(store, max_tries=5, try_number=3)
    with pytest.raises(RetryLaterError, match="min_credits"):
        ledger(cleared, hook, min_credits=100).start(None)
    assert hook.keys == []


def test_held_3_0_reattach_never_retry_below_min_credits_buys_nothing() -> None:
    hook = BillingHook(credits=[500])
    first = context(None, try_number=1)
    ledger(first, hook, min_credits=100, reattach="never").start(None)
    hook.credits = [40]
    with pytest.raises(AirflowFailException, match="min_credits"):
        ledger(context(None, try_number=2), hook, min_credits=100, reattach="never").start(None)
    assert hook.keys == [key_of(first, 0, "never")]


def test_held_reattach_never_messages_promise_no_read_or_download() -> None:
    store = MemoryStore()
    ctx = context(store, try_number=1)
    hook = BillingHook(credits=[500])
    never = ledger(ctx, hook, reattach="never")
    never.start(None)  # records NEW_ID
    seen = never.record
    assert seen is not None
    never._save(seen.__class__(**{**seen.__dict__, "completed_seen_at": 1.0}))
    with pytest.raises(RetryLaterError) as raised:
        never.refuse_contradiction({"id": NEW_ID, "status": "failed", "error": FIXABLE})
    text = str(raised.value)
    assert "pays for a new generation" in text and "A later try reads" not in text
    with pytest.raises(RetryLaterError) as raised:
        never.check_resumed({"id": "task-other"})
    assert "A later try reads" not in str(raised.value)


def test_held_3_3_a_bodied_resend_answered_by_a_replayed_failure_checks_the_new_key() -> None:
    store = MemoryStore()
    first = context(store, try_number=1)
    k0 = key_of(first, 0)
    hook = BillingHook(answers={k0: task(status="failed", error=FIXABLE)}, credits=[500])
    hook.create_video_task = _refusing(  # type: ignore[method-assign]
        hook, EvolinkSubmissionUnknownError("answer lost", idempotency_key=k0)
    )
    with pytest.raises(EvolinkSubmissionUnknownError):
        ledger(first, hook, min_credits=100).start(None)
    hook.create_video_task = BillingHook.create_video_task.__get__(hook)  # type: ignore[method-assign]
    hook.credits = [40]
    with pytest.raises(AirflowFailException, match="min_credits"):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [k0] and hook.credit_reads == 2
