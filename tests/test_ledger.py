"""The ledger's decision table, row by row, and its wiring with an in-memory state store.

``test_every_row_of_the_table`` reads the table from :mod:`evolink_provider.ledger`'s docstring: a row
without a case here fails, and so does a case whose action differs from the row's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from evolink_provider import ledger
from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import (
    EvolinkConflictError,
    EvolinkNotFoundError,
    EvolinkServerError,
    EvolinkTransportError,
    RetryLaterError,
)
from evolink_provider.ledger import (
    Action,
    Answer,
    Ledger,
    Recorded,
    Situation,
    Why,
    decide,
    link_expired,
    sighting_time,
)
from evolink_provider.records import STATE_KEY, SubmissionRecord
from evolink_provider.submission import PreparedRequest

S3, NONE = True, False


def cases(
    durable: bool, recorded: list[Recorded], same: list[bool], why: list[Why], **kw: Any
) -> list[Situation]:
    return [Situation(durable, r, w, same_request=s, **kw) for r in recorded for s in same for w in why]


RECORDED_BUT_NOT_DELIVERED = [Recorded.INTENT, Recorded.TASK, Recorded.STORED]
BOTH = [True, False]


def answered(answer: Answer, why: list[Why], stores: list[bool] = BOTH, **kw: Any) -> list[Situation]:
    return [
        Situation(durable, Recorded.TASK, w, answer, same, **kw)
        for durable in stores
        for same in BOTH
        for w in why
    ]


CASES: dict[str, list[Situation]] = {
    "R01": cases(S3, [Recorded.NOTHING], BOTH, list(Why)),
    "R02": cases(S3, [Recorded.INTENT], [True], [Why.RETRY]),
    "R03": cases(S3, [Recorded.INTENT], [True], [Why.CLEAR]),
    "R04": cases(S3, [Recorded.INTENT], [False], [Why.RETRY, Why.CLEAR]),
    "R05": cases(S3, [Recorded.TASK], [True], [Why.RETRY]),
    "R06": cases(S3, [Recorded.TASK], [True], [Why.CLEAR]),
    "R07": cases(S3, [Recorded.TASK], [False], [Why.RETRY]),
    "R08": cases(S3, [Recorded.STORED], [True], [Why.RETRY, Why.CLEAR]),
    "R09": cases(S3, [Recorded.STORED], [False], [Why.RETRY, Why.CLEAR]),
    "R10": cases(S3, [Recorded.DELIVERED], BOTH, [Why.RETRY]),
    "R11": cases(S3, [Recorded.DELIVERED], BOTH, [Why.CLEAR]),
    "R12": cases(S3, [Recorded.TASK], [False], [Why.CLEAR]),
    "R13": cases(S3, [*RECORDED_BUT_NOT_DELIVERED, Recorded.DELIVERED], BOTH, [Why.FORCED]),
    "R14": cases(NONE, [Recorded.NOTHING], BOTH, [Why.NEW, Why.CLEAR]),
    "R15": cases(NONE, [Recorded.NOTHING], [True], [Why.RETRY]),
    "R16": cases(NONE, [Recorded.NOTHING], [False], [Why.RETRY]),
    "R17": answered(Answer.RUNNING, list(Why)),
    "R18": answered(Answer.COMPLETED, list(Why)),
    "R19": answered(Answer.FAILED_FIXABLE, list(Why)),
    "R20": answered(Answer.CANCELLED, list(Why)),
    "R21": answered(Answer.FAILED_UNFIXABLE, list(Why), regenerate_expired=True),
    "R22": answered(Answer.REPLAYED_FIXABLE, list(Why)),
    "R23": answered(Answer.READ_NOT_FOUND, list(Why), regenerate_expired=True),
    "R24": answered(Answer.READ_ERROR, list(Why), regenerate_expired=True),
    "R25": answered(Answer.LINK_REFUSED, list(Why), regenerate_expired=True),
    "R26": answered(Answer.LINK_EXPIRED, [Why.NEW, Why.RETRY])
    + answered(Answer.LINK_EXPIRED, [Why.NEW, Why.RETRY], [False], regenerate_expired=True),
    "R27": answered(Answer.LINK_EXPIRED, [Why.NEW, Why.RETRY], [True], regenerate_expired=True),
    "R28": answered(Answer.LINK_EXPIRED, [Why.CLEAR, Why.FORCED]),
    "R29": answered(Answer.CONTRADICTED, list(Why), regenerate_expired=True),
}


def table_rows() -> dict[str, str]:
    """``{row: action}`` as the module docstring states them."""
    rows = re.findall(r"^\| (R\d\d) \|.*\| ([a-z ]+) \|$", ledger.__doc__ or "", re.MULTILINE)
    assert rows, "the ledger's docstring lost its table"
    return dict(rows)


def test_every_row_of_the_table_has_a_case() -> None:
    assert sorted(table_rows()) == sorted(CASES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_every_row_of_the_table(row: str) -> None:
    expected = Action(table_rows()[row])
    for situation in CASES[row]:
        assert decide(situation) is expected, situation


def test_expiry_needs_24_hours_from_the_first_completed_sighting() -> None:
    proof = 24 * 3600.0 + 3600.0  # the links' 24 h and an hour for machines' clocks
    assert not link_expired(1000.0, 1000.0 + proof)
    assert link_expired(1000.0, 1000.0 + proof + 1)
    assert not link_expired(None, 100 * proof)  # nothing proves it, whatever the task's age


def test_a_trigger_s_sighting_counts_only_between_created_and_now() -> None:
    """A sighting earlier than the task's ``created`` is impossible (a forged or skewed event): it would
    make links look older, so the time of this read stands in; junk does too."""
    assert sighting_time(1500.0, 1000.0, 2000.0) == 1500.0
    assert sighting_time(1000, 1000.0, 2000.0) == 1000.0
    assert sighting_time(2000.0, 1000.0, 2000.0) == 2000.0
    for junk in (999.0, 2001.0, None, "1500", True, float("nan"), float("-inf")):
        assert sighting_time(junk, 1000.0, 2000.0) == 2000.0, junk
    assert sighting_time(1500.0, None, 2000.0) == 2000.0  # no `created` to bound it by


# -- the wiring, with an in-memory task_state_store and a fake context -------------------------------


class MemoryStore:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value


class FakeHook:
    """Answers reads from ``reads`` (an exception is raised) and records every read's id and POST's key."""

    def __init__(self, reads: list[Any] | None = None) -> None:
        self.reads = list(reads or [])
        self.read_ids: list[str] = []
        self.keys: list[str] = []

    def get_task(self, task_id: str, **_: Any) -> dict[str, Any]:
        self.read_ids.append(task_id)
        answer = self.reads.pop(0) if self.reads else {"id": task_id, "status": "processing"}
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        self.keys.append(idempotency_key)
        return {"id": f"task-unified-1-new{len(self.keys):05d}", "status": "pending"}


REQUEST = PreparedRequest("seedance-2.0-text-to-video", {}, {"prompt": "p"}, [], {}, "fp-1")


def context(store: MemoryStore | None, max_tries: int = 2, try_number: int = 1) -> dict[str, Any]:
    ti = SimpleNamespace(
        dag_id="d",
        task_id="t",
        run_id="r",
        map_index=-1,
        try_number=try_number,
        max_tries=max_tries,
        task=SimpleNamespace(retries=2),
    )
    found: dict[str, Any] = {"ti": ti, "dag_run": SimpleNamespace(conf={})}
    if store is not None:
        found["task_state_store"] = store
    return found


def make(
    hook: FakeHook,
    ctx: dict[str, Any],
    request: PreparedRequest = REQUEST,
    sleep: Callable[[float], None] = lambda _: None,
    **kw: Any,
) -> Ledger:
    import logging

    return Ledger(ctx, hook, logging.getLogger("test"), lambda: request, sleep=sleep, **kw)  # type: ignore[arg-type]


def recorded(store: MemoryStore, **kw: Any) -> None:
    record = SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, "task-unified-1-abcdefgh", "seq-2", **kw)
    store.set(STATE_KEY, record.as_stored())


@pytest.mark.parametrize(
    "error",
    [
        EvolinkNotFoundError("gone?", status_code=404),
        EvolinkServerError("busy", status_code=503),
        EvolinkTransportError("timed out", request_sent=True),
    ],
    ids=["404", "503", "timeout"],
)
def test_no_error_on_the_reattach_read_counts_as_gone(error: Exception) -> None:
    """M05: any read error treated as "gone" would submit here; the ledger re-reads, then fails retryably."""
    store = MemoryStore()
    recorded(store)
    hook = FakeHook([error] * 3)

    with pytest.raises(RetryLaterError, match="task-unified-1-abcdefgh") as raised:
        make(hook, context(store)).start(None)
    assert hook.keys == [] and hook.reads == []
    assert raised.value.__cause__ is error  # the last read's error, with its status, is kept


def test_a_read_error_then_an_answer_reattaches() -> None:
    store = MemoryStore()
    recorded(store)
    hook = FakeHook([EvolinkNotFoundError("lag", status_code=404)])

    task = make(hook, context(store)).start(None)

    assert task["id"] == "task-unified-1-abcdefgh" and hook.keys == []


def test_a_clear_without_a_task_state_store_sends_a_new_key() -> None:
    """M30: on Airflow 3.0-3.2 a clear (max_tries raised) must not resend the old generation's key."""
    hook = FakeHook()
    make(hook, context(None, max_tries=2)).start(None)
    make(hook, context(None, max_tries=2, try_number=2)).start(None)  # a retry: the same key, replayed
    make(hook, context(None, max_tries=5, try_number=3)).start(None)  # cleared

    assert hook.keys[0] == hook.keys[1]
    assert hook.keys[2] != hook.keys[0]


