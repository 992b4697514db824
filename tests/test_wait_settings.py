"""The wait settings (poll intervals, timeout, the trigger's times) are checked where they are given: at a DAG
file's parse for the operators and the sensor, so a bad one fails before any credit is spent, naming the
field and what it allows; at construction for the trigger, whose kwargs come back from the database (written
by this or an earlier version), so it takes what an earlier version stored and refuses only what is no
number, as the ``TypeError`` Airflow's triggerer expects."""

from __future__ import annotations

import math
import textwrap
import time
from datetime import timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.answers import finite_number
from evolink_provider.exceptions import EvolinkTriggerArgumentError, EvolinkValidationError, shown_value
from evolink_provider.operators.base import event_deadline
from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator
from evolink_provider.polling import (
    LONGEST_POLL_INTERVAL,
    LONGEST_WAIT,
    SHORTEST_POLL_INTERVAL,
    poll_settings,
    seconds_setting,
)
from evolink_provider.sensors.evolink import EvolinkTaskSensor
from evolink_provider.triggers.evolink import EvolinkTaskTrigger

TASK_ID = "task-unified-1700000000-abcdefgh"


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (3, 3.0),
        (2.5, 2.5),
        (-1, -1.0),
        (Fraction(3, 2), 1.5),
        (True, None),
        (math.nan, None),
        (math.inf, None),
        (-math.inf, None),
        (10**400, None),
        ("5", None),
        (Decimal("5"), None),
        (None, None),
        ([5], None),
    ],
    ids=repr,
)
def test_a_number_is_a_finite_real_that_is_not_a_bool(value: Any, number: float | None) -> None:
    assert finite_number(value) == number
    assert number is None or type(finite_number(value)) is float


NOT_SECONDS = [0, -1, -0.5, math.nan, math.inf, -math.inf, True, "5", None, [5], timedelta(0), 10**5000]


@pytest.mark.parametrize("value", NOT_SECONDS, ids=lambda value: shown_value(value, 20))
def test_a_setting_that_is_not_a_positive_number_of_seconds_is_refused_by_name(value: Any) -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        seconds_setting("wait", "timeout", value, 0, 60)
    assert refused.value.field == "timeout"
    assert str(refused.value).startswith("wait: invalid timeout=")
    assert refused.value.allowed == "a number of seconds (or a timedelta) above 0 and at most 60"


def test_a_setting_is_taken_within_its_bounds_as_seconds_or_a_timedelta() -> None:
    assert seconds_setting("wait", "timeout", 60, 0, 60) == 60.0
    assert isinstance(seconds_setting("wait", "timeout", 60, 0, 60), float)
    assert seconds_setting("wait", "timeout", 0.001, 0, 60) == 0.001
    assert seconds_setting("wait", "timeout", timedelta(minutes=1), 0, 60) == 60.0
    assert seconds_setting("wait", "poll_interval", 0.1, 0.1, 60) == 0.1
    for value in (60.001, timedelta(seconds=61)):
        with pytest.raises(EvolinkValidationError):
            seconds_setting("wait", "timeout", value, 0, 60)
    with pytest.raises(EvolinkValidationError) as refused:
        seconds_setting("wait", "poll_interval", 0.09, 0.1, 60)
    assert refused.value.allowed == "a number of seconds (or a timedelta) from 0.1 to 60"


def test_an_int_too_long_to_show_is_named_by_its_type() -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        seconds_setting("wait", "timeout", 10**5000, 0, 60)
    assert "invalid timeout=<int too long to show>" in str(refused.value)


def test_poll_intervals_go_from_a_tick_to_half_a_day() -> None:
    assert poll_settings("op", 5, 600) == (5.0, 600.0)
    assert poll_settings("op", 5, 5) == (5.0, 5.0)
    assert poll_settings("op", SHORTEST_POLL_INTERVAL, LONGEST_POLL_INTERVAL) == (0.1, 43_200.0)
    for low, high in ((0.05, 1), (1, LONGEST_POLL_INTERVAL + 1)):
        with pytest.raises(EvolinkValidationError):
            poll_settings("op", low, high)


