"""Eighteenth red-team pass: the money path at 918e8e7 (red-team 17's fixes: the retryable min_credits
refusal of a key an earlier try may have sent on 3.0-3.2, ``reattach="never"`` retries forced there, and
TLS errors other than a refused certificate filed as "sent").

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests. Fixed: F1 (an
intent without its body never left: checked by min_credits, refused retryably), F2 (a failed balance read for
a key an earlier try may have sent fails retryably), F3 (with ``reattach="never"`` the messages say a later
try pays for a new generation).

* F1 (spends below min_credits, Airflow 3.3): ``_submit`` writes the intent (key, no ``payload``) *before*
  the uploads and the POST, and writes ``payload`` only right before the POST. A try whose upload fails
  (since 918e8e7 any TLS error but a refused certificate is "sent", so an upload is no longer repeated in the
  hook) or whose worker is lost mid-upload leaves an intent that was provably never POSTed. The next try is
  R02, a "resend", and ``_submit`` skips ``check_balance`` for every resend: it POSTs a key no try sent, a new
  billed task, with the balance below ``min_credits``.
* F2 (paid video undelivered, 3.0-3.2): a retry whose key an earlier try may have sent runs the balance
  check (red-team 17's F1 fix); a non-retryable answer to the free ``GET /v1/credits`` (a 403 from a WAF, a
  404 gateway blip: what the ledger itself treats as doubt on a task read, R23) goes through ``fail_for``
  and ends the task instance for good. Every retry is skipped and the task the earlier try paid for is never
  collected; on 3.0-3.2 the clear that follows is a new generation.
* F3 (advice that pays, ``reattach="never"``): a refused fresh result link (R25) fails the try retryably
  with "A later try downloads it again"; with ``reattach="never"`` the later try is a forced take of its own
  (R13 on 3.3, R14 on 3.0-3.2): it buys a new generation and never downloads the paid, deliverable one. The
  same sentence is in the poll re-read (R23/R24) and the hook's unknown-outcome message ("an Airflow retry
  resubmits with the same key"). Red-team 16 had this fixed for the completed-empty message only.

Held: an intent recorded with its payload is resent unchecked (R02); a transient balance-read error is
retryable; 3.0-3.2 ``reattach="never"``: a resumed try whose results proved expired (R28) resends its own
key and buys nothing, a fresh failed answer is not taken for a replay, each retry has one key of its own and
is checked; the 3.0-3.2 below-limit loop buys nothing, names the key and that a clear pays, then collects
the paid task after a top-up, and refuses key 1 after a replayed failure retryably; a refused certificate is
"not sent", other TLS errors are "sent"; a sent TLS error repeats polls, downloads and submissions (same
key) but never an upload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkNotFoundError,
    EvolinkPermissionError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
    RetryLaterError,
)
from evolink_provider.hooks.responses import refused
from evolink_provider.hooks.retry import Kind, RetryPolicy
from evolink_provider.ledger import Ledger
from evolink_provider.records import (
    STATE_KEY,
    SubmissionRecord,
    idempotency_key,
    task_instance_identity,
    try_generation,
)
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    completed,
    hostile,  # noqa: F401 - the fixture
    send,
    task,
)
from tests.test_ledger import REQUEST, MemoryStore, context
from tests.test_redteam10 import posts, refused_for, resumed_operator
from tests.test_redteam12 import retry_context
from tests.test_redteam13 import NEW_ID, record_of, success
from tests.test_redteam14 import posted_keys, retry_of
from tests.test_redteam17 import BillingHook, key_of

LOG = logging.getLogger("redteam18")
FIXABLE = {"code": "generation_failed_no_content", "message": "try again"}


def ledger(ctx: dict[str, Any], hook: Any, **kwargs: Any) -> Ledger:
    return Ledger(ctx, hook, LOG, lambda: REQUEST, sleep=lambda _: None, **kwargs)


def tls_error(inner: BaseException) -> requests.exceptions.SSLError:
    """What ``requests`` raises for a TLS failure: SSLError(MaxRetryError(reason=urllib3 SSLError(ssl)))."""
    reason = urllib3.exceptions.SSLError(inner)
    return requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(None, "/v1/x", reason=reason))


# -- F1: 3.3, an intent that was never POSTed is "resent" without the balance check ----------------------


def test_f1_an_intent_whose_upload_failed_is_posted_by_the_retry_below_min_credits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from evolink_provider import submission

    uploads = {"calls": 0}
    real = submission.payload_for_post

    def upload_then_post(*args: Any, **kwargs: Any) -> dict[str, Any]:
        uploads["calls"] += 1
        if uploads["calls"] == 1:  # a TLS alert on the Files API upload: "sent", not repeated by the hook
            raise EvolinkTransportError("POST /files/upload: TLS error", request_sent=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(submission, "payload_for_post", upload_then_post)
    store = MemoryStore()
    hook = BillingHook(credits=[500])
    with pytest.raises(EvolinkTransportError):
        ledger(context(store, try_number=1), hook, min_credits=100).start(None)
    intent = record_of(store)
    assert hook.keys == [] and intent.task_id is None and intent.payload is None  # provably never POSTed

    hook.credits = [40]  # other runs of the account spent meanwhile: below min_credits=100
    with contextlib.suppress(AirflowFailException, RetryLaterError):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [], f"POSTed {hook.keys} (a key no try sent: a new task) with 40 < min_credits=100"


def test_held_f1_counterpart_an_intent_with_its_payload_is_resent_unchecked() -> None:
    """Once ``payload`` is recorded the POST may have happened: the resend is not checked (R02), as
    documented, and EvoLink answers it with the task it created."""
    store = MemoryStore()
    ctx = context(store, try_number=1)
    key = key_of(ctx, 0)
    intent = SubmissionRecord(REQUEST.fingerprint, 0, key, None, "seq-2", payload=dict(REQUEST.payload))
    store.set(STATE_KEY, intent.as_stored())
    hook = BillingHook(answers={key: {"id": TASK_ID, "status": "processing"}}, credits=[40])
    got = ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert got["id"] == TASK_ID and hook.keys == [key] and hook.credit_reads == 0


# -- F2: 3.0-3.2, a non-retryable balance-read error on a maybe-sent key ends the task instance ------------


@pytest.mark.parametrize(
    "error",
    [
        EvolinkPermissionError("GET /v1/credits: HTTP 403 (a WAF challenge)", status_code=403),
        EvolinkNotFoundError("GET /v1/credits: HTTP 404", status_code=404),
    ],
)
def test_f2_a_refused_balance_read_abandons_the_task_an_earlier_try_paid_for(error: EvolinkError) -> None:
    first = context(None, max_tries=2, try_number=1)
    k0 = key_of(first, 0)
    paid = {"id": TASK_ID, "status": "processing"}
    hook = BillingHook(answers={k0: paid}, credits=[500])
    assert ledger(first, hook, min_credits=100).start(None)["id"] == TASK_ID  # try 1 paid; then lost
    hook.credits = [error]
    with pytest.raises(Exception) as ended:
        ledger(context(None, max_tries=2, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [k0]  # nothing bought either way
    # The paid task is collected only by a retry: the try must fail retryably.
    assert not isinstance(ended.value, AirflowFailException), str(ended.value)


def test_held_f2_counterpart_a_transient_balance_read_error_is_retryable() -> None:
    first = context(None, max_tries=2, try_number=1)
    k0 = key_of(first, 0)
    hook = BillingHook(answers={k0: {"id": TASK_ID, "status": "processing"}}, credits=[500])
    ledger(first, hook, min_credits=100).start(None)
    hook.credits = [EvolinkTransportError("GET /v1/credits: reset", request_sent=True)]
    with pytest.raises(EvolinkError) as raised:
        ledger(context(None, max_tries=2, try_number=2), hook, min_credits=100).start(None)
    assert raised.value.retryable and not isinstance(raised.value, AirflowFailException)
    assert hook.keys == [k0]


# -- F3: reattach="never", the retryable refusal says the later try downloads; it buys instead ------------


def test_f3_never_a_refused_fresh_link_advises_a_retry_that_buys_a_new_take(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    refused_for(hostile, 50)  # a CDN refusing a minute-old link
    now = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(now) - 600}
    hostile.json(f"/v1/tasks/{TASK_ID}", done)
    hostile.json("/v1/videos/generations", {**task(status="pending", created=int(now)), "id": NEW_ID})
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp", 0, "evl-" + "1" * 48, TASK_ID, "try-2").as_stored())
    operator = resumed_operator(tmp_path, reattach="never")
    with pytest.raises(RetryLaterError) as failed:
        operator.execute_complete(  # type: ignore[arg-type]
            retry_of(store, 2), {**success(done, now - 60), "evolink_task_id": TASK_ID}
        )
    assert posts(hostile) == 0
    advice = str(failed.value)

    later = resumed_operator(tmp_path, reattach="never", deferrable=False, wait_for_completion=False)
    with contextlib.suppress(EvolinkError, AirflowFailException):
        later.execute(retry_of(store, 3))  # type: ignore[arg-type]
    bought = posts(hostile)
    assert bought == 1  # what reattach="never" does: the later try is a take of its own
    assert "later try downloads it again" not in advice.lower(), advice


# -- held: 3.0-3.2 reattach="never" (forced retries) buy at most one take per try -------------------------


def test_held_no_store_never_expired_on_resume_resends_its_own_key_and_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Try 2 (forced, ``try-2``) POSTed K0 in ``execute`` and deferred; its event is processed 26 h after
    the trigger read the task completed and the link is refused: R28. ``_submit`` has no record and derives
    K0 again (not a replay, since the try is forced), which EvoLink answers with the expired task: that
    answer is taken as the "new generation", read fresh in memory, and its refusal is R25. One POST of the
    try's own key, nothing bought, and no second key in the same try."""
    refused_for(hostile, 50)
    now = time.time()
    done = {**completed(f"{hostile.url}/media/v.mp4"), "created": int(now) - 30 * 3600}
    operator = resumed_operator(tmp_path, reattach="never")
    ctx = retry_context(2)
    k0 = idempotency_key(
        task_instance_identity(ctx), operator.validated_request().fingerprint, 0, try_generation(ctx, "never")
    )
    fresh = {**task(status="pending", created=int(now)), "id": NEW_ID}

    def post(handler: Any) -> None:
        key = handler.headers.get("Idempotency-Key")
        send(handler, 200, json.dumps(done if key == k0 else fresh).encode())

    hostile.routes["/v1/videos/generations"] = post
    with pytest.raises(RetryLaterError):
        operator.execute_complete(ctx, {**success(done, now - 26 * 3600), "evolink_task_id": TASK_ID})  # type: ignore[arg-type]
    assert posted_keys(hostile) == [k0]