def test_a_clear_of_an_undelivered_task_picks_it_up_and_a_delivered_one_regenerates() -> None:
    store = MemoryStore()
    recorded(store)
    hook = FakeHook()

    picked = make(hook, context(store, max_tries=5)).start(None)
    assert picked["id"] == "task-unified-1-abcdefgh" and hook.keys == []

    done = make(hook, context(store, max_tries=5))
    done.delivered()
    make(hook, context(store, max_tries=8)).start(None)
    assert len(hook.keys) == 1


@pytest.mark.parametrize("conf", [{"evolink_regenerate": True}, {"evolink_regenerate": ["t"]}])
def test_a_forced_fresh_take_on_a_clear(conf: dict[str, Any]) -> None:
    store = MemoryStore()
    recorded(store)
    hook = FakeHook()
    ctx = context(store, max_tries=5)
    ctx["dag_run"].conf = conf

    make(hook, ctx).start(None)

    assert len(hook.keys) == 1


@pytest.mark.parametrize("max_tries", [2, 5], ids=["retry", "clear"])
def test_a_changed_request_reuses_the_undelivered_paid_task(
    caplog: pytest.LogCaptureFixture, max_tries: int
) -> None:
    store = MemoryStore()
    record = SubmissionRecord("fp-0", 0, "evl-" + "0" * 48, "task-unified-1-abcdefgh", "seq-2")
    store.set(STATE_KEY, record.as_stored())
    hook = FakeHook()

    task = make(hook, context(store, max_tries=max_tries)).start(None)

    assert task["id"] == "task-unified-1-abcdefgh" and hook.keys == []
    assert "fp-0" in caplog.text and "fp-1" in caplog.text and "evolink_regenerate" in caplog.text


def test_an_intent_with_a_changed_request_on_a_retry_spends_nothing() -> None:
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-0", 0, "evl-" + "1" * 48, None, "seq-2").as_stored())
    hook = FakeHook()

    with pytest.raises(AirflowFailException, match="evolink_regenerate"):
        make(hook, context(store)).start(None)
    assert hook.keys == []


# -- the record, the keys and the store decisions -------------------------------------------------


def test_a_record_survives_the_state_store_and_refuses_garbage() -> None:
    from evolink_provider.records import UploadRecord
    from evolink_provider.storage import StoredFile

    record = SubmissionRecord(
        "fp",
        2,
        "evl-" + "2" * 48,
        "task-unified-1-abcdefgh",
        "seq-3",
        (UploadRecord("/a.png", "sha", "https://files/a", 1e10),),
        completed_seen_at=12.5,
        results=2,
        stored=(StoredFile(0, "task-unified-1-abcdefgh-0.mp4", 10, "ab"),),
        delivered=True,
    )
    assert SubmissionRecord.from_stored(record.as_stored()) == record
    bare = SubmissionRecord("fp", 0, "k")
    assert bare.as_stored() == {"fingerprint": "fp", "submission": 0, "idempotency_key": "k"}
    assert SubmissionRecord.from_stored(bare.as_stored()) == bare
    garbages: list[Any] = [None, [], {"fingerprint": "fp"}, {**bare.as_stored(), "submission": "x"}]
    for garbage in garbages:
        assert SubmissionRecord.from_stored(garbage) is None
    partly = SubmissionRecord.from_stored({**record.as_stored(), "uploads": [{"source": 1}], "stored": "x"})
    assert partly is not None and partly.uploads == () and partly.stored == ()
    assert SubmissionRecord.from_stored({**bare.as_stored(), "delivered": "yes"}).delivered is False  # type: ignore[union-attr]


