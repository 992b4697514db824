"""Running the test DAGs in-process: ``dag.test()`` for a new run, and a clear that keeps the DagRun.

``dag.test(logical_date=...)`` of an earlier run *deletes* that DagRun and so, by cascade, its
``task_state_store`` rows: a test that "clears" that way cannot tell a clear from a new run.
:func:`clear_and_rerun` clears as the UI and the REST API do (Airflow's ``clear_task_instances`` on the
existing run: ``max_tries`` raised, state reset, the run and its ``task_state_store`` rows kept), then
runs that same run to its end with dag.test()'s own task runner (triggers run in line).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterable, Iterator
from functools import cache
from types import ModuleType
from typing import Any

from tests.conftest import DAGS_FOLDER, ONLY_DAGS_ENV

#: ``{task_id or task_id[map_index]: (state, try_number)}`` of one DagRun.
Tasks = dict[str, tuple[str, int]]


@contextlib.contextmanager
def only_files(*dag_files: str) -> Iterator[None]:
    """Within the block, a parse of the DAGs folder reads ``dag_files`` alone.

    dag.test() parses its whole bundle and serializes and stores every DAG found, on each call: with the
    example DAGs and a hundred test DAGs that was 0.3 s of CPU per run and most of the suite's CPU. An
    ``.airflowignore`` (each test process has its own DAGs folder) hides the other files.
    """
    ignore_file = DAGS_FOLDER / ".airflowignore"
    present = sorted(path.name for path in DAGS_FOLDER.glob("*.py"))
    assert set(dag_files) <= set(present), f"{dag_files} are not all in the DAGs folder"
    ignore_file.write_text("".join(f"{name}\n" for name in present if name not in dag_files))
    try:
        yield
    finally:
        ignore_file.unlink()


@contextlib.contextmanager
def only_dag(dag_id: str, dag_file: str = "evolink_test_dags.py") -> Iterator[None]:
    """Within the block, a parse of the DAGs folder reads ``dag_file`` alone, and builds and registers
    ``dag_id`` alone of its DAGs (conftest's ONLY_DAGS_ENV)."""
    before = os.environ[ONLY_DAGS_ENV]
    os.environ[ONLY_DAGS_ENV] = dag_id
    try:
        with only_files(dag_file):
            yield
    finally:
        os.environ[ONLY_DAGS_ENV] = before


#: The example DAG files: a run of one parses them all (an asset's consumer is among them).
EXAMPLE_FILES = tuple(sorted(path.name for path in DAGS_FOLDER.glob("example_*.py")))


@cache
def dag_module() -> ModuleType:
    """The test DAG file, every DAG built and none registered (ONLY_DAGS_ENV empty)."""
    spec = importlib.util.spec_from_file_location("evolink_test_dags", DAGS_FOLDER / "evolink_test_dags.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    before = os.environ[ONLY_DAGS_ENV]
    os.environ[ONLY_DAGS_ENV] = ""
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ[ONLY_DAGS_ENV] = before
    return module


def task_states(dag_id: str, run_id: str) -> Tasks:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
            .all()
        )
        return {
            f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: (
                str(ti.state),
                ti.try_number,
            )
            for ti in rows
        }


def run_dag(
    dag_id: str, logical_date: Any = None, run_conf: dict[str, Any] | None = None
) -> tuple[str, Tasks]:
    """A new run of the DAG with dag.test(); the run state and :func:`task_states`.

    With the ``logical_date`` of an earlier run, dag.test() deletes that run first (and its
    ``task_state_store``): use :func:`clear_and_rerun` to clear one.
    """
    state, _run_id, tasks = run_dag_with_id(dag_id, logical_date, run_conf)
    return state, tasks


def run_dag_with_id(
    dag_id: str, logical_date: Any = None, run_conf: dict[str, Any] | None = None
) -> tuple[str, str, Tasks]:
    """As :func:`run_dag`, with the run id (for :func:`clear_and_rerun`)."""
    dag = dag_module().DAGS[dag_id]
    kwargs: dict[str, Any] = {"run_conf": run_conf}
    if logical_date is not None:
        kwargs["logical_date"] = logical_date
    with only_dag(dag_id):
        dag_run = dag.test(**kwargs)
    return str(dag_run.state), dag_run.run_id, task_states(dag_id, dag_run.run_id)


def clear_and_rerun(dag_id: str, run_id: str, task_ids: Iterable[str] | None = None) -> tuple[str, Tasks]:
    """Clear task instances of an existing run as a user's Clear does, and run that run again to its end.

    ``task_ids`` (default: every task of the run) are cleared with Airflow's ``clear_task_instances``
    (``max_tries`` raised, state reset); the DagRun, its XComs of other tasks and its ``task_state_store``
    rows stay. The run is then driven as dag.test() drives one, on the same DagRun row.
    """
    import time

    from airflow import settings
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance, clear_task_instances
    from airflow.sdk.definitions.dag import _run_task
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.state import DagRunState, State, TaskInstanceState
    from sqlalchemy import select

    dag = dag_module().DAGS[dag_id]
    wanted = None if task_ids is None else set(task_ids)
    session = settings.Session()
    try:
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)
        ).all()
        chosen = [ti for ti in tis if wanted is None or ti.task_id in wanted]
        assert chosen, f"nothing to clear in {dag_id} {run_id} ({wanted})"
        clear_task_instances(chosen, session, dag_run_state=DagRunState.RUNNING)
        session.commit()

        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        assert run is not None, "the clear must keep the DagRun"
        run.dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        while run.state == DagRunState.RUNNING:
            session.expire_all()
            schedulable, _ = run.update_state(session=session)
            for ti in schedulable:
                if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                    ti.try_number += 1
                ti.state = TaskInstanceState.SCHEDULED
            session.commit()
            scheduled = [ti for ti in run.get_task_instances(session=session) if ti.state == State.SCHEDULED]
            if not scheduled:
                time.sleep(0.2)  # waiting on a retry delay or a reschedule
            for ti in scheduled:
                # As dag.test(): a task's failure is in its state, and the run goes on.
                with contextlib.suppress(Exception):
                    _run_task(ti=ti, task=dag.task_dict[ti.task_id], run_triggerer=True)
        state = str(run.state)
    finally:
        session.close()
    return state, task_states(dag_id, run_id)


