"""When a deferrable operator or sensor defers, and what its trigger is told, at the production timing.

The rest of the suite runs on a 1 s hold and window (tests/conftest.py); these tests steer back to the
production values of :mod:`evolink_provider.timing` and call ``execute`` directly, so that a deferral is
seen as Airflow's ``TaskDeferred`` (with the trigger it carries) without waiting out a 15 s hold. The
timing itself, trigger firing and resuming, runs in real DAG runs in tests/test_operators.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkWaitTimeoutError
from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator
from evolink_provider.sensors.evolink import EvolinkTaskSensor
from evolink_provider.timing import TEST_TIMING_ENV, Timing, current, from_environment, steered
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from tests.conftest import SimulatorControl

PRODUCTION = Timing()
PRODUCTION_NUMBERS = {
    "trigger_hold": PRODUCTION.trigger_hold,
    "wait_on_worker_window": PRODUCTION.wait_on_worker_window,
}


class TaskInstanceStub:
    """What the operators read of their task instance: identity, try counters, and XCom pushes."""

    dag_id = "deferral"
    task_id = "generate"
    run_id = "manual__1"
    map_index = -1
    try_number = 1
    max_tries = 0

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def context() -> dict[str, Any]:
    return {"ti": TaskInstanceStub(), "outlet_events": {}}


@pytest.fixture
def frozen() -> Iterator[float]:
    """The production timing on a clock stopped at the test's start, so that times are exact."""
    now = time.time()
    with steered(**PRODUCTION_NUMBERS, clock=lambda: now):
        yield now


def seedance(prompt: str) -> EvolinkSeedanceTextToVideoOperator:
    return EvolinkSeedanceTextToVideoOperator(
        task_id="generate", prompt=prompt, duration=4, deferrable=True, poll_interval=0.2, max_poll_interval=1
    )


def test_the_production_hold_and_window_are_15_s() -> None:
    """The measured margin of docs/reliability.md, "Fast triggers" (3x the 5 s at which the race was gone)."""
    assert (PRODUCTION.trigger_hold, PRODUCTION.wait_on_worker_window) == (15.0, 15.0)


def test_a_task_expected_beyond_the_window_defers_at_once_with_the_hold(
    sim: SimulatorControl, frozen: float
) -> None:
    operator = seedance("a long take [sim:estimate=20]")

    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context())

    trigger = deferred.value.trigger
    assert isinstance(trigger, EvolinkTaskTrigger)
    assert trigger.not_before == frozen + 15.0
    assert trigger.end_time == frozen + operator.timeout
    assert sim.stats()["requests"].get("GET /v1/tasks", 0) == 0, "no wait on the worker"
    # The backstop timeout lets the trigger's own timeout event (after the hold) come first.
    assert deferred.value.timeout is not None
    assert deferred.value.timeout.total_seconds() > operator.timeout + 15.0


def test_a_task_expected_within_the_window_is_waited_for_on_the_worker(sim: SimulatorControl) -> None:
    operator = seedance("a short take [sim:seconds=1] [sim:estimate=12]")
    began = time.monotonic()
    with steered(**PRODUCTION_NUMBERS):
        result = operator.execute(context())  # a TaskDeferred here fails the test

    assert result["status"] == "completed"
    assert time.monotonic() - began < PRODUCTION.wait_on_worker_window
    assert sim.stats()["requests"]["GET /v1/tasks"] >= 1


def test_a_task_still_running_after_the_window_defers_then(sim: SimulatorControl) -> None:
    """Expected within the (steered, 1 s) window, it runs 3 s: waited for 1 s on the worker, then deferred."""
    operator = seedance("longer than it says [sim:seconds=3] [sim:estimate=1]")
    began = time.time()

    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context())

    waited = time.time() - began
    assert 1.0 <= waited < 2.5
    trigger = deferred.value.trigger
    assert isinstance(trigger, EvolinkTaskTrigger)
    assert began + 1.0 + 1.0 <= trigger.not_before <= time.time() + 1.0


def test_the_deferrable_sensor_holds_its_trigger_too(sim: SimulatorControl, frozen: float) -> None:
    submitted = seedance("watched elsewhere [sim:estimate=30]")
    submitted.deferrable = False
    submitted.wait_for_completion = False
    task_id = submitted.execute(context())["id"]
    sensor = EvolinkTaskSensor(task_id="wait", evolink_task_id=task_id, deferrable=True, timeout=60)

    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(context())

    trigger = deferred.value.trigger
    assert isinstance(trigger, EvolinkTaskTrigger)
    assert trigger.not_before == frozen + 15.0
    assert trigger.end_time == frozen + 60


TIMEOUT_EVENT = {
    "status": "timeout",
    "evolink_task_id": "task-unified-1700000000-abcdefgh",
    "message": "late",
}


def test_a_trigger_timeout_reaches_the_operator_as_a_retryable_error() -> None:
    with pytest.raises(EvolinkWaitTimeoutError) as raised:
        seedance("any").execute_complete(context(), TIMEOUT_EVENT)
    assert raised.value.retryable is True
    assert not isinstance(raised.value, AirflowFailException)


def test_a_trigger_timeout_reaches_the_sensor_as_a_retryable_error() -> None:
    sensor = EvolinkTaskSensor(
        task_id="wait", evolink_task_id=TIMEOUT_EVENT["evolink_task_id"], deferrable=True
    )
    with pytest.raises(EvolinkWaitTimeoutError) as raised:
        sensor.execute_complete(context(), TIMEOUT_EVENT)
    assert raised.value.retryable is True


def test_a_test_cluster_sets_the_timing_through_its_environment_only_with_known_fields() -> None:
    assert from_environment(None) == Timing()
    assert from_environment('{"trigger_hold": 2}') == Timing(trigger_hold=2.0)
    with pytest.raises(ValueError, match=TEST_TIMING_ENV):
        from_environment('{"trigger_hold": 2, "hold": 3}')


def test_steered_timing_is_read_at_call_time_and_restored() -> None:
    before = current()
    with steered(trigger_hold=7.0) as inside:
        assert current() is inside and inside.trigger_hold == 7.0
    assert current() is before


@pytest.mark.parametrize(
    "end_time",
    [10**400, float("nan"), float("inf"), "1900000000", True, None],
    ids=["10**400", "nan", "inf", "text", "bool", "none"],
)
def test_an_event_end_time_that_is_no_finite_number_gives_no_deadline(end_time: Any) -> None:
    """An event's ``end_time`` is read back from a stored row: a value that is no finite number counts as
    none, so the operator's own ``timeout`` bounds what follows (an integer too big for a float crashed
    ``execute_complete`` with ``OverflowError``; a NaN deadline never passes)."""
    from evolink_provider.operators.base import event_deadline

    assert event_deadline({"status": "error", "end_time": end_time}) is None
    assert event_deadline({"status": "error", "end_time": 1_900_000_000}) == 1_900_000_000.0