def test_uploads_are_reused_with_the_same_bytes_and_enough_life_left() -> None:
    from evolink_provider.records import UPLOAD_REUSE_MARGIN, UploadRecord, expiry_epoch

    upload = UploadRecord("/a.png", "sha", "https://files/a", 1000.0 + UPLOAD_REUSE_MARGIN)
    assert upload.reusable("sha", now=999.0)
    assert not upload.reusable("sha", now=1000.0)
    assert not upload.reusable("other", now=0.0)
    assert expiry_epoch(5, 0.0) == 5.0
    assert expiry_epoch("1970-01-01T00:01:40Z", 0.0) == 100.0
    assert expiry_epoch("1970-01-01T00:01:40", 0.0) == 100.0
    assert (
        expiry_epoch("soon", 10.0) == expiry_epoch(None, 10.0) == expiry_epoch(True, 10.0) == 10.0 + 72 * 3600
    )


def test_identity_keys_and_try_sequences() -> None:
    from evolink_provider.records import (
        idempotency_key,
        request_fingerprint,
        task_instance_identity,
        tries_in_sequence,
        try_generation,
    )

    assert request_fingerprint({"a": 1, "b": 2}, {}) == request_fingerprint({"b": 2, "a": 1}, {})
    assert request_fingerprint({"a": 1}, {"/x": "s"}) != request_fingerprint({"a": 1}, {})
    key = idempotency_key("i", "f", 0, "g")
    assert re.fullmatch(r"evl-[0-9a-f]{48}", key)
    assert (
        len(
            {
                key,
                idempotency_key("i", "f", 1, "g"),
                idempotency_key("i", "f", 0, "h"),
                idempotency_key("i", "f", 0),
            }
        )
        == 4
    )
    ctx = context(None, max_tries=7, try_number=6)
    assert task_instance_identity(ctx) == "d|t|r|-1"
    assert try_generation(ctx, "auto") == "seq-7" and try_generation(ctx, "never") == "try-6"
    ctx["ti"].max_tries = None
    assert try_generation(ctx, "auto") == "seq-unknown"
    assert tries_in_sequence(context(None, max_tries=7, try_number=6)) == 1  # cleared at try 5: 6 is its 1st
    assert tries_in_sequence(context(None, max_tries=2, try_number=3)) == 3
    no_task = context(None, try_number=4)
    no_task["ti"].task = None
    assert tries_in_sequence(no_task) == 4
    no_task["ti"].try_number = 0  # not started yet: still "at least 1"
    assert tries_in_sequence(no_task) == 1
    no_task["ti"].try_number = "?"
    assert tries_in_sequence(no_task) == 1


@pytest.mark.parametrize(
    ("argument", "conf", "forced"),
    [
        (False, {}, False),
        (True, {}, True),
        ("True", {}, True),
        (" true ", {}, True),
        ("False", {}, False),
        (False, {"evolink_regenerate": True}, True),
        (False, {"evolink_regenerate": ["t"]}, True),
        (False, {"evolink_regenerate": ["other"]}, False),
        (False, {"evolink_regenerate": False}, False),
        (False, {"evolink_regenerate": None}, False),
        (False, None, False),
    ],
)
def test_what_forces_a_fresh_take(argument: Any, conf: Any, forced: bool) -> None:
    from evolink_provider.ledger import regenerate_requested

    ctx = context(None)
    ctx["dag_run"].conf = conf
    assert regenerate_requested(ctx, argument) is forced


@pytest.mark.parametrize(
    ("argument", "conf", "named"),
    [
        (False, {"evolink_regenerate": "true"}, "evolink_regenerate='true'"),
        (False, {"evolink_regenerate": "t"}, "evolink_regenerate='t'"),
        (False, {"evolink_regenerate": 1}, "evolink_regenerate=1"),
        (False, {"evolink_regenerate": ["t", 2]}, "evolink_regenerate=['t', 2]"),
        (False, {"evolink_regenerate": {"t": True}}, "evolink_regenerate={'t': True}"),
        ("yes", {}, "regenerate='yes'"),
        (1, {}, "regenerate=1"),
    ],
)
def test_a_regenerate_value_that_is_not_a_clear_yes_or_no_is_refused(
    argument: Any, conf: Any, named: str
) -> None:
    """A value that silently did not force the take would collect the old video on a clear instead of
    the fresh one asked for (or, the other way, read as yes, pay again): refused, naming the key and
    the allowed values, before any call."""
    hook = FakeHook()
    ctx = context(MemoryStore())
    ctx["dag_run"].conf = conf

    allowed = r"allowed: (true, false, or a list|True or False)"
    with pytest.raises(AirflowFailException, match=allowed) as error:
        make(hook, ctx, regenerate=argument)
    assert named in str(error.value)
    assert hook.keys == [] and hook.reads == []


def test_a_bad_reattach_value_is_refused() -> None:
    with pytest.raises(AirflowFailException, match="reattach='sometimes'"):
        make(FakeHook(), context(MemoryStore()), reattach="sometimes")


def test_reattach_never_makes_every_try_a_forced_take() -> None:
    store = MemoryStore()
    recorded(store)
    hook = FakeHook()

    make(hook, context(store, try_number=2), reattach="never").start(None)

    assert len(hook.keys) == 1


class ReplayingHook(FakeHook):
    """The first POST answers with an earlier, failed task (a replay); later ones create a task."""

    def __init__(self, code: str) -> None:
        super().__init__()
        self.code = code

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        task = super().create_video_task(payload, idempotency_key)
        if len(self.keys) == 1:
            return {**task, "status": "failed", "error": {"code": self.code, "message": "m"}}
        return task


