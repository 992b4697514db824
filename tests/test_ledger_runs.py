"""The ledger's money path in real DAG runs (``dag.test()``), counted by the simulator.

Each test makes one try fail the way real operation does (a CDN refusing a fresh link, a blip on the
retry's read of its task, a chunked result whose second download fails) and checks that a later try
delivers the video the first one paid for, without paying again. Faults that must hit the *retry* are
added by the DAG's ``on_retry_callback`` (``between_tries`` in ``tests/dags/evolink_test_dags.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.airflow_runs import clear_and_rerun, run_dag, run_dag_with_id, task_state_store, xcom
from tests.conftest import SimulatorControl

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_a_403_on_a_fresh_result_link_buys_no_new_generation(sim: SimulatorControl, tmp_path: Path) -> None:
    sim.add_faults({"kind": "status", "status": 403, "method": "GET", "path_prefix": "/media/", "count": 1})

    state, tasks = run_dag("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})

    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2), "the refused try fails retryably, the retry delivers"
    assert sim.stats()["tasks_created"] == 1
    generated = xcom("evolink_ledger_one", "generate")
    assert [Path(f).name.startswith(f"{generated['id']}-0.") for f in generated["files"]] == [True]


READ_FAULTS = {
    "404": {"kind": "not_found", "method": "GET", "path_prefix": "/v1/tasks/", "count": 1},
    # Five 503s outlast the hook's own attempts (max_retries=4): the ledger's re-read takes over.
    "503": {"kind": "status", "status": 503, "method": "GET", "path_prefix": "/v1/tasks/", "count": 5},
    "timeout": {"kind": "timeout", "delay": 2.5, "method": "GET", "path_prefix": "/v1/tasks/", "count": 1},
}


@pytest.mark.parametrize("fault", sorted(READ_FAULTS))
def test_an_error_on_the_retrys_task_read_buys_no_second_generation(
    sim: SimulatorControl, fault: str
) -> None:
    state, tasks = run_dag("evolink_ledger_reread", run_conf={"faults": [READ_FAULTS[fault]]})

    assert state == "success", tasks
    assert tasks["generate"][1] >= 2, "the first try should time out and a retry read its task"
    stats = sim.stats()
    assert stats["faults_injected"] >= READ_FAULTS[fault]["count"], "the retry's read met the fault"
    assert stats["tasks_created"] == 1
    assert stats["requests"]["POST /v1/videos/generations"] == 1


def chunked_with_a_failed_second_download(sim: SimulatorControl) -> None:
    sim.add_faults(
        {
            "kind": "status",
            "status": 500,
            "method": "GET",
            "path_prefix": "/media/",
            "path_suffix": "/video-1.mp4",
            "count": 5,
        },
        {"kind": "chunked", "method": "GET", "path_prefix": "/media/"},
    )


def served(url: str) -> bytes:
    return requests.get(url, timeout=10).content


def test_chunked_results_with_a_failed_second_download_are_delivered(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    chunked_with_a_failed_second_download(sim)

    state, tasks = run_dag("evolink_ledger_two", run_conf={"output_dir": str(tmp_path)})

    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2)
    stats = sim.stats()
    assert stats["tasks_created"] == 1
    assert stats["requests"]["GET /media"] == 1 + 5 + 1, "result 0 is kept as recorded, not downloaded again"
    generated = xcom("evolink_ledger_two", "generate")
    assert [Path(f).read_bytes() for f in generated["files"]] == [served(u) for u in generated["results"]]


def test_a_different_file_under_the_result_name_is_not_kept(sim: SimulatorControl, tmp_path: Path) -> None:
    """Between the tries other bytes replace the stored result 0: its record no longer matches, so the
    retry downloads it again instead of handing the wrong file downstream."""
    chunked_with_a_failed_second_download(sim)

    state, tasks = run_dag("evolink_ledger_two", run_conf={"output_dir": str(tmp_path), "tamper": True})

    assert state == "success", tasks
    stats = sim.stats()
    assert stats["tasks_created"] == 1
    assert stats["requests"]["GET /media"] == 1 + 5 + 2
    generated = xcom("evolink_ledger_two", "generate")
    stored: list[Any] = [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in generated["files"]]
    assert stored == [hashlib.sha256(served(u)).hexdigest() for u in generated["results"]]


# -- clears (Airflow's clear_task_instances on the kept DagRun: tests/airflow_runs.py) --------------

#: Every result link of every task answers 403 (a CDN refusing them): each try fails retryably.
EVERY_LINK_REFUSED = {"kind": "status", "status": 403, "method": "GET", "path_prefix": "/media/"}


def failed_run_with_a_completed_generation(
    sim: SimulatorControl, tmp_path: Path, dag_id: str = "evolink_ledger_one", **conf: Any
) -> str:
    sim.add_faults(EVERY_LINK_REFUSED)
    state, run_id, tasks = run_dag_with_id(dag_id, run_conf={"output_dir": str(tmp_path), **conf})
    assert (state, tasks["generate"]) == ("failed", ("failed", 4)), tasks
    assert sim.stats()["tasks_created"] == 1
    sim.clear_faults()
    return run_id


def test_a_clear_of_a_failed_task_collects_the_generation_it_paid_for(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    run_id = failed_run_with_a_completed_generation(sim, tmp_path)

    state, tasks = clear_and_rerun("evolink_ledger_one", run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 1
    record = task_state_store("evolink_ledger_one", run_id, "generate")["evolink_submission"]
    assert record["delivered"] is True and len(record["stored"]) == record["results"] == 1


@pytest.mark.parametrize(
    ("dag_id", "conf"),
    [
        ("evolink_ledger_forced", {}),
        ("evolink_ledger_one", {"evolink_regenerate": True}),
        ("evolink_ledger_one", {"evolink_regenerate": ["generate"]}),
    ],
    ids=["operator-argument", "conf-true", "conf-task-list"],
)
def test_a_clear_with_a_forced_fresh_take_pays_again(
    sim: SimulatorControl, tmp_path: Path, dag_id: str, conf: dict[str, Any]
) -> None:
    run_id = failed_run_with_a_completed_generation(sim, tmp_path, dag_id, **conf)

    state, tasks = clear_and_rerun(dag_id, run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 2


def test_a_clear_of_a_task_whose_results_are_proven_expired_pays_again(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    from evolink_provider.timing import current, steered

    run_id = failed_run_with_a_completed_generation(sim, tmp_path)
    first = task_state_store("evolink_ledger_one", run_id, "generate")["evolink_submission"]["task_id"]
    sim.add_faults({**EVERY_LINK_REFUSED, "status": 404, "path_prefix": f"/media/{first}/"})
    real = current().clock

    with steered(clock=lambda: real() + 25 * 3600 + 60):  # past the links' day and the clocks' hour
        state, tasks = clear_and_rerun("evolink_ledger_one", run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 2


def test_a_refused_link_within_a_day_does_not_pay_again_on_a_clear(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    run_id = failed_run_with_a_completed_generation(sim, tmp_path)
    sim.add_faults(EVERY_LINK_REFUSED)

    state, tasks = clear_and_rerun("evolink_ledger_one", run_id)

    assert state == "failed", tasks
    assert sim.stats()["tasks_created"] == 1


@pytest.mark.parametrize("mode", ["sync", "deferrable"])
def test_a_failure_after_execute_leaves_the_generation_undelivered(
    sim: SimulatorControl, tmp_path: Path, mode: str
) -> None:
    """The user's post_execute hook fails after the video was stored: the task instance failed, so the
    result is not recorded delivered and a clear collects it instead of paying again."""
    dag_id = f"evolink_ledger_post_execute_{mode}"
    (tmp_path / "FAIL_AFTER_EXECUTE").write_text("x")
    state, run_id, tasks = run_dag_with_id(dag_id, run_conf={"output_dir": str(tmp_path)})
    assert tasks["generate"][0] == "failed", tasks
    assert not task_state_store(dag_id, run_id, "generate")["evolink_submission"].get("delivered")

    state, tasks = clear_and_rerun(dag_id, run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 1
    assert task_state_store(dag_id, run_id, "generate")["evolink_submission"]["delivered"] is True


# -- a task seen completed (billed) and then read as failed or cancelled (row R29) -------------------


@pytest.fixture
def status_flips_after_completed(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Server side (the in-process simulator's task object; the provider and Airflow are untouched): the
    read after a task was first answered ``completed`` answers ``flip_to`` with ``code``, once."""
    from evolink_provider.simulator.tasks import TaskStore

    original = TaskStore.task_object
    plan: dict[str, Any] = {"flip_to": "failed", "code": "service_error", "seen": set(), "flipped": 0}

    def task_object(self: TaskStore, task: Any, base_url: str) -> dict[str, Any]:
        body = original(self, task, base_url)
        if body["status"] == "completed" and task.id in plan["seen"] and plan["flipped"] == 0:
            plan["flipped"] += 1
            body = {k: v for k, v in body.items() if k not in ("results", "result_data")}
            body["status"] = plan["flip_to"]
            body["error"] = {"code": plan["code"], "message": "flapped", "type": "task_error"}
        elif body["status"] == "completed":
            plan["seen"].add(task.id)
        return body

    monkeypatch.setattr(TaskStore, "task_object", task_object)
    yield plan


@pytest.mark.parametrize(
    ("flip_to", "code"),
    [("failed", "service_error"), ("failed", "resource_not_found"), ("cancelled", "cancelled")],
)
def test_a_task_seen_completed_then_read_failed_is_collected_not_paid_again(
    sim: SimulatorControl,
    tmp_path: Path,
    status_flips_after_completed: dict[str, Any],
    flip_to: str,
    code: str,
) -> None:
    """Try 1 sees the task completed (billed) and a result link is refused once; the retry's read answers
    failed or cancelled. That contradiction spends nothing and fails the try; the next one delivers."""
    status_flips_after_completed.update(flip_to=flip_to, code=code)
    sim.add_faults({"kind": "status", "status": 403, "method": "GET", "path_prefix": "/media/", "count": 1})

    state, tasks = run_dag("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})

    assert status_flips_after_completed["flipped"] == 1, "the flip must hit the retry's read"
    assert state == "success", tasks
    assert tasks["generate"] == ("success", 3)
    assert sim.stats()["tasks_created"] == 1
