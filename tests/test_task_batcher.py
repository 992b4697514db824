"""Batch polling (connection extra ``batch_polling``): real HTTP against the simulator's batch endpoint."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkError, EvolinkNotFoundError, EvolinkServerError
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.task_batcher import (
    BATCH_MAX_IDS,
    UnexpectedBatchAnswer,
    tasks_in_batch_answer,
)
from evolink_provider.hooks.transport import aclose_async_clients
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from tests.conftest import CONNECTION_EXTRA, SECOND_API_KEY, SIMULATOR_URL, TEST_API_KEY, SimulatorControl

BATCH_CONN = "evolink_batch"
SEEDANCE = {"model": "seedance-2.0-fast-text-to-video", "prompt": "a kite over dunes", "duration": 4}
UNKNOWN_TASK = "task-unified-1700000000-zzzzzzzz"


@pytest.fixture
def batch_conn(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    connection = {
        "conn_type": "evolink",
        "password": TEST_API_KEY,
        "host": SIMULATOR_URL,
        "extra": {**CONNECTION_EXTRA, "batch_polling": True},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{BATCH_CONN.upper()}", json.dumps(connection))
    yield BATCH_CONN


def submit(count: int, conn_id: str = EvolinkHook.default_conn_name) -> list[str]:
    hook = EvolinkHook(conn_id)
    try:
        return [hook.create_video_task(dict(SEEDANCE))["id"] for _ in range(count)]
    finally:
        hook.close()


def read_all(conn_id: str, task_ids: list[str]) -> list[Any]:
    """Read every task at once from one event loop, as a triggerer's triggers would."""

    async def main() -> list[Any]:
        try:
            reads = (EvolinkHook(conn_id).aget_task(task_id) for task_id in task_ids)
            return await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await aclose_async_clients()

    return asyncio.run(main())


def reads(sim: SimulatorControl) -> tuple[int, int]:
    requests = sim.stats()["requests"]
    return requests.get("POST /v1/tasks/batch", 0), requests.get("GET /v1/tasks", 0)