def test_no_longest_interval_is_the_default_or_the_shortest_and_a_shorter_one_given_is_refused() -> None:
    assert poll_settings("op", 5, None) == (5.0, 600.0)
    assert poll_settings("op", 900, None) == (900.0, 900.0)
    with pytest.raises(EvolinkValidationError) as refused:
        poll_settings("op", 900, 600, shortest="poke_interval")
    assert str(refused.value) == "op: invalid max_poll_interval=600; allowed: at least poke_interval (900)"
    with pytest.raises(EvolinkValidationError) as refused:
        poll_settings("op", 0, 600, shortest="poke_interval")
    assert refused.value.field == "poke_interval"


def seedance(**wait: Any) -> EvolinkSeedanceTextToVideoOperator:
    return EvolinkSeedanceTextToVideoOperator(task_id="clip", prompt="waves", **wait)


@pytest.mark.parametrize(
    ("wait", "field"),
    [
        ({"poll_interval": 0}, "poll_interval"),
        ({"poll_interval": math.nan}, "poll_interval"),
        ({"max_poll_interval": math.inf}, "max_poll_interval"),
        ({"poll_interval": 900, "max_poll_interval": 600}, "max_poll_interval"),
        ({"timeout": "2h"}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"timeout": LONGEST_WAIT + 1}, "timeout"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_an_operator_refuses_a_bad_wait_setting_when_it_is_built(wait: dict[str, Any], field: str) -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        seedance(**wait)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"clip: invalid {field}=")


def test_an_operator_takes_its_wait_settings_as_seconds_or_timedeltas() -> None:
    operator = seedance(
        poll_interval=timedelta(seconds=2), max_poll_interval=timedelta(minutes=5), timeout=timedelta(hours=1)
    )
    assert (operator.poll_interval, operator.max_poll_interval, operator.timeout) == (2.0, 300.0, 3600.0)
    assert (seedance().poll_interval, seedance().max_poll_interval, seedance().timeout) == (
        5.0,
        600.0,
        7200.0,
    )
    slow = seedance(poll_interval=900)  # worked before the checks: the longest follows the shortest
    assert (slow.poll_interval, slow.max_poll_interval) == (900.0, 900.0)


@pytest.mark.parametrize(
    ("wait", "field"),
    [
        ({"poke_interval": 0}, "poke_interval"),  # Airflow's own check lets a zero through
        ({"poke_interval": True}, "poke_interval"),  # and takes True as 1
        ({"poke_interval": math.inf}, "poke_interval"),  # and refuses infinity without naming it
        ({"max_poll_interval": 1, "poke_interval": 2}, "max_poll_interval"),
        ({"timeout": LONGEST_WAIT + 1}, "timeout"),
    ],
)
def test_the_sensor_refuses_a_bad_wait_setting_as_given(wait: dict[str, Any], field: str) -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, **wait)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"wait: invalid {field}=")


@pytest.mark.parametrize("timeout", [True, math.inf, timedelta(days=3650), "1h"], ids=repr)
def test_the_sensor_checks_a_timeout_from_default_args(timeout: Any) -> None:
    import pendulum
    from airflow.sdk import DAG

    with (
        DAG(
            "wait", schedule=None, start_date=pendulum.datetime(2026, 1, 1), default_args={"timeout": timeout}
        ),
        pytest.raises(EvolinkValidationError) as refused,
    ):
        EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID)
    assert refused.value.field == "timeout"


def test_the_sensor_takes_airflows_timedeltas_and_a_long_poke_interval() -> None:
    sensor = EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, poke_interval=timedelta(minutes=15))
    assert (sensor.poke_interval, sensor.max_poll_interval, sensor.timeout) == (900.0, 900.0, 7 * 86_400.0)
    sensor = EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, timeout=timedelta(hours=1))
    assert (sensor.poke_interval, sensor.max_poll_interval, sensor.timeout) == (5.0, 600.0, 3600.0)
    assert EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, timeout=0.5).timeout == 0.5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"poll_interval": math.nan}, "poll_interval"),  # polled back to back
        ({"poll_interval": None}, "poll_interval"),
        ({"max_poll_interval": "600"}, "max_poll_interval"),
        ({"end_time": math.inf}, "end_time"),
        ({"end_time": 1e11}, "end_time"),  # the year 5138
        ({"end_time": -1}, "end_time"),
        ({"end_time": 1e308}, "end_time"),  # as good as for ever
        ({"end_time": 10**400}, "end_time"),  # no float holds it
        ({"end_time": "tomorrow"}, "end_time"),
        ({"not_before": math.inf}, "not_before"),
        ({"max_poll_failures": 0}, "max_poll_failures"),
        ({"max_poll_failures": True}, "max_poll_failures"),
        ({"max_poll_failures": 2.5}, "max_poll_failures"),
    ],
)
def test_the_trigger_refuses_kwargs_that_are_no_numbers_as_a_type_error(
    kwargs: dict[str, Any], field: str
) -> None:
    """A ``TypeError`` (and an ``EvolinkValidationError``): Airflow's triggerer fails the one trigger whose
    construction raises that; any other error stops all the triggers it runs (3.0-3.3)."""
    with pytest.raises(EvolinkTriggerArgumentError) as refused:
        EvolinkTaskTrigger(evolink_task_id=TASK_ID, **kwargs)
    assert isinstance(refused.value, TypeError) and isinstance(refused.value, EvolinkValidationError)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"EvolinkTaskTrigger: invalid {field}=")