def test_held_no_store_never_a_fresh_failure_is_not_taken_for_a_replay() -> None:
    """A forced 3.0-3.2 retry's key is its own: a failed answer is a fresh task that failed (handed on,
    not chased with key 1 inside the try); no balance check is skipped for it."""
    second = context(None, max_tries=2, try_number=2)
    k0 = key_of(second, 0, "never")
    hook = BillingHook(answers={k0: {"id": TASK_ID, "status": "failed", "error": FIXABLE}}, credits=[500])
    got = ledger(second, hook, min_credits=100, reattach="never").start(None)
    assert got["status"] == "failed" and hook.keys == [k0] and hook.credit_reads == 1

    hook = BillingHook(credits=[40])
    with pytest.raises(AirflowFailException, match="min_credits"):
        ledger(second, hook, min_credits=100, reattach="never").start(None)
    assert hook.keys == []


def test_held_no_store_never_each_retry_one_key_of_its_own() -> None:
    hook = BillingHook(credits=[500])
    keys = []
    for number in (1, 2, 3):
        ctx = context(None, max_tries=2, try_number=number)
        ledger(ctx, hook, min_credits=100, reattach="never").start(None)
        keys.append(key_of(ctx, 0, "never"))
    assert hook.keys == keys and len(set(keys)) == 3