def task_state_store(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
    """The ``task_state_store`` rows of one task instance, ``{key: value}``."""
    import json

    from airflow.models.task_state_store import TaskStateStoreModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(TaskStateStoreModel).filter(
            TaskStateStoreModel.dag_id == dag_id,
            TaskStateStoreModel.run_id == run_id,
            TaskStateStoreModel.task_id == task_id,
            TaskStateStoreModel.map_index == map_index,
        )
        return {row.key: json.loads(row.value) for row in rows}


def xcom(dag_id: str, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter(XComModel.dag_id == dag_id, XComModel.task_id == task_id, XComModel.key == "return_value")
            .order_by(XComModel.timestamp.desc())
            .first()
        )
        assert row is not None, f"no XCom from {dag_id}.{task_id}"
        return XComModel.deserialize_value(row)


def triggers_for(evolink_task_ids: Iterable[str]) -> list[dict[str, Any]]:
    """The kwargs of every trigger deferred on one of these EvoLink tasks (dag.test() keeps the rows)."""
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    wanted = set(evolink_task_ids)
    with create_session() as session:
        kwargs = [dict(row.kwargs) for row in session.query(Trigger).order_by(Trigger.id)]
    return [k for k in kwargs if k.get("evolink_task_id") in wanted]


def ended_at(dag_id: str, run_id: str, task_id: str) -> float:
    """When the task instance ended (epoch seconds)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dag_id, run_id=run_id, task_id=task_id).one()
        assert ti.end_date is not None
        return float(ti.end_date.timestamp())
