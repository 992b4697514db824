"""A third attack on the money path (issue 21), in real DAG runs counted by the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.airflow_runs import run_dag
from tests.conftest import SimulatorControl

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.mark.parametrize("value", ["true", 1, {"generate": True}])
def test_a_regenerate_conf_value_that_is_not_true_or_a_list_fails_before_any_call(
    sim: SimulatorControl, tmp_path: Path, value: Any
) -> None:
    """``{"evolink_regenerate": "true"}`` typed into the trigger form was silently no forced take (a clear
    collected the old video): now the try fails at once, naming the key and what it accepts."""
    state, tasks = run_dag(
        "evolink_ledger_one", run_conf={"output_dir": str(tmp_path), "evolink_regenerate": value}
    )

    assert (state, tasks["generate"]) == ("failed", ("failed", 1)), "no retry of a refused value"
    assert sim.stats()["tasks_created"] == 0 and sim.posts() == 0
