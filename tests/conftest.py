"""Test set-up: a private AIRFLOW_HOME and DAGs folder, the EvoLink simulator on loopback, and a connection.

The environment is fixed here, at import, because Airflow reads its configuration when first imported.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent

# With PYTHONDONTWRITEBYTECODE set (some CI images set it), every Python process the tests start (the
# xdist workers, Airflow's CLI, a plain-install venv, a cluster's task processes) compiles all of Airflow
# from source again: most of the suite's time. The test processes may cache their bytecode.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
TEST_API_KEY = "sk-sim-pytest-key-5d1c0a97e3"
#: A second key of the simulator: its tasks are not the first key's (a read with the other key is refused).
SECOND_API_KEY = "sk-sim-pytest-second-key-71f04b"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="evolink-airflow-home-"))
atexit.register(shutil.rmtree, AIRFLOW_HOME, ignore_errors=True)
DAGS_FOLDER = AIRFLOW_HOME / "dags"
SIMULATOR_PORT = _free_port()
SIMULATOR_URL = f"http://127.0.0.1:{SIMULATOR_PORT}"

#: Small timeouts and backoffs keep the fault tests fast; the rules are the production ones.
CONNECTION_EXTRA = {
    "connect_timeout": 2,
    "read_timeout": 2,
    "max_retries": 4,
    "backoff_base": 0.05,
    "backoff_max": 0.2,
    "retry_after_max": 1.5,
}

#: The DAG ids (comma-separated) that a parse of the test DAG files registers; unset: all. dag.test()
#: parses its whole bundle and serializes and stores every DAG registered, on each call: with a hundred
#: test DAGs that was most of a run's CPU. None outside ``tests.airflow_runs.only_dag``.
ONLY_DAGS_ENV = "EVOLINK_TEST_ONLY_DAGS"

os.environ.update(
    {
        ONLY_DAGS_ENV: "",
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "EVOLINK_SIMULATOR_API_KEY": TEST_API_KEY,
        "AIRFLOW_CONN_EVOLINK_DEFAULT": json.dumps(
            {
                "conn_type": "evolink",
                "password": TEST_API_KEY,
                "host": SIMULATOR_URL,
                "extra": CONNECTION_EXTRA,
            }
        ),
    }
)
# dag.test() runs DAGs from the configured folder: the example DAGs (with their assets) and the test DAGs.
shutil.copytree(REPO / "example_dags", DAGS_FOLDER, ignore=shutil.ignore_patterns("__pycache__"))
for source in (REPO / "tests" / "dags").glob("*.py"):
    shutil.copy(source, DAGS_FOLDER / source.name)


#: The timing the tests run on (evolink_provider.timing): a 1 s trigger hold and wait-on-worker window
#: instead of 15 s. The simulator's default task runs 0.8 s and says it takes 3 s (``task_estimate``): a
#: deferrable operator defers it at once (its estimate is beyond the window, whatever the whole-second
#: ``created`` and ``estimated_time`` round away) and its trigger fires after the hold. A test that checks
#: the production values steers them back (``steered(**PRODUCTION)``).
TEST_TIMING = {"trigger_hold": 1.0, "wait_on_worker_window": 1.0, "reread_pause": 0.2}
SIMULATOR_TASK_SECONDS = 0.8
SIMULATOR_TASK_ESTIMATE = 3.0


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist hands each worker its first tests in one chunk of a quarter of its share: the long tests,
    sorted first, would all go to one worker. Two at a time spreads them (unless set on the command line)."""
    if getattr(config.option, "maxschedchunk", 2) is None:
        config.option.maxschedchunk = 2


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long tests first: xdist hands tests out in this order, and one started last sets the suite's end."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def quick_timing() -> Iterator[None]:
    from evolink_provider.timing import steered

    with steered(**TEST_TIMING):
        yield


class SimulatorControl:
    """The simulator's test-only control endpoints (faults, statistics, reset), over loopback."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def add_faults(self, *rules: dict[str, Any]) -> None:
        response = requests.post(f"{self.base_url}/_simulator/faults", json={"rules": list(rules)}, timeout=5)
        response.raise_for_status()

    def clear_faults(self) -> None:
        requests.delete(f"{self.base_url}/_simulator/faults", timeout=5).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/_simulator/stats", timeout=5)
        response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        requests.post(f"{self.base_url}/_simulator/reset", timeout=5).raise_for_status()

    def set_credits(
        self, remaining: float | None = None, key_remaining: float | None = None, key_unlimited: bool = False
    ) -> None:
        """The account's balance and the key's own quota (or none) until the next reset."""
        body = {"remaining": remaining, "key_remaining": key_remaining, "key_unlimited": key_unlimited}
        requests.post(f"{self.base_url}/_simulator/credits", json=body, timeout=5).raise_for_status()

    def issue_task_ids(self, *ids: str) -> None:
        """The next created tasks take these ids, in order."""
        response = requests.post(f"{self.base_url}/_simulator/task_ids", json={"ids": list(ids)}, timeout=5)
        response.raise_for_status()

    def posts(self) -> int:
        return int(self.stats()["requests"].get("POST /v1/videos/generations", 0))


@pytest.fixture(scope="session")
def simulator_server() -> Iterator[str]:
    """The simulator, started once for the session on the port the connection names."""
    from evolink_provider.simulator import EvolinkSimulator

    with EvolinkSimulator(
        api_key=TEST_API_KEY,
        extra_api_keys=[SECOND_API_KEY],
        port=SIMULATOR_PORT,
        task_seconds=SIMULATOR_TASK_SECONDS,
        task_estimate=SIMULATOR_TASK_ESTIMATE,
    ) as sim:
        yield sim.base_url


@pytest.fixture
def sim(simulator_server: str) -> Iterator[SimulatorControl]:
    """A clean simulator (no tasks, faults or counts) for each test."""
    control = SimulatorControl(simulator_server)
    control.reset()
    yield control
    control.clear_faults()


def migrated_db() -> Path:
    """An empty SQLite metadata DB migrated by this Airflow (``airflow db migrate`` takes 15 s, and every
    test process needs one): the first process migrates it once per Airflow version and Python into the
    temp dir, and every process copies it."""
    from importlib.metadata import version

    template = Path(tempfile.gettempdir()) / (
        f"evolink-test-airflow-{version('apache-airflow')}-py{sys.version_info[0]}{sys.version_info[1]}.db"
    )
    if not template.exists():
        home = Path(tempfile.mkdtemp(prefix="evolink-airflow-migrate-"))
        try:
            subprocess.run(
                [sys.executable, "-m", "airflow", "db", "migrate"],
                check=True,
                capture_output=True,
                env={**os.environ, "AIRFLOW_HOME": str(home)},
            )
            os.replace(home / "airflow.db", template)  # atomic: a parallel process sees all or nothing
        finally:
            shutil.rmtree(home, ignore_errors=True)
    return template


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB in the private AIRFLOW_HOME (dag.test() needs one)."""
    shutil.copyfile(migrated_db(), AIRFLOW_HOME / "airflow.db")
    return AIRFLOW_HOME


def asset_events_of(dag_id: str) -> list[tuple[str, dict[str, Any], list[str]]]:
    """``(asset URI, extra, alias names)`` of the asset events the DAG's latest run emitted."""
    from airflow.models.asset import AssetEvent
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).first()
        assert run is not None
        events = session.query(AssetEvent).filter(
            AssetEvent.source_dag_id == dag_id, AssetEvent.source_run_id == run.run_id
        )
        return [(e.asset.uri, dict(e.extra), sorted(a.name for a in e.source_aliases)) for e in events]
