"""Seventeenth red-team pass: the money path at ff12748 (interim 1xx, clamped socket timeouts, min_credits).

Findings failed as ``xfail(strict=True)`` until fixed; the attacks that held are plain tests. Fixed: F1 (on
3.0-3.2 a key an earlier try may have sent is checked too; below ``min_credits`` the try fails retryably),
F2 (``reattach="never"`` makes a 3.0-3.2 retry *forced*: a checked submission, never a "resend"), F3
(a TLS error other than a refused certificate may come after the request was sent: an unknown outcome).

* F1 (min_credits bypassed, Airflow 3.0-3.2): try 1 reads the balance, the free ``GET /v1/credits`` fails
  (a gateway blip, retryable), nothing is POSTed. Try 2 is R15: ``_submit`` counts key 0 as "sent by an
  earlier try" (``submission < earlier_tries``) and skips ``check_balance``, so it POSTs a key no try ever
  sent (a new, billed task) with the balance below ``min_credits``. The same happens after any try that
  ended before its POST (an upload that failed, a worker lost between the check and the POST).
* F2 (min_credits bypassed, 3.0-3.2, ``reattach="never"``): every try is a generation of its own, so every
  retry's key 0 is brand new, yet the try is R15 (a "resend") and ``replayed`` is True: no balance check,
  and the log says "Resent the recorded Idempotency-Key". A retry pays with the balance below min_credits.
* F3 (an unknown outcome reported as "not sent"): a TLS error *after* the POST was sent (a bad record, an
  alert from a terminating proxy) reaches ``requests`` as ``SSLError``, which ``_send_once`` files as
  ``request_sent=False`` ("TLS handshake failed"). The submission's outcome is unknown (the server read the
  whole body and may have created and billed the task), yet the try ends with a plain transport error: no
  ``EvolinkSubmissionUnknownError``, no Idempotency-Key to look up; on 3.0-3.2 a user who then clears (a
  new generation there) pays a second time for what looked like a handshake that never happened. For an
  upload (``Kind.UPLOAD``), the same error is repeated although the file may be stored.

Held: an interim 103 on a POST (resent with the same key and body, never a new key; the key named when
it stays unknown); a POST cut by a short deadline is an unknown outcome naming its key; on 3.3 a try whose
POST got only 1xx answers fails retryably and the retry resends the recorded key and body unchecked by
min_credits; a 3.3 resend answered by a replayed failure checks the balance for the new key only, refuses
before recording it, and the clear after a top-up buys exactly one; a failed balance read on 3.3 records
no intent, so the next try checks again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkServerError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
    RetryLaterError,
)
from evolink_provider.hooks.connection import build_request
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import send
from evolink_provider.ledger import Ledger
from evolink_provider.records import idempotency_key, task_instance_identity, try_generation
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    hostile,  # noqa: F401 - the fixture
    set_connection,
    task,
)
from tests.test_ledger import REQUEST, MemoryStore, context
from tests.test_redteam13 import NEW_ID, record_of
from tests.test_review_http import raw_answer, write_raw

LOG = logging.getLogger("redteam17")
GENERATIONS = "/v1/videos/generations"
FIXABLE = {"code": "generation_failed_no_content", "message": "try again"}


class BillingHook:
    """EvoLink by Idempotency-Key (``answers``: key -> the task it created; an unknown key creates
    ``NEW_ID``), a balance read that may fail, and task reads."""

    def __init__(
        self,
        answers: dict[str, dict[str, Any]] | None = None,
        credits: list[Any] | None = None,
        reads: list[dict[str, Any]] | None = None,
    ) -> None:
        self.answers = answers or {}
        self.credits = list(credits or [])
        self.reads = list(reads or [])
        self.keys: list[str] = []
        self.credit_reads = 0

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        self.keys.append(idempotency_key)
        return dict(self.answers.get(idempotency_key) or {"id": NEW_ID, "status": "pending"})

    def get_credits(self) -> dict[str, Any]:
        self.credit_reads += 1
        answer = self.credits.pop(0) if len(self.credits) > 1 else self.credits[0]
        if isinstance(answer, Exception):
            raise answer
        return {"data": {"user": {"remaining_credits": answer}, "token": {"unlimited_credits": True}}}

    def get_task(self, task_id: str, **_: Any) -> dict[str, Any]:
        return dict(self.reads.pop(0))


def ledger(ctx: dict[str, Any], hook: Any, **kwargs: Any) -> Ledger:
    return Ledger(ctx, hook, LOG, lambda: REQUEST, sleep=lambda _: None, **kwargs)


def key_of(ctx: dict[str, Any], submission: int, reattach: str = "auto") -> str:
    generation = try_generation(ctx, reattach)
    return idempotency_key(task_instance_identity(ctx), REQUEST.fingerprint, submission, generation)


def blip() -> EvolinkError:
    return EvolinkTransportError("GET /v1/credits: connection reset", request_sent=True)


# -- F1: 3.0-3.2, a retry after a try that never POSTed skips min_credits --------------------------------


def test_f1_no_store_a_retry_after_a_failed_balance_read_posts_unchecked() -> None:
    hook = BillingHook(credits=[blip(), 40])  # the balance is below min_credits all along
    first = context(None, max_tries=2, try_number=1)
    with pytest.raises(EvolinkTransportError):  # retryable: the try fails, nothing POSTed
        ledger(first, hook, min_credits=100).start(None)
    assert hook.keys == [] and hook.credit_reads == 1

    second = context(None, max_tries=2, try_number=2)
    try:
        ledger(second, hook, min_credits=100).start(None)
    except (AirflowFailException, RetryLaterError) as error:
        assert "min_credits" in str(error)
    # Key 0 was never sent (try 1 stopped at its balance read): POSTing it is a new, billed task.
    assert hook.keys == [], f"POSTed {hook.keys} with the balance (40) below min_credits=100, unchecked"


def test_held_f1_counterpart_on_3_3_a_failed_balance_read_records_no_intent() -> None:
    """3.3: the check runs before the intent is written, so the next try is R01 and checks again."""
    store = MemoryStore()
    hook = BillingHook(credits=[blip(), 40])
    with pytest.raises(EvolinkTransportError):
        ledger(context(store, try_number=1), hook, min_credits=100).start(None)
    assert store.values == {} and hook.keys == []
    with pytest.raises(AirflowFailException, match="min_credits"):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [] and hook.credit_reads == 2


# -- F2: 3.0-3.2, reattach="never": every retry's brand-new key skips min_credits ------------------------


def test_f2_no_store_reattach_never_retry_buys_unchecked() -> None:
    hook = BillingHook(credits=[500])
    first = context(None, max_tries=2, try_number=1)
    ledger(first, hook, min_credits=100, reattach="never").start(None)
    assert hook.keys == [key_of(first, 0, "never")] and hook.credit_reads == 1

    hook.credits = [40]  # try 1's task cost took the balance below min_credits
    second = context(None, max_tries=2, try_number=2)
    new_key = key_of(second, 0, "never")
    assert new_key != hook.keys[0]  # a generation of its own: a key no try has sent
    try:
        ledger(second, hook, min_credits=100, reattach="never").start(None)
    except AirflowFailException as error:
        assert "min_credits" in str(error)
    assert hook.keys == [key_of(first, 0, "never")], "the retry bought a new take below min_credits"


# -- held: an interim 1xx on a POST is an unknown outcome, resent with the same key ----------------------


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"


def credits(balance: float) -> dict[str, Any]:
    return {"data": {"user": {"remaining_credits": balance}, "token": {"unlimited_credits": True}}}


def post_keys(server: HostileServer) -> list[str]:
    return [
        headers.get("Idempotency-Key", "")
        for (method, path), headers in zip(server.requests, server.headers, strict=True)
        if method == "POST" and path.startswith(GENERATIONS)
    ]


def post_bodies(server: HostileServer) -> list[bytes]:
    return [
        body
        for (method, path), body in zip(server.requests, server.bodies, strict=True)
        if method == "POST" and path.startswith(GENERATIONS)
    ]


def interim_then(server: HostileServer, interim_answers: int) -> None:
    """The first ``interim_answers`` POSTs get a 103 before their (created) task; then the task alone."""
    count = iter(range(10**6))

    def post(handler: Any) -> None:
        body = json.dumps(task(status="pending")).encode()
        prefix = EARLY_HINTS if next(count) < interim_answers else b""
        write_raw(handler, prefix + raw_answer(body))

    server.routes[GENERATIONS] = post


def test_held_a_post_answered_by_an_interim_103_is_resent_with_the_same_key_and_body(
    hostile: HostileServer,  # noqa: F811
) -> None:
    interim_then(hostile, 1)
    key = "evl-" + "1" * 48
    got = EvolinkHook("evolink_hostile").create_video_task({"prompt": "p"}, idempotency_key=key)
    assert got["id"] == TASK_ID
    assert post_keys(hostile) == [key, key]
    assert len(set(post_bodies(hostile))) == 1


def test_held_a_post_answered_only_by_interim_1xx_names_its_key_as_an_unknown_outcome(
    hostile: HostileServer,  # noqa: F811
) -> None:
    interim_then(hostile, 10**6)
    key = "evl-" + "2" * 48
    with pytest.raises(EvolinkSubmissionUnknownError) as raised:
        EvolinkHook("evolink_hostile").create_video_task({"prompt": "p"}, idempotency_key=key)
    assert raised.value.idempotency_key == key and key in str(raised.value)
    assert raised.value.retryable
    assert post_keys(hostile) == [key, key]  # max_retries=1: two attempts, one key


def test_held_a_post_cut_by_a_short_deadline_is_an_unknown_outcome_never_not_sent(
    hostile: HostileServer,  # noqa: F811
) -> None:
    """The clamp: a deadline shorter than the read timeout ends the wait for the answer, never as
    "not sent"; a second attempt with no time left sends nothing and still names the key."""

    def slow(handler: Any) -> None:
        time.sleep(1.0)
        write_raw(handler, raw_answer(json.dumps(task(status="pending")).encode()))

    hostile.routes[GENERATIONS] = slow
    hook = EvolinkHook("evolink_hostile")
    key = "evl-" + "3" * 48
    request = build_request(
        hook.settings, "POST", GENERATIONS, json_body={"prompt": "p"}, idempotency_key=key
    )
    started = time.monotonic()
    with pytest.raises(EvolinkSubmissionUnknownError) as raised:
        send(
            hook.session,
            request,
            hook.settings,
            lambda answer, received_bytes: answer,
            deadline=time.time() + 0.3,
        )
    assert time.monotonic() - started < 1.0  # ended at the deadline, not at the 2 s read timeout
    assert raised.value.idempotency_key == key
    assert post_keys(hostile) == [key]


def test_held_3_3_a_try_whose_post_got_only_1xx_is_resent_by_the_retry_unchecked(
    hostile: HostileServer,  # noqa: F811
) -> None:
    store = MemoryStore()
    interim_then(hostile, 10**6)
    hostile.json("/v1/credits", credits(500))
    first = context(store, try_number=1)
    with pytest.raises(EvolinkSubmissionUnknownError) as raised:
        ledger(first, EvolinkHook("evolink_hostile"), min_credits=100).start(None)
    assert not isinstance(raised.value, AirflowFailException)
    intent = record_of(store)
    assert intent.task_id is None and intent.payload == REQUEST.payload
    assert raised.value.idempotency_key == intent.idempotency_key

    # The lost task's own cost took the balance below min_credits; the retry resends, unchecked.
    hostile.json("/v1/credits", credits(40))
    interim_then(hostile, 0)
    credit_reads = sum(1 for _, path in hostile.requests if path.startswith("/v1/credits"))
    got = ledger(context(store, try_number=2), EvolinkHook("evolink_hostile"), min_credits=100).start(None)
    assert got["id"] == TASK_ID and record_of(store).task_id == TASK_ID
    assert set(post_keys(hostile)) == {intent.idempotency_key}
    assert len(set(post_bodies(hostile))) == 1
    assert sum(1 for _, path in hostile.requests if path.startswith("/v1/credits")) == credit_reads


# -- held: 3.3, min_credits around R02 and R22 ---------------------------------------------------------


def test_held_3_3_a_replayed_failure_checks_only_the_new_key_and_the_clear_buys_one() -> None:
    store = MemoryStore()
    first = context(store, try_number=1)
    k0 = key_of(first, 0)
    failed = task(status="failed", error=FIXABLE)
    hook = BillingHook(answers={k0: failed}, credits=[500])
    # Try 1: checked, intent written, the answer lost (as by a 1xx): the record is an intent.
    hook.create_video_task = _lose_answer(hook)  # type: ignore[method-assign]
    with pytest.raises(EvolinkSubmissionUnknownError):
        ledger(first, hook, min_credits=100).start(None)
    assert hook.credit_reads == 1 and record_of(store).task_id is None

    # Try 2 (R02): resends k0 unchecked; EvoLink replays the failure; the new key is checked and refused.
    hook.create_video_task = BillingHook.create_video_task.__get__(hook)  # type: ignore[method-assign]
    hook.credits = [40]
    with pytest.raises(AirflowFailException, match="min_credits"):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert hook.keys == [k0, k0] and hook.credit_reads == 2
    assert record_of(store).task_id == TASK_ID and record_of(store).idempotency_key == k0

    # After a top-up, a clear reads the failed task and buys exactly one new generation, checked.
    hook.credits, hook.reads = [500], [failed]
    cleared = context(store, max_tries=4, try_number=3)
    got = ledger(cleared, hook, min_credits=100).start(None)
    assert got["id"] == NEW_ID and hook.keys == [k0, k0, key_of(cleared, 1)]
    assert hook.credit_reads == 3


def _lose_answer(hook: BillingHook) -> Any:
    def create(payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        hook.keys.append(idempotency_key)
        raise EvolinkSubmissionUnknownError("answer lost", idempotency_key=idempotency_key)

    return create


def test_held_3_3_an_r19_resubmission_whose_balance_read_fails_is_checked_again() -> None:
    store = MemoryStore()
    first = context(store, try_number=1)
    failed = task(status="failed", error=FIXABLE)
    hook = BillingHook(answers={key_of(first, 0): failed}, credits=[500])
    got = ledger(first, hook, min_credits=100).start(None)
    assert got["status"] == "failed"  # a fresh task that failed: the operator's to handle
    hook.credits, hook.reads = [EvolinkServerError("credits down", status_code=503), 40], [failed, failed]
    with pytest.raises(EvolinkServerError):
        ledger(context(store, try_number=2), hook, min_credits=100).start(None)
    assert record_of(store).task_id == TASK_ID  # no intent for the unchecked key
    with pytest.raises(AirflowFailException, match="min_credits"):
        ledger(context(store, try_number=3, max_tries=2), hook, min_credits=100).start(None)
    assert hook.keys == [key_of(first, 0)]


# -- F3: a TLS error after the POST was sent is filed as "not sent" ----------------------------------------


class TlsServer:
    """An HTTPS server that reads each request in full, then writes a forged TLS record (a bad MAC):
    the client's TLS layer fails after the request reached the server."""

    def __init__(self, directory: Path) -> None:
        from evolink_provider.simulator.tls import server_context, write_self_signed_certificate

        self.cert, key = write_self_signed_certificate(directory)
        self.context = server_context(self.cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.posts: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                tls = self.context.wrap_socket(client, server_side=True)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += tls.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                while len(body) < length:
                    body += tls.recv(65536)
                self.posts.append(head)
                raw = socket.socket(fileno=os.dup(tls.fileno()))
                raw.sendall(b"\x17\x03\x03\x00\x20" + os.urandom(32))
                raw.close()
            except (OSError, ssl.SSLError, StopIteration):
                pass
            finally:
                client.close()


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TlsServer]:
    server = TlsServer(tmp_path / "tls")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.cert))
    set_connection(monkeypatch, "evolink_tls", f"https://127.0.0.1:{server.port}")
    yield server
    server.sock.close()