def test_a_replayed_fixable_failure_is_resubmitted_once_with_a_fresh_key() -> None:
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-1", 0, "evl-" + "3" * 48, None, "seq-2").as_stored())
    hook = ReplayingHook("service_error")

    task = make(hook, context(store, try_number=2)).start(None)

    assert hook.keys[0] == "evl-" + "3" * 48 and len(hook.keys) == 2 and hook.keys[1] != hook.keys[0]
    assert task["status"] == "pending"
    saved = SubmissionRecord.from_stored(store.get(STATE_KEY))
    assert saved is not None and (saved.submission, saved.task_id) == (1, task["id"])


def test_a_replayed_unfixable_failure_ends_the_task() -> None:
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-1", 0, "evl-" + "3" * 48, None, "seq-2").as_stored())
    hook = ReplayingHook("content_policy_violation")

    with pytest.raises(AirflowFailException, match="content_policy_violation"):
        make(hook, context(store, try_number=2)).start(None)
    assert len(hook.keys) == 1


@pytest.mark.parametrize("try_number", [1, 3])
def test_a_fresh_failed_answer_is_handed_on_not_resubmitted(try_number: int) -> None:
    hook = ReplayingHook("service_error")

    task = make(hook, context(MemoryStore(), try_number=try_number)).start(None)

    assert task["status"] == "failed" and len(hook.keys) == 1


@pytest.mark.parametrize(
    ("read", "posts"),
    [
        ({"status": "failed", "error": {"code": "service_error"}}, 1),
        ({"status": "cancelled"}, 1),
        ({"status": "completed", "results": ["https://cdn/x.mp4"]}, 0),
    ],
)
def test_the_recorded_tasks_answer_decides(read: dict[str, Any], posts: int) -> None:
    store = MemoryStore()
    recorded(store)
    hook = FakeHook([{"id": "task-unified-1-abcdefgh", **read}])

    make(hook, context(store, try_number=2)).start(None)

    assert len(hook.keys) == posts


@pytest.mark.parametrize(
    "read",
    [
        {"status": "failed", "error": {"code": "service_error"}},
        {"status": "failed", "error": {"code": "resource_not_found"}},
        {"status": "cancelled"},
    ],
    ids=["failed-fixable", "failed-resource-not-found", "cancelled"],
)
def test_a_task_seen_completed_then_read_failed_spends_nothing(read: dict[str, Any]) -> None:
    store = MemoryStore()
    recorded(store, completed_seen_at=1000.0)
    hook = FakeHook([{"id": "task-unified-1-abcdefgh", **read}])

    with pytest.raises(RetryLaterError, match="task-unified-1-abcdefgh was seen completed"):
        make(hook, context(store, try_number=2)).start(None)
    assert hook.keys == []


def test_an_unfixable_recorded_failure_ends_the_task() -> None:
    store = MemoryStore()
    recorded(store)
    hook = FakeHook(
        [{"id": "task-unified-1-abcdefgh", "status": "failed", "error": {"code": "invalid_parameters"}}]
    )

    with pytest.raises(AirflowFailException, match="invalid_parameters"):
        make(hook, context(store, try_number=2)).start(None)
    assert hook.keys == []


COMPLETED = {
    "id": "task-unified-1-abcdefgh",
    "status": "completed",
    "created": 1000,
    "results": ["https://cdn/x"],
}


def refused_store(monkeypatch: pytest.MonkeyPatch) -> None:
    import evolink_provider.storage as storage

    def refuse(*_: Any, **__: Any) -> list[str]:
        raise EvolinkNotFoundError("refused", status_code=403)

    monkeypatch.setattr(storage, "store_results", refuse)


@pytest.mark.parametrize(
    ("max_tries", "regenerate_expired", "later", "outcome"),
    [
        (2, False, 60.0, RetryLaterError),  # within a day of the first completed sighting
        (2, False, 24 * 3600 + 3000.0, RetryLaterError),  # past the day, within the clocks' hour
        (2, False, 25 * 3600 + 60.0, AirflowFailException),  # expired, an automatic retry
        (2, True, 25 * 3600 + 60.0, ledger.NewGeneration),  # expired, opted in
        (5, False, 25 * 3600 + 60.0, ledger.NewGeneration),  # expired, a clear
    ],
)
def test_a_refused_result_link(
    monkeypatch: pytest.MonkeyPatch, max_tries: int, regenerate_expired: bool, later: float, outcome: type
) -> None:
    from evolink_provider.timing import steered

    refused_store(monkeypatch)
    store = MemoryStore()
    seen = 1000.0 + 24 * 3600  # a day after `created`: only the sighting can say "not yet expired"
    recorded(store, completed_seen_at=seen)
    hook = FakeHook()

    with steered(clock=lambda: seen + later), pytest.raises(outcome):
        make(hook, context(store, max_tries=max_tries), regenerate_expired=regenerate_expired).store(
            dict(COMPLETED), "/tmp/x", None
        )
    assert len(hook.keys) == (1 if outcome is ledger.NewGeneration else 0)


def test_without_a_record_only_a_sighting_of_the_task_completed_proves_expiry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Airflow 3.0-3.2 (no store): `created` two days old proves nothing, the trigger's sighting does."""
    from evolink_provider.timing import steered

    refused_store(monkeypatch)
    day = 24 * 3600.0
    now = 1000.0 + 2 * day
    with steered(clock=lambda: now), pytest.raises(RetryLaterError):
        make(FakeHook(), context(None)).store(dict(COMPLETED), "/tmp/x", None)
    proof = day + 3600.0
    for sighting, outcome in ((now - proof - 1, AirflowFailException), (now - proof + 1, RetryLaterError)):
        ledger_ = make(FakeHook(), context(None))
        ledger_.saw_completed(dict(COMPLETED), at=sighting)
        with steered(clock=lambda: now), pytest.raises(outcome):
            ledger_.store(dict(COMPLETED), "/tmp/x", None)


def test_the_earliest_sighting_is_recorded() -> None:
    """A trigger's poll saw it completed before the operator's read: that earlier time is kept."""
    from evolink_provider.timing import steered

    store = MemoryStore()
    recorded(store)

    def sighting(at: float | None, now: float) -> float | None:
        with steered(clock=lambda: now):
            make(FakeHook(), context(store)).saw_completed(dict(COMPLETED), at=at)
        record = SubmissionRecord.from_stored(store.get(STATE_KEY))
        return record.completed_seen_at if record else None

    assert sighting(4000.0, now=5000.0) == 4000.0
    assert sighting(4500.0, now=6000.0) == 4000.0
    assert sighting(None, now=6000.0) == 4000.0
    assert sighting(3000.0, now=6000.0) == 3000.0