# -- held: the retryable min_credits refusal of a maybe-sent key ------------------------------------------


class LostAnswerHook(BillingHook):
    """The first POST creates (and bills) TASK_ID, but its answer is lost."""

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        created = super().create_video_task(payload, idempotency_key)
        if len(self.keys) == 1:
            raise EvolinkSubmissionUnknownError("answer lost", idempotency_key=idempotency_key)
        return created


def test_held_no_store_a_below_limit_retry_loop_buys_nothing_then_collects_after_a_top_up() -> None:
    first = context(None, max_tries=2, try_number=1)
    k0 = key_of(first, 0)
    hook = LostAnswerHook(answers={k0: {"id": TASK_ID, "status": "processing"}}, credits=[500])
    with pytest.raises(EvolinkSubmissionUnknownError):
        ledger(first, hook, min_credits=100).start(None)
    hook.credits = [40]  # the lost task's own cost
    for number in (2, 3):
        with pytest.raises(RetryLaterError) as refused_try:
            ledger(context(None, max_tries=2, try_number=number), hook, min_credits=100).start(None)
        message = str(refused_try.value)
        assert k0 in message and "a clear pays for a new generation" in message
        assert "lower min_credits" not in message  # lowering it changes nothing of the key: not advice to pay
    assert hook.keys == [k0]
    hook.credits = [500]
    got = ledger(context(None, max_tries=2, try_number=4), hook, min_credits=100).start(None)
    assert got["id"] == TASK_ID and hook.keys == [k0, k0]


def test_held_no_store_the_refusal_of_key_one_after_a_replayed_failure_is_retryable() -> None:
    """Try 3: key 0 replays try 1's fixable failure, key 1 (try 2's, maybe billed) is refused retryably."""
    third = context(None, max_tries=2, try_number=3)
    k0, k1 = key_of(third, 0), key_of(third, 1)
    hook = BillingHook(answers={k0: {"id": "task-unified-1-failed00", "status": "failed", "error": FIXABLE}})
    hook.credits = [500, 40]
    with pytest.raises(RetryLaterError, match=k1):
        ledger(third, hook, min_credits=100).start(None)
    assert hook.keys == [k0]


# -- held: TLS errors after 918e8e7 ---------------------------------------------------------------------


def test_held_a_refused_certificate_is_not_sent_and_other_tls_errors_are() -> None:
    cert = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert refused(tls_error(cert))
    assert not refused(tls_error(ssl.SSLEOFError(8, "EOF occurred in violation of protocol")))
    assert not refused(tls_error(ssl.SSLError(1, "[SSL: TLSV1_ALERT_INTERNAL_ERROR] alert")))


def test_held_a_sent_tls_error_repeats_a_poll_but_never_an_upload() -> None:
    sent = EvolinkTransportError("TLS error", request_sent=True)
    assert RetryPolicy.may_repeat(Kind.POLL, sent) and RetryPolicy.may_repeat(Kind.DOWNLOAD, sent)
    assert not RetryPolicy.may_repeat(Kind.UPLOAD, sent)  # a file maybe stored is not uploaded twice
    assert RetryPolicy.may_repeat(Kind.SUBMISSION, sent)  # with its own Idempotency-Key
