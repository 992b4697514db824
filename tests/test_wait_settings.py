"""The wait settings (poll intervals, timeout, the trigger's times) are checked where they are given: at a DAG
file's parse for the operators and the sensor, at construction for the trigger (its kwargs may be a DAG
author's, or come back from the database), so a bad one fails before any credit is spent, naming the field
and what it allows."""

from __future__ import annotations

import math
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkValidationError
from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator
from evolink_provider.polling import LONGEST_POLL_INTERVAL, LONGEST_WAIT, poll_settings, seconds_setting
from evolink_provider.sensors.evolink import EvolinkTaskSensor
from evolink_provider.triggers.evolink import EvolinkTaskTrigger

TASK_ID = "task-unified-1700000000-abcdefgh"
NOT_SECONDS = [0, -1, -0.5, math.nan, math.inf, -math.inf, True, "5", None, [5], timedelta(0)]


@pytest.mark.parametrize("value", NOT_SECONDS, ids=repr)
def test_a_setting_that_is_not_a_positive_number_of_seconds_is_refused_by_name(value: Any) -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        seconds_setting("wait", "poll_interval", value, 60)
    assert refused.value.field == "poll_interval"
    assert str(refused.value).startswith("wait: invalid poll_interval=")
    assert refused.value.allowed == "a number of seconds (or a timedelta) above 0 and at most 60"


def test_a_setting_is_taken_up_to_its_limit_as_seconds_or_a_timedelta() -> None:
    assert seconds_setting("wait", "timeout", 60, 60) == 60.0
    assert isinstance(seconds_setting("wait", "timeout", 60, 60), float)
    assert seconds_setting("wait", "timeout", 0.001, 60) == 0.001
    assert seconds_setting("wait", "timeout", timedelta(minutes=1), 60) == 60.0
    with pytest.raises(EvolinkValidationError):
        seconds_setting("wait", "timeout", 60.001, 60)
    with pytest.raises(EvolinkValidationError):
        seconds_setting("wait", "timeout", timedelta(seconds=61), 60)


def test_poll_intervals_go_up_to_a_day_and_the_longest_is_never_shorter_than_the_shortest() -> None:
    assert poll_settings("op", 5, 600) == (5.0, 600.0)
    assert poll_settings("op", 5, 5) == (5.0, 5.0)
    assert poll_settings("op", 1, LONGEST_POLL_INTERVAL) == (1.0, 86_400.0)
    with pytest.raises(EvolinkValidationError) as refused:
        poll_settings("op", 1, LONGEST_POLL_INTERVAL + 1)
    assert refused.value.field == "max_poll_interval"
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
        ({"poll_interval": 900}, "max_poll_interval"),  # above the default longest (600)
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


@pytest.mark.parametrize(
    ("wait", "field"),
    [
        ({"poke_interval": 0}, "poke_interval"),  # Airflow's own check lets a zero through
        ({"max_poll_interval": 1, "poke_interval": 2}, "max_poll_interval"),
    ],
)
def test_the_sensor_refuses_a_bad_wait_setting_when_it_is_built(wait: dict[str, Any], field: str) -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, **wait)
    assert refused.value.field == field


def test_the_sensor_keeps_airflows_timedelta_poke_interval() -> None:
    sensor = EvolinkTaskSensor(task_id="wait", evolink_task_id=TASK_ID, poke_interval=timedelta(seconds=30))
    assert (sensor.poke_interval, sensor.max_poll_interval, sensor.timeout) == (30.0, 600.0, 7 * 86_400.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"poll_interval": math.nan}, "poll_interval"),  # polled back to back
        ({"max_poll_interval": 1e308}, "max_poll_interval"),
        ({"end_time": math.inf}, "end_time"),
        ({"end_time": "tomorrow"}, "end_time"),
        ({"started_at": -math.inf}, "started_at"),  # an OverflowError in the progress lines
        ({"first_poll_at": math.nan}, "first_poll_at"),
        ({"not_before": math.inf}, "not_before"),
        ({"max_poll_failures": 0}, "max_poll_failures"),
        ({"max_poll_failures": True}, "max_poll_failures"),
        ({"max_poll_failures": 2.5}, "max_poll_failures"),
    ],
)
def test_the_trigger_refuses_kwargs_it_cannot_follow(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(EvolinkValidationError) as refused:
        EvolinkTaskTrigger(evolink_task_id=TASK_ID, **kwargs)
    assert refused.value.field == field
    assert str(refused.value).startswith(f"EvolinkTaskTrigger: invalid {field}=")


def test_the_trigger_keeps_whole_numbers_and_none_as_given() -> None:
    trigger = EvolinkTaskTrigger(
        evolink_task_id=TASK_ID, poll_interval=2, end_time=2_000_000_000, started_at=0
    )
    assert (trigger.poll_interval, trigger.end_time, trigger.started_at) == (2.0, 2e9, 0.0)
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
    assert "clip: invalid poll_interval=0; allowed: a number of seconds (or a timedelta) above 0" in error