def stored_as_recorded(path: Path, index: int, data: bytes) -> Any:
    """``data`` written to ``path`` and its record as the storage makes one (size, sha256, stamp)."""
    import hashlib

    from evolink_provider.storage import StoredFile, file_stamp

    path.write_bytes(data)
    return StoredFile(index, path.name, len(data), hashlib.sha256(data).hexdigest(), file_stamp(path))


def test_stored_files_completed_sighting_and_delivery_are_recorded(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evolink_provider.storage as storage
    from evolink_provider.timing import steered

    def store_two(
        hook: Any, task: Any, output_path: str, deadline: Any, known: Any, on_stored: Any
    ) -> list[str]:
        for index in (0, 1):
            on_stored(
                stored_as_recorded(tmp_path / f"{task['id']}-{index}.mp4", index, b"x" * (index + 3)), 2
            )
        return [str(tmp_path / f"{task['id']}-{i}.mp4") for i in (0, 1)]

    monkeypatch.setattr(storage, "store_results", store_two)
    store = MemoryStore()
    recorded(store)
    first = make(FakeHook(), context(store))
    with steered(clock=lambda: 777.0):  # first read completed before its results were filled in
        first.saw_completed({k: v for k, v in COMPLETED.items() if k != "results"})
    with steered(clock=lambda: 888.0):
        first.store(dict(COMPLETED), str(tmp_path), None)
        first.saw_completed(dict(COMPLETED))  # the first sighting stays
    saved = SubmissionRecord.from_stored(store.get(STATE_KEY))
    assert saved is not None and (saved.completed_seen_at, saved.results, len(saved.stored)) == (777.0, 2, 2)

    again = make(FakeHook(), context(store, try_number=2))
    task = again.start(str(tmp_path))
    assert task["from_storage"] is True and len(task["files"]) == 2
    # Downstream gets the task as first seen completed (its links), not a thinner value.
    assert {k: v for k, v in task.items() if k not in ("files", "from_storage")} == COMPLETED
    again.delivered()
    assert store.get(STATE_KEY)["delivered"] is True

    (tmp_path / saved.stored[1].name).write_bytes(b"changed size")
    hook = FakeHook()
    retry = make(hook, context(store, try_number=3))
    assert retry.start(str(tmp_path))["id"] == "task-unified-1-abcdefgh"  # delivered + retry: read again


def test_a_failed_post_is_raised_as_the_hook_raised_it() -> None:
    class Refusing(FakeHook):
        def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
            super().create_video_task(payload, idempotency_key)
            raise EvolinkServerError("busy", status_code=503)

    store = MemoryStore()
    with pytest.raises(EvolinkServerError):
        make(Refusing(), context(store)).start(None)
    saved = SubmissionRecord.from_stored(store.get(STATE_KEY))
    assert saved is not None and saved.task_id is None  # the intent stays: a retry resends its key


def test_a_resubmission_never_reuses_an_earlier_counters_key() -> None:
    from evolink_provider.records import idempotency_key

    store = MemoryStore()
    record = SubmissionRecord("fp-1", 1, "evl-" + "4" * 48, "task-unified-1-abcdefgh", "seq-2")
    store.set(STATE_KEY, record.as_stored())
    hook = FakeHook(
        [{"id": "task-unified-1-abcdefgh", "status": "failed", "error": {"code": "service_error"}}]
    )

    make(hook, context(store, try_number=2)).start(None)

    earlier = {idempotency_key("d|t|r|-1", "fp-1", n, "seq-2") for n in (0, 1)}
    assert hook.keys == [idempotency_key("d|t|r|-1", "fp-1", 2, "seq-2")] and not earlier & set(hook.keys)


def test_a_resent_key_is_not_logged_as_a_new_submission(caplog: pytest.LogCaptureFixture) -> None:
    """An intent without a task id is resent with the same key: what EvoLink answers is the task the lost
    answer named (if any), not a new paid submission, and the log says so."""
    store = MemoryStore()
    intent = SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, None, "seq-2")
    store.set(STATE_KEY, intent.as_stored())
    hook = FakeHook()

    with caplog.at_level("INFO", logger="test"):
        make(hook, context(store, try_number=2)).start(None)
    assert len(hook.keys) == 1
    assert "Resent the recorded Idempotency-Key" in caplog.text and "Submitted EvoLink" not in caplog.text

    caplog.clear()
    with caplog.at_level("INFO", logger="test"):
        make(FakeHook(), context(MemoryStore())).start(None)
    assert "Submitted EvoLink task" in caplog.text


def test_a_trigger_event_for_another_task_is_refused() -> None:
    """execute_complete checks the event against the record before storing anything."""
    store = MemoryStore()
    recorded(store)
    ledger = make(FakeHook(), context(store))
    ledger.check_resumed({"id": "task-unified-1-abcdefgh", "status": "completed"})
    with pytest.raises(RetryLaterError, match="recorded task-unified-1-abcdefgh"):
        ledger.check_resumed({"id": "task-unified-9-otherone", "status": "completed"})
    make(FakeHook(), context(MemoryStore())).check_resumed({"id": "any", "status": "completed"})


# -- what each POST carries and what it is preceded by --------------------------------------------