def test_concurrent_reads_are_coalesced_into_batches_of_at_most_50(
    sim: SimulatorControl, batch_conn: str
) -> None:
    task_ids = submit(120)

    answers = read_all(batch_conn, task_ids)

    assert [answer["id"] for answer in answers] == task_ids
    assert all(answer["status"] in ("pending", "processing", "completed") for answer in answers)
    assert reads(sim) == (-(-120 // BATCH_MAX_IDS), 0)  # 50 + 50 + 20, no single GET
    assert sum(sim.stats()["polls_by_task"].values()) == 120


def test_without_the_option_every_read_is_a_get(sim: SimulatorControl) -> None:
    task_ids = submit(5)

    answers = read_all(EvolinkHook.default_conn_name, task_ids)

    assert [answer["id"] for answer in answers] == task_ids
    assert reads(sim) == (0, 5)


def test_a_missing_batch_endpoint_falls_back_to_single_gets_for_good(
    sim: SimulatorControl, batch_conn: str
) -> None:
    sim.add_faults({"method": "POST", "path_prefix": "/v1/tasks/batch", "kind": "not_found"})
    task_ids = submit(3)

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        try:
            first = await asyncio.gather(*(EvolinkHook(batch_conn).aget_task(t) for t in task_ids))
            second = await asyncio.gather(*(EvolinkHook(batch_conn).aget_task(t) for t in task_ids))
            return first, second
        finally:
            await aclose_async_clients()

    first, second = asyncio.run(main())

    assert [a["id"] for a in first] == [a["id"] for a in second] == task_ids
    assert reads(sim) == (1, 6)  # one 404, then GETs only: three for the first round, three for the next


def test_an_id_missing_from_the_batch_answer_is_read_singly(sim: SimulatorControl, batch_conn: str) -> None:
    """The simulator leaves unknown ids out of a batch answer; the single GET then raises the 404."""
    (known,) = submit(1)

    answer, error = read_all(batch_conn, [known, UNKNOWN_TASK])

    assert answer["id"] == known
    assert isinstance(error, EvolinkNotFoundError)
    assert reads(sim) == (1, 1)


def test_a_failing_batch_call_is_retried_then_reaches_each_waiting_read(
    sim: SimulatorControl, batch_conn: str
) -> None:
    task_ids = submit(2)
    sim.add_faults({"method": "POST", "path_prefix": "/v1/tasks/batch", "kind": "status", "status": 503})

    errors = read_all(batch_conn, task_ids)

    assert all(isinstance(error, EvolinkServerError) for error in errors), errors
    attempts = CONNECTION_EXTRA["max_retries"] + 1
    assert reads(sim) == (attempts, 0)  # a read-only POST is retried like a GET; batching stays on


def test_a_trigger_fires_through_batch_polling(sim: SimulatorControl, batch_conn: str) -> None:
    task_ids = submit(2)

    async def main() -> list[dict[str, Any]]:
        try:
            triggers = [
                EvolinkTaskTrigger(t, evolink_conn_id=batch_conn, poll_interval=0.5) for t in task_ids
            ]
            return [dict((await anext(trigger.run())).payload) for trigger in triggers]
        finally:
            await aclose_async_clients()

    events = asyncio.run(main())

    assert [(e["status"], e["task"]["id"]) for e in events] == [("success", t) for t in task_ids]
    batches, gets = reads(sim)
    assert batches >= 2 and gets == 0


def test_batch_answers_of_other_shapes() -> None:
    task = {"id": "task-unified-1-a", "status": "completed"}
    assert tasks_in_batch_answer({"data": [task]}) == [task]
    assert tasks_in_batch_answer({"data": {"tasks": [task]}}) == [task]
    assert tasks_in_batch_answer({"tasks": [task]}) == [task]
    for odd in ({"data": {"items": [task]}}, {"data": "ok"}, {"data": [task, "x"]}):
        with pytest.raises(UnexpectedBatchAnswer):
            tasks_in_batch_answer(odd)


def test_a_batch_carries_one_api_keys_tasks_only(
    sim: SimulatorControl, batch_conn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections with two keys on one event loop: each key's reads go in its own batches. A task
    read with the other key is refused (the simulator leaves it out of a batch, and a single read of it
    answers 403), so a shared batch would fail the second key's read."""
    connection = {
        "conn_type": "evolink",
        "password": SECOND_API_KEY,
        "host": SIMULATOR_URL,
        "extra": {**CONNECTION_EXTRA, "batch_polling": True},
    }
    monkeypatch.setenv("AIRFLOW_CONN_EVOLINK_BATCH_SECOND", json.dumps(connection))
    (first,) = submit(1)
    (second,) = submit(1, "evolink_batch_second")

    async def main() -> list[Any]:
        try:
            reads = (
                EvolinkHook(batch_conn).aget_task(first),
                EvolinkHook("evolink_batch_second").aget_task(second),
            )
            return await asyncio.gather(*reads, return_exceptions=True)
        finally:
            await aclose_async_clients()

    answers = asyncio.run(main())

    assert not [answer for answer in answers if isinstance(answer, BaseException)], answers
    assert [answer["id"] for answer in answers] == [first, second]
    assert reads(sim) == (2, 0)  # one batch per key, no fallback read


def test_a_batch_read_retries_no_longer_than_the_deadline_of_its_reads(
    sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is bounded like a single read: its retries stop by its reads' deadline instead of going on
    in the background after every read waiting for it has given up."""
    extra = {**CONNECTION_EXTRA, "batch_polling": True, "max_retries": 30, "retry_after_max": 1}
    connection = {"conn_type": "evolink", "password": TEST_API_KEY, "host": SIMULATOR_URL, "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_EVOLINK_BATCH_DEADLINE", json.dumps(connection))
    (task_id,) = submit(1)
    fault = {"method": "POST", "path_prefix": "/v1/tasks/batch", "kind": "status", "status": 503}

    async def main() -> tuple[int, int]:
        hook = EvolinkHook("evolink_batch_deadline")
        try:
            await hook.aget_task(task_id)  # the loop's client and the connection reading are ready
            sim.add_faults({**fault, "retry_after": "0.2"})
            with pytest.raises(EvolinkError):
                await hook.aget_task(task_id, deadline=time.time() + 2)
            sent_by_the_deadline = reads(sim)[0]
            await asyncio.sleep(2)  # the loop lives on, as a triggerer's does
            return sent_by_the_deadline, reads(sim)[0]
        finally:
            await aclose_async_clients()

    sent_by_the_deadline, sent_later = asyncio.run(main())
    assert sent_by_the_deadline >= 3
    assert sent_later - sent_by_the_deadline <= 1  # at most one exchange already under way
