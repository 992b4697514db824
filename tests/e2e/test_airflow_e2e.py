"""End to end on a real Airflow: scheduler, dag-processor, triggerer and api-server against the simulator.

One module-scoped session triggers every example DAG and the two recovery DAGs, kills a worker mid-wait
and restarts the triggerer mid-wait, then the tests below check what happened.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.editing import probe
from tests.e2e.airflow_cluster import AirflowCluster, files_containing
from tests.e2e.dags.e2e_evolink_recovery import TRIGGERER_RESTART_PROMPT, WORKER_CRASH_PROMPT

pytestmark = pytest.mark.e2e

EXAMPLES = [
    "example_evolink_text_to_video_edit",
    "example_evolink_reference_images",
    "example_evolink_character_to_video",
    "example_evolink_batch_concat",
]
RECOVERY = ["e2e_worker_crash", "e2e_triggerer_restart"]
DEFERRABLE_TASKS = {
    ("example_evolink_text_to_video_edit", "generate"),
    ("example_evolink_reference_images", "generate"),
    ("example_evolink_character_to_video", "extract_character"),
    ("e2e_triggerer_restart", "generate"),
}


@dataclass
class Outcome:
    cluster: AirflowCluster
    runs: dict[str, str]
    states: dict[str, str]
    stats: dict[str, Any]
    killed_pid: int | None = None
    triggerer_restarted: bool = False
    leaked_into: list[Path] = field(default_factory=list)
    import_errors: list[Any] = field(default_factory=list)


def kill_worker_mid_wait(cluster: AirflowCluster, dag_id: str, run_id: str) -> int:
    """Wait until the sync task is polling, then SIGKILL its task process (a crashed worker)."""

    def running_pid() -> int | None:
        state, _, pid = cluster.task_rows(dag_id, run_id).get("generate", (None, 0, None))
        submitted = cluster.sim_stats()["tasks_by_prompt"].get(WORKER_CRASH_PROMPT, 0)
        return pid if state == "running" and pid and submitted else None

    pid = int(cluster.wait_for(running_pid, 180, "the sync task to submit and start waiting"))
    os.kill(pid, signal.SIGKILL)
    return pid


def restart_triggerer_mid_wait(cluster: AirflowCluster, dag_id: str, run_id: str) -> None:
    def deferred() -> bool:
        return cluster.task_rows(dag_id, run_id).get("generate", ("",))[0] == "deferred"

    cluster.wait_for(deferred, 180, "the deferrable task to be deferred")
    cluster.restart_triggerer()


@pytest.fixture(scope="module")
def outcome() -> Iterator[Outcome]:
    with AirflowCluster() as cluster:
        cluster.wait_for_dags(set(EXAMPLES + RECOVERY))
        runs = {dag_id: cluster.trigger(dag_id) for dag_id in RECOVERY}
        killed = kill_worker_mid_wait(cluster, "e2e_worker_crash", runs["e2e_worker_crash"])
        restart_triggerer_mid_wait(cluster, "e2e_triggerer_restart", runs["e2e_triggerer_restart"])
        runs.update({dag_id: cluster.trigger(dag_id) for dag_id in EXAMPLES})
        states = {
            dag_id: cluster.wait_for_run(dag_id, run_id, timeout=420) for dag_id, run_id in runs.items()
        }
        result = Outcome(
            cluster,
            runs,
            states,
            cluster.sim_stats(),
            killed_pid=killed,
            triggerer_restarted=True,
            import_errors=cluster.query("select filename, stacktrace from import_error"),
        )
        failures = {d: cluster.task_rows(d, r) for d, r in runs.items() if states[d] != "success"}
        if failures:
            print("FAILED RUNS", failures)
            for name in ("scheduler", "triggerer"):
                print(f"--- {name} log ---\n{cluster.log_tail(name)}")
    result.leaked_into = files_containing(cluster.home, cluster.api_key)
    yield result


def test_no_dag_has_an_import_error(outcome: Outcome) -> None:
    assert outcome.import_errors == []


def test_every_run_succeeded(outcome: Outcome) -> None:
    assert outcome.states == dict.fromkeys(outcome.runs, "success")


def test_deferrable_tasks_went_through_the_triggerer(outcome: Outcome) -> None:
    for key in DEFERRABLE_TASKS:
        assert "deferred" in outcome.cluster.states_seen[key], (key, outcome.cluster.states_seen[key])
    assert outcome.cluster.max_triggers >= 1, "no trigger row was ever seen in the metadata DB"


def test_edited_video_thumbnail_and_reel_are_real(outcome: Outcome) -> None:
    cluster = outcome.cluster
    edit = cluster.xcom(
        "example_evolink_text_to_video_edit", outcome.runs["example_evolink_text_to_video_edit"], "edit"
    )
    edited = probe(edit["edited"])
    assert edited.duration == pytest.approx(4.0, abs=0.3)
    assert (edited.width, edited.height) == (1280, 720)
    assert Path(edit["thumbnail"]).stat().st_size > 0
    batch = cluster.xcom(
        "example_evolink_batch_concat", outcome.runs["example_evolink_batch_concat"], "assemble"
    )
    assert probe(batch["reel"]).duration == pytest.approx(12.0, abs=0.5)
    assert Path(batch["contact_sheet"]).stat().st_size > 0


def test_killed_worker_reattached_with_one_post(outcome: Outcome) -> None:
    rows = outcome.cluster.task_rows("e2e_worker_crash", outcome.runs["e2e_worker_crash"])
    state, tries, _ = rows["generate"]
    assert outcome.killed_pid
    assert (state, tries >= 2) == ("success", True), rows
    assert outcome.stats["tasks_by_prompt"][WORKER_CRASH_PROMPT] == 1


def test_triggerer_restart_resumed_with_one_post(outcome: Outcome) -> None:
    assert outcome.triggerer_restarted
    assert outcome.stats["tasks_by_prompt"][TRIGGERER_RESTART_PROMPT] == 1


def test_no_idempotency_key_ever_created_two_tasks(outcome: Outcome) -> None:
    assert all(len(ids) == 1 for ids in outcome.stats["tasks_by_idempotency_key"].values())


def test_the_api_key_appears_nowhere_in_airflow_home(outcome: Outcome) -> None:
    assert outcome.leaked_into == []


def test_the_leak_check_can_fail(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "task.log").write_text("Authorization: Bearer sk-sim-e2e-planted")
    assert files_containing(tmp_path, "sk-sim-e2e-planted") == [tmp_path / "logs" / "task.log"]