class RecordingHook(ReplayingHook):
    """A replay of a fixable failure on the first POST; records, at each POST, the payload and the record
    the state store held (the intent must be there before the POST leaves)."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__("service_error")
        self.store = store
        self.at_post: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        self.at_post.append((payload, dict(self.store.get(STATE_KEY))))
        return super().create_video_task(payload, idempotency_key)


def test_every_post_carries_the_request_and_follows_its_recorded_intent() -> None:
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-1", 0, "evl-" + "3" * 48, None, "seq-2").as_stored())
    hook = RecordingHook(store)

    make(hook, context(store, try_number=2)).start(None)

    assert len(hook.at_post) == 2  # the resent key (a replayed failure), then a fresh key
    for (payload, intent), key in zip(hook.at_post, hook.keys, strict=True):
        assert payload == REQUEST.payload
        assert (intent["idempotency_key"], intent.get("task_id")) == (key, None)
        assert intent.get("payload") == payload  # the body goes on record with its key (a resend sends it)


class CreditsHook(FakeHook):
    def __init__(self, spendable: float) -> None:
        super().__init__()
        self.spendable = spendable

    def get_credits(self) -> dict[str, Any]:
        return {"data": {"user": {"remaining_credits": self.spendable}, "token": {"unlimited_credits": True}}}


@pytest.mark.parametrize(("spendable", "posts"), [(9.0, 0), (10.0, 1)])
def test_min_credits_is_checked_before_the_post(spendable: float, posts: int) -> None:
    hook = CreditsHook(spendable)
    ledger_ = make(hook, context(MemoryStore()), min_credits=10.0)

    if posts:
        ledger_.start(None)
    else:
        with pytest.raises(AirflowFailException, match="min_credits"):
            ledger_.start(None)
    assert len(hook.keys) == posts


@pytest.mark.parametrize(("try_number", "posts"), [(1, 1), (3, 2)], ids=["first-try", "third-try"])
def test_without_a_store_a_failed_answer_is_a_replay_only_after_earlier_tries(
    try_number: int, posts: int
) -> None:
    """Airflow 3.0-3.2: a failed answer at try 1 is a fresh task (handed on); at try 3 the key of an
    earlier try was replayed, so a fresh key follows once."""
    hook = ReplayingHook("service_error")

    task = make(hook, context(None, try_number=try_number)).start(None)

    assert len(hook.keys) == posts and task["status"] == ("failed" if posts == 1 else "pending")


@pytest.mark.parametrize(
    ("reads", "named"),
    [
        ([], "task-unified-1-abcdefgh"),  # reattached to the recorded task
        (
            [{"id": "task-unified-1-abcdefgh", "status": "cancelled"}],
            "task-unified-1-new00001",
        ),  # resubmitted
    ],
    ids=["reattached", "resubmitted"],
)
def test_the_task_waited_for_is_named(reads: list[Any], named: str) -> None:
    """``current_task_id`` is what ``on_kill`` names: the task this try waits for."""
    store = MemoryStore()
    recorded(store)

    started = make(FakeHook(reads), context(store, try_number=2))
    started.start(None)

    assert started.current_task_id == named


def test_a_naive_upload_expiry_is_utc_whatever_the_machines_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from evolink_provider.records import expiry_epoch

    monkeypatch.setenv("TZ", "JST-9")  # a POSIX zone: no tz database needed
    time.tzset()
    try:
        assert expiry_epoch("1970-01-02T00:00:00", 0.0) == 24 * 3600.0
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        (({"a": 1, "b": 2}, {}), ({"b": 2, "a": 1}, {}), True),  # key order
        (({"a": 1}, {"/x": "s"}), ({"a": 1}, {"/x": "t"}), False),  # other local bytes
        (({"a": 1}, {"/x": "s"}), ({"a": 1}, {}), False),
        (  # an upload step's URL counts as its bytes: a re-run uploads the same bytes under another URL
            ({"image_urls": ["https://f/1"]}, {}, {"https://f/1": "s"}),
            ({"image_urls": ["https://f/2"]}, {}, {"https://f/2": "s"}),
            True,
        ),
        (
            ({"image_urls": ["https://f/1"]}, {}, {"https://f/1": "s"}),
            ({"image_urls": ["https://f/2"]}, {}, {"https://f/2": "t"}),
            False,
        ),
        (
            ({"image_urls": ["https://f/1"]}, {}, {"https://f/9": "s"}),
            ({"image_urls": ["https://f/2"]}, {}),
            False,
        ),
    ],
    ids=[
        "key-order",
        "local-bytes",
        "local-vs-none",
        "uploaded-same-bytes",
        "uploaded-other-bytes",
        "plain-urls",
    ],
)
def test_what_the_request_fingerprint_tells_apart(
    first: tuple[Any, ...], second: tuple[Any, ...], same: bool
) -> None:
    from evolink_provider.records import request_fingerprint

    assert (request_fingerprint(*first) == request_fingerprint(*second)) is same


def test_fingerprints_and_keys_are_the_same_in_every_release() -> None:
    """They are stored (the record's fingerprint) and sent (the key EvoLink replays): a release that derived
    them otherwise would read its own record as another request, and resend no earlier key. Non-ASCII text
    included (values from the release that moved them to ``records``, unchanged since the ledger had them)."""
    from evolink_provider.records import idempotency_key, payload_fingerprint, request_fingerprint

    payload = {"model": "seedance-2.0-fast-text-to-video", "prompt": "un café à l'aube", "duration": 5}
    assert payload_fingerprint(payload) == "08f2e28bf7059196c9a3b6cff2d1202a"
    assert request_fingerprint(payload, {"/dags/a.png": "ab" * 32}) == "3a2ba8403d75f2333210bd8b42d4483d"
    key = idempotency_key("dag|task|run|-1", payload_fingerprint(payload), 0, "seq-3")
    assert key == "evl-7d061f7780a3d88bacda451793235b1ef713418295047d50"


def test_a_context_that_is_no_mapping_has_no_state_store() -> None:
    from evolink_provider.records import SubmissionRecord, SubmissionStore

    store = SubmissionStore(object())
    assert not store.durable
    assert store.load() is None
    store.save(SubmissionRecord("f", 0, "evl-" + "0" * 48))  # nothing to write to, and no error


def test_a_stored_set_recorded_before_its_task_object_was_kept(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file stored, but the record predates ``completed_task``: a minimal completed task is handed
    on, and the recorded task is the one this try is about."""

    store = MemoryStore()
    recorded(
        store, results=1, stored=(stored_as_recorded(tmp_path / "task-unified-1-abcdefgh-0.mp4", 0, b"xyz"),)
    )
    hook = FakeHook()

    started = make(hook, context(store, try_number=2))
    task = started.start(str(tmp_path))

    assert task["from_storage"] is True and hook.keys == [] and hook.reads == []
    assert {k: task[k] for k in ("id", "status", "results")} == {
        "id": "task-unified-1-abcdefgh",
        "status": "completed",
        "results": [],
    }
    assert started.current_task_id == "task-unified-1-abcdefgh"


@pytest.mark.parametrize("durable", [True, False], ids=["3.3", "3.0-3.2"])
def test_a_missing_task_state_store_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, durable: bool
) -> None:
    from evolink_provider import compat

    monkeypatch.setattr(compat, "_said", set())  # once per process: start from a fresh process's state
    with caplog.at_level("WARNING", logger="test"):
        make(FakeHook(), context(MemoryStore() if durable else None)).start(None)

    assert ("has no task_state_store" in caplog.text) is not durable


