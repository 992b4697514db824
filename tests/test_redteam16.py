"""Sixteenth red-team pass: the money path at 081b65f (after red-team 15's fixes and the async first attempt).

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests. F1 is fixed:
the balance is not checked for a key an earlier try sent (``replayed``), the same rule as for a resend.

* F1 (paid video never delivered; the advice pays again): Airflow 3.0-3.2, ``min_credits`` set. Try 1's
  task (key 0) failed with a fixable code; try 2 resent key 0, EvoLink replayed the failure, so it sent
  key 1 and EvoLink created (and billed) task B; try 2 then failed after that (a wait timeout, a worker
  lost). Try 3 walks the same chain: key 0 (resent, not checked), the replayed failure, then key 1,
  which try 2 already sent and EvoLink will only replay. ``_submit`` runs ``check_balance`` for key 1
  (``resend`` is False after a replayed failure), B's own cost took the balance below ``min_credits``, and
  the try ends with ``AirflowFailException`` ("Top up the account or lower min_credits"): every retry is
  skipped, B is never collected, and the clear the user makes after topping up is a new generation on
  3.0-3.2, a second video. The docstring of ``min_credits`` says a key an earlier try sent is not checked.

Held: the async first attempt outside tenacity (Retry-After, attempt counts, the unknown-outcome rule,
no retry of a 404, the deadline); ``wait_for_completion=False`` with a completed-but-empty task on 3.3
and without a store; a trigger's ``failed`` event carrying a completed-empty task, then read failed, on 3.3
and without a store; a 3.3 clear of a mapped task whose map index now renders another request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkNotFoundError,
    EvolinkRateLimitError,
    EvolinkServerError,
    EvolinkSubmissionUnknownError,
    EvolinkTaskError,
    RetryLaterError,
)
from evolink_provider.hooks.connection import build_request
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import aclose_async_clients, asend
from evolink_provider.ledger import Ledger
from evolink_provider.records import (
    STATE_KEY,
    SubmissionRecord,
    idempotency_key,
    task_instance_identity,
    try_generation,
)
from evolink_provider.timing import steered
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    completed,
    hostile,  # noqa: F401 - the fixture
    send,
    set_connection,
    task,
)
from tests.test_ledger import REQUEST, MemoryStore, context
from tests.test_redteam10 import posts, resume_context, resumed_operator
from tests.test_redteam12 import retry_context
from tests.test_redteam13 import NEW_ID, cleared, record_of, store_with
from tests.test_redteam14 import posted_keys

# -- F1: 3.0-3.2, min_credits refuses a key an earlier try already sent (the replay chain) ----------------


class ReplayingHook:
    """EvoLink by Idempotency-Key: ``answers`` maps a key to the task it created; an unknown key creates
    a new task. ``balance`` is what ``GET /v1/credits`` says."""

    def __init__(self, answers: dict[str, dict[str, Any]], balance: float) -> None:
        self.answers = answers
        self.balance = balance
        #: Balances read in turn before ``balance`` (one per check).
        self.balances: list[float] = []
        self.keys: list[str] = []

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        self.keys.append(idempotency_key)
        return dict(self.answers.get(idempotency_key) or {"id": NEW_ID, "status": "pending"})

    def get_credits(self) -> dict[str, Any]:
        remaining = {"remaining_credits": self.balances.pop(0) if self.balances else self.balance}
        return {"data": {"user": remaining, "token": {"unlimited_credits": True}}}

    def get_task(self, task_id: str, **_: Any) -> dict[str, Any]:
        raise AssertionError("no record: nothing is read on 3.0-3.2")


def keys_of(ctx: dict[str, Any]) -> tuple[str, str]:
    identity, generation = task_instance_identity(ctx), try_generation(ctx, "auto")
    return (
        idempotency_key(identity, REQUEST.fingerprint, 0, generation),
        idempotency_key(identity, REQUEST.fingerprint, 1, generation),
    )


def test_f1_min_credits_never_refuses_the_resend_of_a_key_an_earlier_try_sent() -> None:
    ctx = context(None, max_tries=2, try_number=3)  # the third try of its sequence (retries=2)
    k0, k1 = keys_of(ctx)
    paid = task(id=NEW_ID, status="completed", results=["https://cdn.example/b.mp4"])
    hook = ReplayingHook(
        {
            k0: task(status="failed", error={"code": "generation_failed_no_content", "message": "x"}),
            k1: paid,  # sent by try 2: EvoLink replays B, nothing new is billed
        },
        balance=40,  # B's own cost took it below min_credits
    )
    ledger = Ledger(ctx, hook, logging.getLogger("t"), lambda: REQUEST, min_credits=100)  # type: ignore[arg-type]
    # Key 0 may have been sent by an earlier try: below min_credits nothing is POSTed, but the try fails
    # retryably (red-team 17's F1), naming the retry that collects B once the balance allows.
    with pytest.raises(RetryLaterError, match="a retry resends it") as raised:
        ledger.start(None)
    assert k0 in str(raised.value) and hook.keys == []
    hook.balance = 500  # topped up: the retry collects B and buys nothing
    got = Ledger(ctx, hook, logging.getLogger("t"), lambda: REQUEST, min_credits=100).start(None)  # type: ignore[arg-type]
    assert got["id"] == NEW_ID and hook.keys == [k0, k1]


def test_held_min_credits_still_guards_a_key_no_try_has_sent() -> None:
    """The counterpart: on the second try key 1 is new (only try 1 ran), so the balance check stands (for
    good); key 0, which try 1 may have sent, is refused retryably below min_credits."""
    ctx = context(None, max_tries=2, try_number=2)
    k0, _ = keys_of(ctx)
    failed = task(status="failed", error={"code": "generation_failed_no_content", "message": "x"})
    hook = ReplayingHook({k0: failed}, balance=40)
    ledger = Ledger(ctx, hook, logging.getLogger("t"), lambda: REQUEST, min_credits=100)  # type: ignore[arg-type]
    with pytest.raises(RetryLaterError, match="min_credits"):
        ledger.start(None)
    assert hook.keys == []
    hook.balances = [500, 40]  # enough for the resend of key 0; its replayed failure spent it, say
    with pytest.raises(AirflowFailException, match="min_credits"):
        Ledger(ctx, hook, logging.getLogger("t"), lambda: REQUEST, min_credits=100).start(None)  # type: ignore[arg-type]
    assert hook.keys == [k0]


# -- held: the async first attempt runs before tenacity --------------------------------------------------


def poll(deadline: float | None = None) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        try:
            return await EvolinkHook("evolink_hostile").aget_task(TASK_ID, deadline=deadline)
        finally:
            await aclose_async_clients()

    return asyncio.run(read())


def scripted(server: HostileServer, path: str, answers: list[tuple[int, Any, dict[str, str]]]) -> None:
    """``path`` answers each of ``answers`` in turn (status, body, headers), then the last one again."""
    queue = list(answers)

    def answer(handler: Any) -> None:
        status, body, headers = queue.pop(0) if len(queue) > 1 else queue[0]
        send(handler, status, json.dumps(body).encode(), headers=headers)

    server.routes[path] = answer


def test_held_async_a_failed_first_attempt_waits_its_retry_after_then_reads(
    hostile: HostileServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=2, retry_after_max=5)
    limited = {"error": {"code": "rate_limited", "message": "slow down"}}
    scripted(
        hostile,
        f"/v1/tasks/{TASK_ID}",
        [(429, limited, {"Retry-After": "0.6"}), (200, task(), {})],
    )
    began = time.monotonic()
    assert poll()["id"] == TASK_ID
    assert time.monotonic() - began >= 0.6  # the first attempt's Retry-After was honoured
    assert len(hostile.requests) == 2


@pytest.mark.parametrize(("max_retries", "status", "error", "attempts"), [(2, 503, EvolinkServerError, 3)])
def test_held_async_attempts_are_counted_from_the_first_one(
    hostile: HostileServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    max_retries: int,
    status: int,
    error: type[EvolinkError],
    attempts: int,
) -> None:
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=max_retries)
    hostile.json(f"/v1/tasks/{TASK_ID}", {"error": {"code": "down", "message": "down"}}, status=status)
    with pytest.raises(error):
        poll()
    assert len(hostile.requests) == attempts  # max_retries + 1, the first outside tenacity included


def test_held_async_a_404_and_a_retry_after_past_the_deadline_are_one_attempt(
    hostile: HostileServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=3, retry_after_max=600)
    hostile.json(f"/v1/tasks/{TASK_ID}", {"error": {"code": "not_found", "message": "no"}}, status=404)
    with pytest.raises(EvolinkNotFoundError):
        poll()
    assert len(hostile.requests) == 1
    limited = {"error": {"code": "rate_limited", "message": "slow down"}}
    hostile.json(f"/v1/tasks/{TASK_ID}", limited, status=429, headers={"Retry-After": "120"})
    began = time.monotonic()
    with pytest.raises(EvolinkRateLimitError):
        poll(deadline=time.time() + 5)
    assert time.monotonic() - began < 2.0 and len(hostile.requests) == 2


def test_held_async_a_submission_whose_answer_is_lost_names_its_key_and_every_attempt(
    hostile: HostileServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No caller sends a POST through ``asend`` today; the rule must hold if one does."""
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=2)

    def drop(handler: Any) -> None:
        handler.close_connection = True  # the request was read, no answer: outcome unknown

    hostile.routes["/v1/videos/generations"] = drop
    key = "evl-" + "5" * 48

    async def submit() -> Any:
        try:
            settings = await EvolinkHook("evolink_hostile").aget_settings()
            request = build_request(
                settings, "POST", "/v1/videos/generations", json_body={"prompt": "p"}, idempotency_key=key
            )
            return await asend(request, settings, lambda answer, received_bytes: answer)
        finally:
            await aclose_async_clients()

    with pytest.raises(EvolinkSubmissionUnknownError) as raised:
        asyncio.run(submit())
    assert "after 3 attempt(s)" in str(raised.value) and key in str(raised.value)
    assert posted_keys(hostile) == [key] * 3  # always the same key


