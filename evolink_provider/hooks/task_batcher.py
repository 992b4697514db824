"""Coalesce the task reads of many triggers on one event loop into ``POST /v1/tasks/batch`` calls.

EvoLink's own clients read up to 50 tasks per call through this endpoint, which is observed, not documented;
so it is used only when the connection opts in (extra ``batch_polling``), with single reads as fallback:

* for good, once the endpoint answers 404, 405, 400 or 422, or in a shape not understood (it is gone or
  changed: single reads are the documented contract);
* per task, for an id missing from a batch answer (its single read raises the documented error).

Other failures of a batch call (after the hook's retries) reach each of its reads as a failed poll, as a
failed single read would. A read waits at most :data:`BATCH_WINDOW_SECONDS` for others to join its batch (a
tenth of the default poll interval), not at all once :data:`BATCH_MAX_IDS` are waiting. The hook hands in
the two coroutines that read: this module holds no HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from evolink_provider.exceptions import EvolinkAPIError, EvolinkError

log = logging.getLogger(__name__)

#: The most ids the batch endpoint takes in one call (observed).
BATCH_MAX_IDS = 50
#: How long a read waits for others to join its batch.
BATCH_WINDOW_SECONDS = 0.5
#: Answers of the batch endpoint that mean "not here, or not in this shape": read singly from then on.
ENDPOINT_MISSING_STATUSES = frozenset({400, 404, 405, 422})

#: Both reads take the deadline (epoch seconds, ``None``: none) their retries must not wait past.
ReadBatch = Callable[[list[str], float | None], Awaitable[list[dict[str, Any]]]]
ReadOne = Callable[[str, float | None], Awaitable[dict[str, Any]]]
#: The futures waiting for one task id, and the latest deadline among them (``None``: one has none).
Waiting = dict[str, tuple[list[asyncio.Future[dict[str, Any]]], float | None]]


class UnexpectedBatchAnswer(EvolinkError):
    """The batch endpoint answered 2xx with a body this provider does not understand."""


class TaskBatcher:
    """Collects reads for up to :data:`BATCH_WINDOW_SECONDS` and sends them as one batch call.

    One instance serves all triggers of one event loop that share a base URL and API key (a batch can
    only hold tasks the key can see).
    """

    def __init__(
        self, read_batch: ReadBatch, read_one: ReadOne, window: float = BATCH_WINDOW_SECONDS
    ) -> None:
        self._read_batch = read_batch
        self._read_one = read_one
        self._window = window
        self._waiting: Waiting = {}
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batch_supported = True

    async def read(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """The task object of ``task_id``, read in the next batch (or singly once batches are off). A batch
        is bounded like a single read, by the latest ``deadline`` of the reads it serves."""
        if not self.batch_supported:
            return await self._read_one(task_id, deadline)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        futures, latest = self._waiting.get(task_id, ([], deadline))
        futures.append(future)
        self._waiting[task_id] = (futures, _later(latest, deadline))
        if len(self._waiting) >= BATCH_MAX_IDS:
            self._send_waiting()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._send_waiting)
        return await future

    def _send_waiting(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiting:
            ids = list(itertools.islice(self._waiting, BATCH_MAX_IDS))
            batch = {task_id: self._waiting.pop(task_id) for task_id in ids}
            running = asyncio.ensure_future(self._settle_batch(batch))
            self._running.add(running)
            running.add_done_callback(self._running.discard)

    async def _settle_batch(self, batch: Waiting) -> None:
        if not self.batch_supported:  # turned off while this batch waited
            await self._settle_singly(batch)
            return
        deadlines = [deadline for _, deadline in batch.values()]
        try:
            tasks = await self._read_batch(list(batch), functools.reduce(_later, deadlines))
        except Exception as error:
            if _endpoint_missing(error):
                if self.batch_supported:
                    self.batch_supported = False
                    log.warning(
                        "EvoLink's batch task read is not available (%s); reading tasks one by one now.",
                        error,
                    )
                await self._settle_singly(batch)
            else:
                for futures, _ in batch.values():
                    _settle(futures, error=error)
            return
        found = {task.get("id"): task for task in tasks if isinstance(task, dict)}
        missing = {}
        for task_id, waiting in batch.items():
            if task_id in found:
                _settle(waiting[0], result=found[task_id])
            else:
                missing[task_id] = waiting
        if missing:
            await self._settle_singly(missing)

    async def _settle_singly(self, batch: Waiting) -> None:
        reads = (self._read_one(task_id, deadline) for task_id, (_, deadline) in batch.items())
        answers = await asyncio.gather(*reads, return_exceptions=True)
        for (futures, _), answer in zip(batch.values(), answers, strict=True):
            if isinstance(answer, BaseException):
                _settle(futures, error=answer)
            else:
                _settle(futures, result=answer)


def _later(one: float | None, other: float | None) -> float | None:
    """The later of two deadlines; ``None`` (no deadline) is later than any."""
    return None if one is None or other is None else max(one, other)


def _endpoint_missing(error: BaseException) -> bool:
    if isinstance(error, UnexpectedBatchAnswer):
        return True
    # A retryable 400 (EvoLink's transient "no available channel" codes) is an outage, not a missing endpoint.
    return (
        isinstance(error, EvolinkAPIError)
        and error.status_code in ENDPOINT_MISSING_STATUSES
        and not error.retryable
    )


def _settle(
    futures: list[asyncio.Future[dict[str, Any]]],
    result: dict[str, Any] | None = None,
    error: BaseException | None = None,
) -> None:
    for future in futures:
        if future.done():  # its trigger was cancelled while the batch was in flight
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(dict(result or {}))


def tasks_in_batch_answer(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The task objects of a batch answer: ``{"data": [...]}`` as observed, ``{"data": {"tasks": [...]}}``
    or ``{"tasks": [...]}`` tolerated; anything else raises :class:`UnexpectedBatchAnswer`."""
    data = answer.get("data", answer)
    if isinstance(data, dict):
        data = data.get("tasks")
    if not isinstance(data, list) or not all(isinstance(task, dict) for task in data):
        raise UnexpectedBatchAnswer(
            f"EvoLink's batch task read answered keys {sorted(answer)} without a list of tasks"
        )
    return data
