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
        "print(sorted(m for m in sys.modules if m.startswith(('airflow', 'requests', 'httpx'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_cli_lists_the_provider() -> None:
    result = airflow_cli("providers", "list")
    assert result.returncode == 0, result.stderr
    assert "airflow-provider-evolink" in result.stdout


@pytest.mark.usefixtures("airflow_db")
def test_cli_connection_test_reports_credits(sim: SimulatorControl) -> None:
    result = airflow_cli("connections", "test", "evolink_default", AIRFLOW__CORE__TEST_CONNECTION="Enabled")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Connection success!" in result.stdout  # the CLI prints our message only on failure
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