# -- held: wait_for_completion=False with a completed-but-empty task ---------------------------------------


def empty() -> dict[str, Any]:
    return {**completed(), "results": [], "created": int(time.time())}


def test_held_no_wait_on_3_3_hands_over_the_recorded_empty_task_and_buys_nothing(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.json(f"/v1/tasks/{TASK_ID}", empty())
    hostile.json("/v1/videos/generations", task(id=NEW_ID))
    store = store_with()
    operator = resumed_operator(tmp_path, deferrable=False, wait_for_completion=False)
    ctx = resume_context(store)
    ctx["ti"].try_number = 2
    result = operator.execute(ctx)  # type: ignore[arg-type]
    operator.post_execute(ctx, result)
    assert result["id"] == TASK_ID and posts(hostile) == 0 and record_of(store).delivered


def test_held_no_wait_without_a_store_resends_the_one_key_for_an_empty_task(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile.json("/v1/videos/generations", empty())
    for try_number in (1, 2, 3):
        operator = resumed_operator(tmp_path, deferrable=False, wait_for_completion=False)
        assert operator.execute(retry_context(try_number))["id"] == TASK_ID  # type: ignore[arg-type]
    assert len(set(posted_keys(hostile))) == 1


# -- held: a failed event carrying a completed-empty task, then read failed --------------------------------


def failed_event(seen: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "failed",
        "evolink_task_id": TASK_ID,
        "code": None,
        "message": "completed but returned no results",
        "task": seen,
    }


@pytest.mark.parametrize("durable", [True, False])
def test_held_a_completed_empty_event_then_a_failed_read_buys_nothing_in_this_try(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
    durable: bool,
) -> None:
    failed = task(status="failed", error={"code": "generation_failed_no_content", "message": "x"})
    hostile.json(f"/v1/tasks/{TASK_ID}", failed)
    hostile.json("/v1/videos/generations", task(id=NEW_ID))
    store = store_with() if durable else None
    operator = resumed_operator(tmp_path)
    with steered(reread_pause=0.01), pytest.raises(EvolinkError) as raised:
        operator.execute_complete(resume_context(store), failed_event(empty()))  # type: ignore[arg-type]
    assert posts(hostile) == 0 and raised.value.retryable
    assert not isinstance(raised.value, AirflowFailException)
    if durable:  # R29: seen completed, so billed; the record keeps the sighting for every later try
        assert isinstance(raised.value, RetryLaterError) and record_of(store).completed_seen_at  # type: ignore[arg-type]
    else:
        assert isinstance(raised.value, EvolinkTaskError)


# -- held: a mapped task whose map index renders another request after a clear (3.3) ----------------------


def test_held_a_cleared_map_index_with_another_request_picks_up_its_paid_task(
    hostile: HostileServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The upstream list came back in another order: map index 0 now renders another prompt. Its paid,
    undelivered task is picked up (R12, with the warning naming both fingerprints); nothing is bought."""
    hostile.json(f"/v1/tasks/{TASK_ID}", task(status="processing"))
    hostile.json("/v1/videos/generations", task(id=NEW_ID))
    store = MemoryStore()
    paid_for_a = SubmissionRecord("fp-of-prompt-a", 0, "evl-" + "1" * 48, TASK_ID, "seq-3")
    store.set(STATE_KEY, paid_for_a.as_stored())
    ctx = cleared(store)
    ctx["ti"].map_index = 0
    operator = resumed_operator(tmp_path, deferrable=False, timeout=0.3, poll_interval=0.1)
    with pytest.raises(EvolinkError):  # still processing when the short wait ends
        operator.execute(ctx)  # type: ignore[arg-type]
    assert posts(hostile) == 0 and record_of(store).generation == "seq-7"
