"""Fault injection in real dag.test() runs: transient faults are ridden out, permanent ones fail clearly and
in bounded time, task error codes map to the right Airflow behaviour, and nothing is submitted twice."""

from __future__ import annotations

import time

import pytest

from tests.airflow_runs import dag_module, run_dag
from tests.conftest import SimulatorControl

pytestmark = pytest.mark.usefixtures("airflow_db")
TASKS = "/v1/tasks/"
CREATE = "/v1/videos/generations"

#: 30 % of polls fail, spread over every kind of fault the issue lists.
POLL_FAULTS = [
    {"kind": "status", "status": 429, "retry_after": "0.2", "share": 0.04},
    {"kind": "status", "status": 429, "share": 0.04},
    {"kind": "status", "status": 500, "share": 0.03},
    {"kind": "status", "status": 502, "share": 0.03},
    {"kind": "status", "status": 503, "share": 0.03},
    {"kind": "status", "status": 504, "share": 0.03},
    {"kind": "reset", "share": 0.03},
    {"kind": "timeout", "delay": 2.5, "share": 0.02},
    {"kind": "truncated", "share": 0.02},
    {"kind": "garbled", "share": 0.02},
    {"kind": "unknown_status", "share": 0.02},
]


@pytest.mark.parametrize("mode", ["sync", "deferrable"])
def test_thirty_percent_faulty_polls_and_submissions(sim: SimulatorControl, mode: str) -> None:
    sim.add_faults(
        *({"method": "GET", "path_prefix": TASKS, **fault} for fault in POLL_FAULTS),
        {
            "method": "POST",
            "path_prefix": CREATE,
            "kind": "status",
            "status": 429,
            "retry_after": "0.1",
            "count": 1,
        },
        {"method": "POST", "path_prefix": CREATE, "kind": "status", "status": 503, "count": 1},
        {"method": "POST", "path_prefix": CREATE, "kind": "reset", "after_processing": True, "count": 1},
    )

    state, tasks = run_dag(f"evolink_faulty_{mode}")

    assert state == "success", tasks
    stats = sim.stats()
    assert stats["faults_injected"] >= 3
    # 429, 503 and a reset after the task was created: four POSTs, all with the one key, the last one
    # answered by EvoLink's replay of the task the third created.
    assert list(stats["posts_by_idempotency_key"].values()) == [4]
    assert stats["idempotent_replays"] == 1
    assert stats["tasks_created"] == 1
    polls = stats["polls_by_task"]
    assert len(polls) == 1 and max(polls.values()) <= 60  # within the schedule's bounds, not a hot loop


@pytest.mark.long
def test_a_permanent_fault_fails_in_bounded_time_and_says_what_happened(sim: SimulatorControl) -> None:
    sim.add_faults({"method": "GET", "path_prefix": TASKS, "kind": "status", "status": 503})
    started = time.monotonic()

    state, tasks = run_dag("evolink_permanent_fault")

    assert state == "failed"
    assert time.monotonic() - started < 90
    assert tasks["generate"][0] == "failed"
    assert sim.stats()["tasks_created"] == 1


@pytest.mark.long
def test_every_task_error_code_gets_the_right_airflow_behaviour(sim: SimulatorControl) -> None:
    codes = dag_module().TASK_ERROR_CODES

    _, tasks = run_dag("evolink_task_error_codes")

    for code, retryable in codes.items():
        if retryable:
            assert tasks[code] == ("success", 2), (code, tasks[code])
        else:
            assert tasks[code] == ("failed", 1), (code, tasks[code])  # AirflowFailException: no retry burnt
    assert sim.stats()["tasks_created"] == len(codes) + sum(codes.values())