def test_f3_a_tls_error_after_the_post_was_sent_is_an_unknown_outcome_naming_the_key(
    tls_server: TlsServer,
) -> None:
    key = "evl-" + "4" * 48
    with pytest.raises(EvolinkError) as raised:
        EvolinkHook("evolink_tls").create_video_task({"prompt": "p"}, idempotency_key=key)
    assert len(tls_server.posts) == 2  # the server read both POSTs in full: a task may exist
    assert all(b"Idempotency-Key: " + key.encode() in head for head in tls_server.posts)
    found = f"{type(raised.value).__name__}: {raised.value}"
    assert isinstance(raised.value, EvolinkSubmissionUnknownError), found


def test_held_f3_the_money_path_still_resends_the_same_key_after_that_tls_error(
    tls_server: TlsServer,
) -> None:
    """On 3.3 the intent holds the key, and the try fails retryably (a later try resends it); since F3's fix
    the error says the outcome is unknown and names the key."""
    store = MemoryStore()
    with pytest.raises(EvolinkError) as raised:
        ledger(context(store, try_number=1), EvolinkHook("evolink_tls")).start(None)
    assert raised.value.retryable and not isinstance(raised.value, (AirflowFailException, RetryLaterError))
    intent = record_of(store)
    assert intent.task_id is None
    assert all(b"Idempotency-Key: " + intent.idempotency_key.encode() in head for head in tls_server.posts)
