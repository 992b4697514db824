"""The Airflow-version smoke test: what a user of each supported Airflow minor does first.

``.ci/airflow_matrix.sh`` runs this file in one fresh virtualenv per Airflow version, with the provider
installed without extras; the main suite (3.3 only) does not collect it (no ``test_`` prefix). It uses the
main suite's set-up (``tests/conftest.py``: the simulator on loopback, a migrated DB, the connection) and its
DAGs (``tests/dags/evolink_test_dags.py``), each ending in a check task that fetches the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

import evolink_provider.ledger as ledger
from evolink_provider import compat
from evolink_provider.ledger import NO_TASK_STATE_STORE
from tests.airflow_runs import run_dag, xcom
from tests.conftest import SimulatorControl, asset_events_of

AIRFLOW = tuple(int(part) for part in version("apache-airflow").split(".")[:2])


def test_providers_manager_registers_the_provider_and_its_hook() -> None:
    from airflow.providers_manager import ProvidersManager

    manager = ProvidersManager()
    assert manager.providers["airflow-provider-evolink"].version == version("airflow-provider-evolink")
    try:  # 3.2+: hooks are looked up through the task SDK's own manager
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

        hook = ProvidersManagerTaskRuntime().hooks["evolink"]
    except ImportError:
        hook = manager.hooks["evolink"]
    assert hook is not None
    assert hook.hook_class_name == "evolink_provider.hooks.evolink.EvolinkHook"
    behaviour = manager.field_behaviours["evolink"]  # 3.0, 3.1: from the hook method (needs wtforms)
    assert behaviour["relabeling"]["password"] == "API key"


#: The DAG runs of this module, and every warning ``log_once`` let through while they ran.
DAG_RUNS = {
    "evolink_seedance_sync": "generate",
    "evolink_seedance_deferrable": "generate",
    "evolink_sora_character_deferrable": "generate",
    "evolink_sensor_deferrable": "wait",
    "evolink_stored_asset_deferrable": "generate",
}
RAN: set[str] = set()
SAID: list[str] = []


class _Recorder:
    """Passes warnings on to the task's logger and notes them (console output repeats lines on 3.0)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def warning(self, message: str) -> None:
        SAID.append(message)
        self.logger.warning(message)


@pytest.fixture(scope="module", autouse=True)
def record_what_is_said_once() -> Iterator[None]:
    real = compat.log_once
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger, "log_once", lambda logger, message: real(_Recorder(logger), message))
        yield


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize(("dag_id", "result_task"), DAG_RUNS.items())
def test_dag_runs_to_success(sim: SimulatorControl, dag_id: str, result_task: str) -> None:
    state, tasks = run_dag(dag_id)
    RAN.add(dag_id)

    assert state == "success", tasks
    assert all(task_state == "success" for task_state, _ in tasks.values()), tasks
    assert xcom(dag_id, result_task)["status"] == "completed"
    assert sim.stats()["tasks_created"] == 1
    if dag_id == "evolink_stored_asset_deferrable":
        (stored,) = xcom(dag_id, result_task)["files"]
        ((uri, extra, aliases),) = asset_events_of(dag_id)
        assert (uri, aliases) == (Path(stored).resolve().as_uri(), ["evolink_smoke_videos"])
        assert extra["size_bytes"] == Path(stored).stat().st_size


def test_missing_task_state_store_is_said_once_per_process() -> None:
    """Five submissions in this process: before 3.3 the limitation is said once, on 3.3 never."""
    assert set(DAG_RUNS) == RAN, "run the whole file: this counts over the DAG runs above"
    assert SAID.count(NO_TASK_STATE_STORE) == (0 if AIRFLOW >= (3, 3) else 1), SAID


def test_importing_the_operators_loads_no_http_client_and_reports_its_cost() -> None:
    """What a DAG file pays to import the operators on this Airflow once ``airflow.sdk`` is loaded: the
    cumulative ``-X importtime`` of that import (everything it loads that Airflow had not), the median of
    five fresh interpreters, printed for the matrix's log (the goal is 50 ms; a shared CI machine's timings
    are too noisy to fail on). No HTTP client and nothing of the simulator is imported, which is checked."""
    import statistics
    import subprocess
    import sys

    code = "import airflow.sdk, sys; import evolink_provider.operators.evolink; print(sorted(sys.modules))"
    costs, loaded = [], ""
    for _ in range(5):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
        )
        (line,) = [
            row for row in run.stderr.splitlines() if row.endswith("| evolink_provider.operators.evolink")
        ]
        costs.append(int(line.split("|")[1]) / 1e6)
        loaded = run.stdout
    added = statistics.median(costs)
    print(f"importing the operators adds {1000 * added:.0f} ms over airflow.sdk (goal: 50 ms)")
    for module in ("'aiohttp'", "'requests'", "'evolink_provider.simulator'"):
        assert module not in loaded, module


def test_the_triggerer_fails_only_the_trigger_whose_stored_kwargs_it_refuses() -> None:
    """Airflow's own ``TriggerRunner`` builds each trigger from its stored kwargs and fails the one that
    raises a ``TypeError``, and only it; any other error stops every trigger it runs. The trigger refuses
    kwargs that are no numbers as one (``EvolinkTriggerArgumentError``) and follows the pauses an earlier
    version stored (a sensor's ``poke_interval`` of 0)."""
    import asyncio

    from airflow.executors import workloads
    from airflow.jobs.triggerer_job_runner import TriggerRunner
    from airflow.models.trigger import Trigger

    classpath = "evolink_provider.triggers.evolink.EvolinkTaskTrigger"
    task_id = "task-unified-1700000000-abcdefgh"
    stored = {
        1: {"evolink_task_id": task_id, "poll_interval": "5"},
        2: {"evolink_task_id": task_id, "poll_interval": 0, "max_poll_interval": 600.0, "end_time": 2e9},
    }
    runner = TriggerRunner()
    for trigger_id, kwargs in stored.items():
        encrypted = Trigger(classpath, kwargs).encrypted_kwargs
        runner.to_create.append(
            workloads.RunTrigger(id=trigger_id, classpath=classpath, encrypted_kwargs=encrypted, ti=None)
        )

    async def create() -> None:
        await runner.create_triggers()
        for running in runner.triggers.values():
            running["task"].cancel()

    asyncio.run(create())
    assert [(trigger_id, type(error).__name__) for trigger_id, error in runner.failed_triggers] == [
        (1, "EvolinkTriggerArgumentError")
    ]
    assert list(runner.triggers) == [2]
