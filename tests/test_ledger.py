"""The ledger's decision table, row by row, and its wiring with an in-memory state store.

``test_every_row_of_the_table`` reads the table from :mod:`evolink_provider.ledger`'s docstring: a row
without a case here fails, and so does a case whose action differs from the row's.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest

from evolink_provider import ledger
from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkNotFoundError, EvolinkServerError, EvolinkTransportError
from evolink_provider.ledger import (
    STATE_KEY,
    Action,
    Answer,
    Ledger,
    Recorded,
    RetryLaterError,
    Situation,
    SubmissionRecord,
    Why,
    decide,
    link_expired,
)
from evolink_provider.operators.submission import PreparedRequest

S3, NONE = True, False


def cases(
    durable: bool, recorded: list[Recorded], same: list[bool], why: list[Why], **kw: Any
) -> list[Situation]:
    return [Situation(durable, r, w, same_request=s, **kw) for r in recorded for s in same for w in why]


RECORDED_BUT_NOT_DELIVERED = [Recorded.INTENT, Recorded.TASK, Recorded.STORED]
BOTH = [True, False]


def answered(answer: Answer, why: list[Why], **kw: Any) -> list[Situation]:
    return [
        Situation(durable, Recorded.TASK, w, answer, same, **kw)
        for durable in BOTH
        for same in BOTH
        for w in why
    ]


CASES: dict[str, list[Situation]] = {
    "R01": cases(S3, [Recorded.NOTHING], BOTH, list(Why)),
    "R02": cases(S3, [Recorded.INTENT], [True], [Why.RETRY]),
    "R03": cases(S3, [Recorded.INTENT], [True], [Why.CLEAR]),
    "R04": cases(S3, [Recorded.INTENT], [False], [Why.RETRY]),
    "R05": cases(S3, [Recorded.TASK], [True], [Why.RETRY]),
    "R06": cases(S3, [Recorded.TASK], [True], [Why.CLEAR]),
    "R07": cases(S3, [Recorded.TASK], [False], [Why.RETRY]),
    "R08": cases(S3, [Recorded.STORED], [True], [Why.RETRY, Why.CLEAR]),
    "R09": cases(S3, [Recorded.STORED], [False], [Why.RETRY]),
    "R10": cases(S3, [Recorded.DELIVERED], BOTH, [Why.RETRY]),
    "R11": cases(S3, [Recorded.DELIVERED], BOTH, [Why.CLEAR]),
    "R12": cases(S3, RECORDED_BUT_NOT_DELIVERED, [False], [Why.CLEAR]),
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
    "R26": answered(Answer.LINK_EXPIRED, [Why.NEW, Why.RETRY]),
    "R27": answered(Answer.LINK_EXPIRED, [Why.NEW, Why.RETRY], regenerate_expired=True),
    "R28": answered(Answer.LINK_EXPIRED, [Why.CLEAR, Why.FORCED]),
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
    day = 24 * 3600.0
    assert not link_expired(1000.0, 0.0, 1000.0 + day)  # the record wins over an old `created`
    assert link_expired(1000.0, 0.0, 1000.0 + day + 1)
    assert not link_expired(None, 1000.0, 1000.0 + day)
    assert link_expired(None, 1000.0, 1000.0 + day + 1)
    assert not link_expired(None, None, 10 * day)  # nothing proves it


# -- the wiring, with an in-memory task_state_store and a fake context -------------------------------


class MemoryStore:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value


class FakeHook:
    """Answers reads from ``reads`` (an exception is raised) and records every POST's key."""

    def __init__(self, reads: list[Any] | None = None) -> None:
        self.reads = list(reads or [])
        self.keys: list[str] = []

    def get_task(self, task_id: str, **_: Any) -> dict[str, Any]:
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


def make(hook: FakeHook, ctx: dict[str, Any], **kw: Any) -> Ledger:
    import logging

    return Ledger(ctx, hook, logging.getLogger("test"), lambda: REQUEST, sleep=lambda _: None, **kw)  # type: ignore[arg-type]


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

    with pytest.raises(RetryLaterError, match="task-unified-1-abcdefgh"):
        make(hook, context(store)).start(None)
    assert hook.keys == [] and hook.reads == []


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


def test_a_changed_request_on_a_retry_reuses_the_paid_task(caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryStore()
    record = SubmissionRecord("fp-0", 0, "evl-" + "0" * 48, "task-unified-1-abcdefgh", "seq-2")
    store.set(STATE_KEY, record.as_stored())
    hook = FakeHook()

    task = make(hook, context(store)).start(None)

    assert task["id"] == "task-unified-1-abcdefgh" and hook.keys == []
    assert "fp-0" in caplog.text and "fp-1" in caplog.text and "clear the task instance" in caplog.text


def test_an_intent_with_a_changed_request_on_a_retry_spends_nothing() -> None:
    store = MemoryStore()
    store.set(STATE_KEY, SubmissionRecord("fp-0", 0, "evl-" + "1" * 48, None, "seq-2").as_stored())
    hook = FakeHook()

    with pytest.raises(AirflowFailException, match="clear the task instance"):
        make(hook, context(store)).start(None)
    assert hook.keys == []
