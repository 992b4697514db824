"""Airflow-version branches live in evolink_provider.compat only (the matrix runs them on each version)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest

from evolink_provider import compat
from tests.conftest import REPO

#: Names whose home depends on the Airflow version: (module, name) pairs, or a whole module.
VERSION_DEPENDENT = {
    ("airflow.sdk", "BaseHook"),
    ("airflow.sdk", "conf"),
    ("airflow.sdk.log", "amask_secret"),
    ("airflow.sdk.exceptions", "*"),
    ("airflow.exceptions", "*"),
    ("airflow.configuration", "*"),
    ("airflow.hooks.base", "*"),
}


def version_dependent_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if {(node.module, alias.name), (node.module, "*")} & VERSION_DEPENDENT:
                    found.append(f"from {node.module} import {alias.name}")
    return found


def test_only_compat_imports_names_that_moved_between_airflow_versions() -> None:
    offenders = {
        path.relative_to(REPO).as_posix(): imports
        for path in (REPO / "evolink_provider").rglob("*.py")
        if path.name != "compat.py" and (imports := version_dependent_imports(path))
    }
    assert offenders == {}, "import these from evolink_provider.compat"


def test_log_once_says_each_message_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.compat")
    first, second = "limitation A of this test", "limitation B of this test"
    with caplog.at_level(logging.WARNING, logger="tests.compat"):
        for _ in range(3):
            compat.log_once(logger, first)
        compat.log_once(logger, second)

    assert [record.getMessage() for record in caplog.records] == [first, second]


def test_connection_form_for_airflow_3_0_and_3_1_mirrors_the_provider_info() -> None:
    from evolink_provider.get_provider_info import get_provider_info
    from evolink_provider.hooks.evolink import EvolinkHook

    (declared,) = get_provider_info()["connection-types"]
    behaviour = EvolinkHook.get_ui_field_behaviour()

    assert behaviour["relabeling"] == declared["ui-field-behaviour"]["relabeling"]
    assert behaviour["placeholders"] == declared["ui-field-behaviour"]["placeholders"]
    # 3.0/3.1 do not show the conn-fields that stand in for the extra on 3.2+, so the extra stays visible.
    assert set(behaviour["hidden_fields"]) == set(declared["ui-field-behaviour"]["hidden-fields"]) - {"extra"}


@pytest.mark.parametrize("common_compat", ["installed", "before 1.10"])
def test_a_trigger_reads_its_connection_with_or_without_common_compats_get_async_connection(
    monkeypatch: pytest.MonkeyPatch, common_compat: str
) -> None:
    """With common-compat's get_async_connection (Airflow 3.3.2's constraints and later) and without it
    (older releases, as Airflow 3.0.6's constraints pin): the connection is read on the event loop."""
    import asyncio
    import json
    import sys

    from airflow.providers.common.compat import connection

    monkeypatch.setenv(
        "AIRFLOW_CONN_EVOLINK_COMPAT",
        json.dumps({"conn_type": "evolink", "password": "sk-compat-test-key", "host": "http://x.example"}),
    )
    through_common_compat: list[str] = []
    original = connection.get_async_connection

    async def recorded(conn_id: str) -> Any:
        through_common_compat.append(conn_id)
        return await original(conn_id)

    monkeypatch.setattr(connection, "get_async_connection", recorded)
    if common_compat != "installed":
        monkeypatch.setitem(sys.modules, "airflow.providers.common.compat.connection", None)
    conn = asyncio.run(compat.get_async_connection("evolink_compat"))
    assert through_common_compat == (["evolink_compat"] if common_compat == "installed" else [])
    assert conn.password == "sk-compat-test-key" and conn.host == "http://x.example"