@pytest.mark.parametrize(
    ("delivered", "max_tries", "said", "expected"),
    [
        (False, 2, "differs from the one recorded", False),  # the same request: no fingerprint warning
        (True, 5, "A clear (its result was delivered", True),  # a clear pays again, and says so
        (True, 2, "A clear", False),  # a retry after delivery reads the task again
    ],
    ids=["same-request", "clear-of-delivered", "retry-of-delivered"],
)
def test_what_a_try_with_a_record_says(
    caplog: pytest.LogCaptureFixture, delivered: bool, max_tries: int, said: str, expected: bool
) -> None:
    store = MemoryStore()
    recorded(store, delivered=delivered)

    with caplog.at_level("INFO", logger="test"):
        make(FakeHook(), context(store, max_tries=max_tries)).start(None)

    assert (said in caplog.text) is expected


# -- the wait's failed poll and empty completed read (R23, R24), a resent key's refusals --------------


def test_a_failed_poll_during_the_wait_reads_the_recorded_task_again() -> None:
    """R23/R24 while waiting: the recorded task is read again, whatever id the poll named."""
    store = MemoryStore()
    recorded(store)
    hook = FakeHook()

    task = make(hook, context(store)).reread(
        "task-unified-1-polled", EvolinkNotFoundError("lag", status_code=404)
    )

    assert hook.read_ids == ["task-unified-1-abcdefgh"] and task["id"] == "task-unified-1-abcdefgh"
    assert hook.keys == []


@pytest.mark.parametrize(
    "record",
    [None, SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, None, "seq-2")],
    ids=["no-record", "intent-without-task"],
)
def test_a_failed_poll_without_a_recorded_task_reads_the_polled_one(record: SubmissionRecord | None) -> None:
    store = MemoryStore()
    if record is not None:
        store.set(STATE_KEY, record.as_stored())
    hook = FakeHook()

    task = make(hook, context(store)).reread(
        "task-unified-1-polled", EvolinkNotFoundError("lag", status_code=404)
    )

    assert hook.read_ids == ["task-unified-1-polled"] and task["id"] == "task-unified-1-polled"


def test_a_poll_that_still_fails_after_the_rereads_fails_the_try_retryably() -> None:
    store = MemoryStore()
    recorded(store)
    error = EvolinkNotFoundError("gone?", status_code=404)
    hook = FakeHook([error] * 3)

    with pytest.raises(RetryLaterError, match="task-unified-1-abcdefgh"):
        make(hook, context(store)).reread("task-unified-1-abcdefgh", error)
    assert hook.keys == [] and hook.reads == []


EMPTY = {"id": "task-unified-1-abcdefgh", "status": "completed", "results": []}
FILLED = {**EMPTY, "results": ["https://cdn/x.mp4"]}
FAILED = {**EMPTY, "status": "failed", "error": {"code": "service_error"}}


@pytest.mark.parametrize(
    ("first", "reads", "expected", "pauses"),
    [
        (FILLED, [], FILLED, 0),  # its result is there: no read
        (EMPTY, [FILLED], FILLED, 1),  # the list filled in a moment after the status
        (EMPTY, [FAILED], FAILED, 1),  # read as something else: the operator judges that answer
        (EMPTY, [EMPTY, EMPTY], EMPTY, 2),  # still empty after every pause: the operator gives it up
    ],
    ids=["filled", "filled-later", "read-failed", "still-empty"],
)
def test_a_completed_task_without_results_is_read_again(
    first: dict[str, Any], reads: list[Any], expected: dict[str, Any], pauses: int
) -> None:
    from evolink_provider.ledger import reread_pauses

    slept: list[float] = []
    hook = FakeHook(reads)

    task = make(hook, context(MemoryStore()), sleep=slept.append).reread_empty(dict(first))

    assert task == expected and hook.reads == []
    assert slept == list(reread_pauses()[:pauses]) and len(hook.read_ids) == pauses


def test_min_credits_is_not_checked_again_for_a_resent_key() -> None:
    """The key's spend was checked by the try that sent it first: its own task's cost may have taken the
    balance below the reserve, and EvoLink answers the resent key with that task."""
    store = MemoryStore()
    # The intent as the ledger writes it right before its POST: the key with the body sent.
    intent = SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, None, "seq-2", payload=dict(REQUEST.payload))
    store.set(STATE_KEY, intent.as_stored())
    hook = CreditsHook(9.0)

    make(hook, context(store, try_number=2), min_credits=10.0).start(None)

    assert hook.keys == ["evl-" + "0" * 48]


def test_min_credits_refuses_an_intent_that_never_left_retryably() -> None:
    """An intent without its body never reached the POST (an upload failed, the worker died): its key is
    checked, and below the reserve the try fails retryably (red-team 18's F1)."""
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, None, "seq-2").as_stored())
    hook = CreditsHook(9.0)

    with pytest.raises(RetryLaterError, match="min_credits"):
        make(hook, context(store, try_number=2), min_credits=10.0).start(None)
    assert hook.keys == []


def test_min_credits_is_checked_for_the_fresh_key_after_a_replayed_failure() -> None:
    class LowBalance(ReplayingHook):
        def get_credits(self) -> dict[str, Any]:
            return {"data": {"user": {"remaining_credits": 9.0}, "token": {"unlimited_credits": True}}}

    store = MemoryStore()
    intent = SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, None, "seq-2", payload=dict(REQUEST.payload))
    store.set(STATE_KEY, intent.as_stored())
    hook = LowBalance("service_error")

    with pytest.raises(AirflowFailException, match="min_credits"):
        make(hook, context(store, try_number=2), min_credits=10.0).start(None)
    assert hook.keys == ["evl-" + "0" * 48]  # the resent key only: the fresh one would spend