@pytest.mark.parametrize(
    ("stored", "pauses"),
    [
        ({"poll_interval": 0}, (0.1, 600.0)),  # an earlier version's sensor with poke_interval=0
        ({"poll_interval": -5}, (0.1, 600.0)),
        ({"max_poll_interval": None}, (5.0, 600.0)),  # the operators' default
        ({"poll_interval": 900, "max_poll_interval": 600}, (900.0, 900.0)),  # its operator with 900
        ({"poll_interval": 1e-9, "max_poll_interval": 0}, (0.1, 0.1)),
        ({"max_poll_interval": 86_400 * 7}, (5.0, 43_200.0)),
        ({"poll_interval": 10**6, "max_poll_interval": 10**6}, (43_200.0, 43_200.0)),
    ],
)
def test_the_trigger_follows_the_pauses_an_earlier_version_stored_within_the_bounds(
    stored: dict[str, Any], pauses: tuple[float, float]
) -> None:
    trigger = EvolinkTaskTrigger(evolink_task_id=TASK_ID, **stored)
    assert (trigger.poll_interval, trigger.max_poll_interval) == pauses


@pytest.mark.parametrize("guide", [-math.inf, math.nan, -1, 1.7e12, "yesterday", None], ids=repr)
def test_a_trigger_drops_a_schedule_guide_that_is_no_time_as_if_not_given(guide: Any) -> None:
    """``started_at`` and ``first_poll_at`` only shape the schedule: an earlier version stored EvoLink's
    ``created`` unchecked (in milliseconds, say), and refusing it would fail a paid task's wait."""
    before = time.time()
    trigger = EvolinkTaskTrigger(evolink_task_id=TASK_ID, started_at=guide, first_poll_at=guide)
    assert before <= trigger.started_at <= time.time()
    assert trigger.first_poll_at is None


def test_an_event_deadline_is_an_epoch_time_or_none() -> None:
    """What a stored event says its deadline was goes back into the trigger on a re-deferral: only a time
    the trigger takes counts."""
    assert event_deadline({"end_time": 2_000_000_000}) == 2e9
    for end_time in (1e15, -5, math.inf, True, "2e9", None):
        assert event_deadline({"end_time": end_time}) is None


def test_the_trigger_takes_whole_numbers_as_floats_and_none_as_none() -> None:
    trigger = EvolinkTaskTrigger(
        evolink_task_id=TASK_ID, poll_interval=2, end_time=2_000_000_000, started_at=0
    )
    assert (trigger.poll_interval, trigger.end_time, trigger.started_at) == (2.0, 2e9, 0.0)
    assert all(
        type(value) is float for value in (trigger.poll_interval, trigger.end_time, trigger.started_at)
    )
    assert (trigger.first_poll_at, trigger.not_before, trigger.max_poll_failures) == (None, None, 8)


def test_a_dag_file_with_a_bad_wait_setting_does_not_load(tmp_path: Path) -> None:
    """Real Airflow parsing a DAG file: the refusal is its import error, before any run could pay."""
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "bad_wait.py").write_text(
        textwrap.dedent(
            """
            import pendulum
            from airflow.sdk import DAG
            from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

            with DAG("bad_wait", schedule=None, start_date=pendulum.datetime(2026, 1, 1)):
                EvolinkSeedanceTextToVideoOperator(task_id="clip", prompt="waves", poll_interval=0)
            """
        )
    )
    bag = DagBag(dag_folder=str(tmp_path))
    assert "bad_wait" not in bag.dag_ids
    (error,) = bag.import_errors.values()
    assert (
        "clip: invalid poll_interval=0; allowed: a number of seconds (or a timedelta) from 0.1 to 43,200"
        in error
    )
