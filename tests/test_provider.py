"""Registration: Airflow discovers the provider, its connection type and form, and its CLI paths work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TEST_API_KEY, SimulatorControl


def airflow_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_providers_manager_discovers_the_provider_and_its_connection_type() -> None:
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    assert "airflow-provider-evolink" in ProvidersManager().providers
    hook_info = ProvidersManagerTaskRuntime().hooks["evolink"]
    assert hook_info is not None
    assert hook_info.hook_class_name == "evolink_provider.hooks.evolink.EvolinkHook"
    assert hook_info.connection_id_attribute_name == "evolink_conn_id"
    assert hook_info.hook_name == "EvoLink"


def test_connection_form_relabels_and_hides_fields() -> None:
    from airflow.providers_manager import ProvidersManager

    behaviour = ProvidersManager().field_behaviours["evolink"]
    assert behaviour["relabeling"]["password"] == "API key"
    assert {"login", "schema", "port"} <= set(behaviour["hidden_fields"])
    assert "api.evolink.ai" in behaviour["placeholders"]["host"]


def test_provider_info_imports_nothing() -> None:
    code = (
        "import sys; from evolink_provider.get_provider_info import get_provider_info; get_provider_info();"
        "print(sorted(m for m in sys.modules if m.startswith(('airflow', 'requests', 'aiohttp'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


#: One interpreter imports what a DAG file imports, then a trigger's module, and prints what each step
#: loaded of the names asked about (one subprocess for both tests: each costs 2.5 s of CPU).
IMPORT_STEPS = """
import json, sys
def loaded():
    return sorted(
        m for m in sys.modules
        if m.split('.')[0] in ('aiohttp', 'requests', 'urllib3')
        or m.startswith('evolink_provider.simulator')
        or m in ('evolink_provider.ledger', 'evolink_provider.hooks.evolink',
                 'evolink_provider.triggers.evolink')
    )
import evolink_provider.operators.evolink, evolink_provider.sensors.evolink
dag_file = loaded()
import evolink_provider.triggers.evolink
print(json.dumps({"dag_file": dag_file, "trigger": loaded()}))
"""


@pytest.fixture(scope="module")
def imported_by_step() -> dict[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", IMPORT_STEPS], capture_output=True, text=True, check=True)
    return dict(json.loads(result.stdout))


def test_a_dag_file_and_a_trigger_import_no_http_client_and_no_simulator(
    imported_by_step: dict[str, list[str]],
) -> None:
    """aiohttp is imported on a trigger's run path only, requests on a task's; the simulator never on a
    worker's or a DAG file's import path."""
    assert not [m for m in imported_by_step["trigger"] if not m.startswith("evolink_provider.")]
    assert not [m for m in imported_by_step["trigger"] if m.startswith("evolink_provider.simulator")]


def test_a_dag_file_importing_the_operators_and_the_sensor_loads_no_ledger_hook_or_trigger(
    imported_by_step: dict[str, list[str]],
) -> None:
    """The ledger, the hook (with its HTTP layer) and the trigger (with Airflow's trigger base) serve a
    running task only: a DAG file's parse does not pay for them (the import goal of docs/benchmarks.md)."""
    assert imported_by_step["dag_file"] == []


def test_cli_lists_the_provider() -> None:
    result = airflow_cli("providers", "list")
    assert result.returncode == 0, result.stderr
    assert "airflow-provider-evolink" in result.stdout


@pytest.mark.usefixtures("airflow_db")
def test_cli_connection_test_prints_success_only(sim: SimulatorControl) -> None:
    """What the README says: on success Airflow 3.3's CLI prints no message (the credits are not shown)."""
    result = airflow_cli("connections", "test", "evolink_default", AIRFLOW__CORE__TEST_CONNECTION="Enabled")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Connection success!" in result.stdout  # the CLI prints our message only on failure
    assert "remaining credits" not in result.stdout + result.stderr
    assert TEST_API_KEY not in result.stdout + result.stderr
    assert sim.stats()["requests"]["GET /v1/credits"] == 1


@pytest.mark.usefixtures("airflow_db")
def test_cli_connection_test_explains_a_bad_key(sim: SimulatorControl) -> None:
    bad = json.dumps({"conn_type": "evolink", "password": "sk-wrong-key-42", "host": sim.base_url})
    result = airflow_cli(
        "connections",
        "test",
        "evolink_bad",
        AIRFLOW__CORE__TEST_CONNECTION="Enabled",
        AIRFLOW_CONN_EVOLINK_BAD=bad,
    )
    output = result.stdout + result.stderr
    assert "rejected the API key" in output, output
    assert "sk-wrong-key-42" not in output


def test_every_connection_extra_has_a_form_field_and_the_readme_lists_them_all() -> None:
    """README extras == conn-fields == the extras the connection code reads, each with label and help."""
    import re
    from types import SimpleNamespace

    from airflow.providers_manager import ProvidersManager

    from evolink_provider.get_provider_info import get_provider_info
    from evolink_provider.hooks.connection import settings_from_connection
    from tests.conftest import REPO

    class Recording(dict[str, object]):
        """An empty extra that remembers which keys the connection code asks for."""

        read: set[str] = set()

        def __bool__(self) -> bool:
            return True  # "extra_dejson or {}" must keep this one

        def get(self, key: str, default: object = None) -> object:
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> object:
            self.read.add(key)
            return super().__getitem__(key)

    conn = SimpleNamespace(
        conn_id="x", password="sk-x", host="", schema=None, port=None, extra_dejson=Recording()
    )
    settings_from_connection(conn)  # type: ignore[arg-type]
    read = Recording.read

    (declared,) = get_provider_info()["connection-types"]
    fields = declared["conn-fields"]
    section = (REPO / "README.md").read_text().split("## Connection", 1)[1].split("\n## ", 1)[0]
    listed = {
        name
        for row in re.findall(r"^\| extra (.+?) \|", section, re.M)
        for name in re.findall(r"`(\w+)`", row)
    }

    assert listed == set(fields) == read
    for name, field in fields.items():
        assert field["label"] and field["description"], name
    widgets = ProvidersManager().connection_form_widgets
    assert {f"extra__evolink__{name}" for name in fields} <= set(widgets)


def test_the_connection_test_of_the_ui_and_rest_api_reports_the_credits(sim: SimulatorControl) -> None:
    """The UI's Test button and ``POST /api/v2/connections/test`` show the message the CLI leaves out."""
    from airflow.models.connection import Connection

    conn = Connection.get_connection_from_secrets("evolink_default")
    sim.set_credits(1234567.5)
    assert conn.test_connection() == (
        True,
        f"Connected to EvoLink at {sim.base_url}; remaining credits: 1234567.5 "
        "(account balance 1234567.5, the key has no quota of its own)",
    )
    sim.set_credits(key_remaining=12.5)
    assert conn.test_connection()[1].endswith(
        "remaining credits: 12.5 (account balance 1234567.5, the key has a quota of 12.5)"
    )
