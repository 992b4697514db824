"""Canary DAGs the end-to-end test expects to FAIL: they prove its checks can fail.

``e2e_canary_unserializable_trigger`` defers with a trigger whose kwargs serde cannot serialize, the bug
the end-to-end test must catch (it surfaces only at defer time, after a paid submission).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, BaseOperator

from evolink_provider.triggers.evolink import EvolinkTaskTrigger


class _Client:
    """Stands for what must never go into trigger kwargs: a client object."""


class UnserializableTrigger(EvolinkTaskTrigger):
    def serialize(self) -> tuple[str, dict[str, Any]]:
        classpath, kwargs = super().serialize()
        return classpath, {**kwargs, "client": _Client()}


class DeferOnce(BaseOperator):
    def execute(self, context: Any) -> None:
        self.defer(
            trigger=UnserializableTrigger(evolink_task_id="task-unified-1700000000-canary00"),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Any, event: Any = None) -> None:
        raise AssertionError(f"the canary trigger should never have run: {event!r}")


with DAG(
    "e2e_canary_unserializable_trigger",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    DeferOnce(task_id="defer")