class ConflictHook(FakeHook):
    """Every POST is refused with ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        super().create_video_task(payload, idempotency_key)
        raise self.error


CONFLICT = EvolinkConflictError("key reused", status_code=409, code="idempotency_conflict")
BUSY = EvolinkServerError("busy", status_code=503)


@pytest.mark.parametrize(
    ("durable", "try_number", "local", "error", "named"),
    [
        (False, 2, True, CONFLICT, True),  # 3.0-3.2: the derived key, resent with new upload URLs
        (True, 2, True, CONFLICT, True),  # 3.3: the recorded intent's key, resent
        (False, 1, True, CONFLICT, False),  # a first try's key: not a resend
        (False, 2, False, CONFLICT, False),  # no local images: the body cannot have changed that way
        (False, 2, True, BUSY, False),  # another error: raised as the hook raised it
    ],
    ids=["3.0-3.2-retry", "3.3-resent-intent", "first-try", "no-local-images", "not-a-conflict"],
)
def test_a_resent_key_refused_for_new_upload_urls_names_the_key_and_the_remedy(
    monkeypatch: pytest.MonkeyPatch,
    durable: bool,
    try_number: int,
    local: bool,
    error: Exception,
    named: bool,
) -> None:
    """R15 with inline local images: a retry uploads them again and EvoLink refuses the resent key
    (``idempotency_conflict``); the try fails naming the key and the upload step, buying nothing."""
    from evolink_provider import submission
    from evolink_provider.field_rules import MediaRef

    monkeypatch.setattr(submission, "payload_for_post", lambda hook, request, uploads, log: request.payload)
    request = REQUEST._replace(local_media=[MediaRef("image_urls", 0, "/in/a.png")] if local else [])
    store = MemoryStore() if durable else None
    if store is not None:
        store.set(STATE_KEY, SubmissionRecord("fp-1", 0, "evl-" + "5" * 48, None, "seq-2").as_stored())
    hook = ConflictHook(error)

    with pytest.raises((AirflowFailException, EvolinkServerError)) as raised:
        make(hook, context(store, try_number=try_number), request=request).start(None)

    assert len(hook.keys) == 1
    said = str(raised.value)
    assert ("EvolinkUploadImagesOperator" in said and hook.keys[0] in said) is named
    assert (raised.value is error) is (error is BUSY)


def test_a_fresh_keys_failed_answer_after_a_resubmission_is_not_a_replay() -> None:
    """A resubmission (the recorded task was cancelled) POSTs a key never sent: a failed answer is a
    fresh task that failed, handed on, not a replay to follow with yet another key."""
    store = MemoryStore()
    recorded(store)
    hook = ReplayingHook("service_error")
    hook.reads = [{"id": "task-unified-1-abcdefgh", "status": "cancelled"}]

    task = make(hook, context(store, try_number=2)).start(None)

    assert task["status"] == "failed" and len(hook.keys) == 1


def test_a_failed_trigger_event_for_another_task_spends_nothing_and_ends_nothing() -> None:
    """A ``failed`` event (stale or forged row) naming a task other than the recorded one, with a code no
    resubmission fixes, ended the task instance for good (``AirflowFailException``: no automatic retry)
    while the recorded paid task was never read. Like a ``success`` event for another task, it is refused
    retryably; the event for the recorded task still decides as before."""
    from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

    operator = EvolinkSeedanceTextToVideoOperator(task_id="t", prompt="p", deferrable=True)
    failed = {"code": "content_policy_violation", "message": "refused"}
    cases = (("task-unified-9-otherone", RetryLaterError), ("task-unified-1-abcdefgh", AirflowFailException))
    for task_id, raised in cases:
        store = MemoryStore()
        recorded(store)
        task = {"id": task_id, "status": "failed", "error": failed}
        event = {"status": "failed", "evolink_task_id": task_id, "code": failed["code"], "task": task}
        with pytest.raises(raised, match=task_id):
            operator.execute_complete(context(store), event)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argument", "conf"), [(False, {"evolink_regenerate": True}), ("true", {})], ids=["conf", "text-argument"]
)
def test_a_task_seen_completed_that_stays_failed_is_left_only_by_a_forced_clear(
    argument: Any, conf: dict[str, Any]
) -> None:
    """Row R29 holds on every retry and every plain clear for as long as EvoLink reads the task failed,
    so its message must name the way out; a clear forcing a fresh take (``dag_run.conf``, or the
    rendered text ``"true"`` of the templated argument) still buys exactly one new generation."""
    failed = {"id": "task-unified-1-abcdefgh", "status": "failed", "error": {"code": "service_error"}}
    store = MemoryStore()
    recorded(store, completed_seen_at=1000.0)
    hook = FakeHook([failed] * 6)
    for max_tries in (2, 5):  # an automatic retry, then a plain clear
        with pytest.raises(RetryLaterError, match=r"clear the task instance with dag_run\.conf"):
            make(hook, context(store, max_tries=max_tries, try_number=2)).start(None)
    assert hook.keys == []

    ctx = context(store, max_tries=8, try_number=6)
    ctx["dag_run"].conf = conf
    make(hook, ctx, regenerate=argument).start(None)
    assert len(hook.keys) == 1


def test_a_set_stays_in_the_folder_its_first_file_went_to(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A templated output_path may render another folder on each try: the set is completed, and handed
    over, where its first file was stored (rows R08/R09), with one warning naming both folders."""
    import evolink_provider.storage as storage

    folders: list[str] = []

    def store_next(
        hook: Any, task: Any, output_path: str, deadline: Any, known: Any, on_stored: Any
    ) -> list[str]:
        folders.append(output_path)
        index = len(known)
        on_stored(
            stored_as_recorded(Path(output_path) / f"{task['id']}-{index}.mp4", index, b"x" * (index + 3)), 2
        )
        if index == 0:
            raise EvolinkServerError("the second download failed", status_code=500)
        return [str(Path(output_path) / f"{task['id']}-{i}.mp4") for i in (0, 1)]

    monkeypatch.setattr(storage, "store_results", store_next)
    first_folder, second_folder = tmp_path / "first", tmp_path / "second"
    first_folder.mkdir()
    store = MemoryStore()
    recorded(store)
    with pytest.raises(EvolinkServerError):
        make(FakeHook(), context(store)).store(dict(COMPLETED), str(first_folder), None)
    assert store.get(STATE_KEY)["stored_in"] == str(first_folder)

    retry = make(FakeHook([dict(COMPLETED)]), context(store, try_number=2))
    with caplog.at_level("WARNING", logger="test"):
        task = retry.start(str(second_folder))
        files = retry.store(task, str(second_folder), None)
    assert folders == [str(first_folder), str(first_folder)]
    assert files == [str(first_folder / f"{COMPLETED['id']}-{i}.mp4") for i in (0, 1)]
    told = [r.getMessage() for r in caplog.records if str(second_folder) in r.getMessage()]
    assert len(told) == 1 and str(first_folder) in told[0]

    hook = FakeHook()
    third = make(hook, context(store, try_number=3)).start(str(tmp_path / "third"))
    assert third["from_storage"] is True and third["files"] == files and hook.read_ids == []
