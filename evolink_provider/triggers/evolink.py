"""EvolinkTaskTrigger: waits for an EvoLink task in the triggerer, without holding a worker slot.

The trigger only waits: submission happens on the worker (a POST made here would be sent again after a
triggerer restart). Its kwargs are JSON-safe and hold no secret; the API key is read from the connection
at run time. The deadline is absolute wall-clock time, so a triggerer restart does not extend the wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from evolink_provider.answers import MAX_EPOCH_SECONDS, epoch_time, finite_number
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkTaskError,
    EvolinkTriggerArgumentError,
    EvolinkWaitTimeoutError,
)
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.retry import Verdict
from evolink_provider.polling import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_POLL_INTERVAL,
    POLL_TICK,
    Outcome,
    PollFailureBudget,
    ProgressReporter,
    decide_after_poll,
    followed_poll_settings,
    poll_turn,
    task_failure,
)
from evolink_provider.timing import current as timing

#: Consecutive failed polls (each already retried inside the hook) that end a wait.
DEFAULT_MAX_POLL_FAILURES = 8


class EvolinkTaskTrigger(BaseTrigger):
    """Polls ``GET /v1/tasks/{id}`` on the adaptive schedule of :mod:`evolink_provider.polling`.

    Fires exactly one event, a dict with ``status`` in ``success | failed | timeout | error`` and
    ``evolink_task_id``; ``success`` carries the final ``task`` object (checked against the documented
    shape by the hook) and the ``end_time`` that also bounds storing its results, ``failed`` the task's
    ``code`` and ``message``, ``error`` the poll error's ``message`` and whether it is ``retryable``.
    ``success`` also says when the poll read the task completed (``completed_seen_at``): it completed
    before that, so its result links' 24 h run out by then + 24 h (``ledger.link_expired``).

    :param evolink_task_id: the EvoLink task to wait for.
    :param evolink_conn_id: Airflow connection holding the API key.
    :param poll_interval: the shortest delay between polls (seconds), brought within the operators' bounds
        (:func:`~evolink_provider.polling.followed_poll_settings`), as ``max_poll_interval``.
    :param max_poll_interval: the longest delay between polls (seconds).
    :param end_time: wall-clock deadline (epoch seconds); ``None`` waits for ever.
    :param started_at: when the task was submitted (epoch seconds); drives the adaptive schedule.
    :param max_poll_failures: consecutive failed polls that end the wait with an ``error`` event.
    :param first_poll_at: wall-clock time (epoch seconds) of the first poll. The operator sets it from the
        task it just submitted, so the trigger does not re-read a task it already knows, and many tasks
        deferred together do not all poll in the same instant (it takes its turn as every poll does:
        :func:`~evolink_provider.polling.poll_turn`). ``None`` polls at once (a sensor, a restart).
    :param not_before: wall-clock time (epoch seconds) before which no event fires, whatever the polls
        say. Airflow 3.2-3.3's scheduler can fail a task instance whose trigger fires seconds after its
        deferral (apache/airflow#66374); the operator sets this to the deferral time plus a safe delay.
    """

    def __init__(
        self,
        evolink_task_id: str,
        evolink_conn_id: str = EvolinkHook.default_conn_name,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        max_poll_interval: float | None = DEFAULT_MAX_POLL_INTERVAL,
        end_time: float | None = None,
        started_at: float | None = None,
        max_poll_failures: int = DEFAULT_MAX_POLL_FAILURES,
        first_poll_at: float | None = None,
        not_before: float | None = None,
    ) -> None:
        super().__init__()
        # The kwargs come back from the database (written by this or an earlier version) or from a DAG
        # author: numbers are checked, and the pauses brought within the bounds the operators check.
        owner = type(self).__name__
        self.evolink_task_id = evolink_task_id
        self.evolink_conn_id = evolink_conn_id
        self.poll_interval, self.max_poll_interval = followed_poll_settings(
            _number_kwarg(owner, "poll_interval", poll_interval),
            DEFAULT_MAX_POLL_INTERVAL
            if max_poll_interval is None
            else _number_kwarg(owner, "max_poll_interval", max_poll_interval),
        )
        self.end_time = _time_kwarg(owner, "end_time", end_time)
        self.not_before = _time_kwarg(owner, "not_before", not_before)
        # Guides of the schedule only: one that is no time (an earlier version stored EvoLink's ``created``
        # unchecked) is dropped, as if not given, rather than failing a paid task's wait.
        started = epoch_time(started_at)
        self.started_at = time.time() if started is None else started
        self.first_poll_at = epoch_time(first_poll_at)
        if (
            not isinstance(max_poll_failures, int)
            or isinstance(max_poll_failures, bool)
            or max_poll_failures < 1
        ):
            raise EvolinkTriggerArgumentError(
                owner, "max_poll_failures", max_poll_failures, "a whole number from 1"
            )
        self.max_poll_failures = max_poll_failures

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "evolink_task_id": self.evolink_task_id,
                "evolink_conn_id": self.evolink_conn_id,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "end_time": self.end_time,
                "started_at": self.started_at,
                "max_poll_failures": self.max_poll_failures,
                "first_poll_at": self.first_poll_at,
                "not_before": self.not_before,
            },
        )

    def _event(self, status: str, **payload: Any) -> TriggerEvent:
        return TriggerEvent({"status": status, "evolink_task_id": self.evolink_task_id, **payload})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        event = await self._wait()
        if self.not_before is not None:
            await asyncio.sleep(max(0.0, self.not_before - timing().now()))
        yield event

    async def _wait(self) -> TriggerEvent:
        """Poll until the one event to fire. A coroutine, not a generator: a generator left at its event
        is closed by asyncio's finalizer hook, a write to the loop's self-pipe per trigger."""
        hook = EvolinkHook(self.evolink_conn_id)
        reporter = ProgressReporter(self.evolink_task_id, self.started_at)
        failures = PollFailureBudget(self.max_poll_failures, self.poll_interval, self.max_poll_interval)
        delay = 0.0 if self.first_poll_at is None else self.first_poll_at - timing().now()
        while True:
            # The sleep is written out here, not in a helper: what a sleeping trigger holds outlives young
            # collections and brings on full ones, so it holds no coroutine or generator of its own.
            end = reporter.clock() + max(0.0, delay)
            while (pause := reporter.next_pause(end)) > 0:
                if reporter.clock() + pause >= end:  # no progress line falls due before the poll
                    # The last poll before the deadline is not early: it would read the task still running.
                    near_deadline = self.end_time is not None and end > self.end_time - POLL_TICK
                    await poll_turn(end, early=not near_deadline)
                    break
                await asyncio.sleep(pause)
                if line := reporter.between_polls():
                    self.log.info(line)
            try:
                task = await hook.aget_task(self.evolink_task_id, deadline=self.end_time)
            except EvolinkError as error:
                retry = failures.after_failure(error, deadline=self.end_time)
                if retry.verdict is Verdict.GIVE_UP:
                    # end_time: the operator's re-read of the task keeps the deadline (no fresh budget).
                    return self._event(
                        "error", message=str(error), retryable=error.retryable, end_time=self.end_time
                    )
                if retry.verdict is Verdict.OUT_OF_TIME:
                    return self._event("timeout", message=f"wait budget spent while polls failed: {error}")
                self.log.warning(
                    "Polling EvoLink task %s failed (%d in a row): %s; next poll in %.1fs",
                    self.evolink_task_id,
                    failures.consecutive,
                    error,
                    retry.delay,
                )
                await asyncio.sleep(retry.delay)
                delay = 0.0
                continue
            failures.success()
            read_at = timing().now()
            if line := reporter.update(task):
                self.log.info(line)
            decision = decide_after_poll(
                task,
                now=read_at,
                started_at=self.started_at,
                deadline=self.end_time,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
            )
            if decision.outcome is Outcome.WAIT:
                if decision.message:
                    self.log.warning(decision.message)
                delay = decision.delay
                del task, decision  # not held through the sleep (see above)
                continue
            if decision.outcome is Outcome.SUCCESS:
                return self._event("success", task=task, end_time=self.end_time, completed_seen_at=read_at)
            if decision.outcome is Outcome.TIMEOUT:
                return self._event("timeout", message=decision.message)
            code, message = task_failure(task)
            return self._event("failed", code=code, message=decision.message, api_message=message, task=task)

    async def on_kill(self) -> None:
        """A user cleared or marked the deferred task: say that the generation goes on (no cancel call) and
        what a retry and a clear do next."""
        self.log.warning(
            "EvoLink has no cancel call: task %s keeps generating (and is billed when it completes). "
            "A retry of this Airflow task, or a clear while its result is undelivered, picks it up "
            "(the ledger's table).",
            self.evolink_task_id,
        )


def _number_kwarg(owner: str, field: str, value: Any) -> float:
    """A pause: any :func:`~evolink_provider.answers.finite_number` (the bounds are
    :func:`~evolink_provider.polling.followed_poll_settings`'), else refused."""
    number = finite_number(value)
    if number is None:
        raise EvolinkTriggerArgumentError(owner, field, value, "a number of seconds")
    return number


def _time_kwarg(owner: str, field: str, value: Any) -> float | None:
    """A wall-clock time that decides (the deadline, the earliest event): None, or an
    :func:`~evolink_provider.answers.epoch_time`; anything else would wait for ever or not at all."""
    if value is None:
        return None
    if (seconds := epoch_time(value)) is None:
        allowed = f"epoch seconds from 0 to below {MAX_EPOCH_SECONDS:,}, or None"
        raise EvolinkTriggerArgumentError(owner, field, value, allowed)
    return seconds


def task_from_event(event: Any) -> dict[str, Any]:
    """The task object of a ``success`` event; any other event raised as the error it reports.

    Operators and the sensor call this in ``execute_complete`` so both read the trigger's events one way.
    """
    if not isinstance(event, dict) or "status" not in event:
        raise EvolinkError(f"EvoLink trigger returned no usable event: {event!r}")
    status = event["status"]
    task_id = str(event.get("evolink_task_id", "?"))
    task = event.get("task")
    if status == "success" and isinstance(task, dict):
        return task
    if status == "failed":
        remote_status = str(task.get("status", "failed")) if isinstance(task, dict) else "failed"
        raise EvolinkTaskError(
            task_id, remote_status, event.get("code"), event.get("api_message") or event.get("message")
        )
    if status == "timeout":
        raise EvolinkWaitTimeoutError(str(event.get("message") or f"timed out waiting for {task_id}"))
    error = EvolinkError(f"Waiting for EvoLink task {task_id} failed: {event.get('message') or event!r}")
    error.retryable = status == "error" and bool(event.get("retryable"))
    raise error
