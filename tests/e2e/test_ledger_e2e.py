"""The ledger's money path on a real Airflow cluster (scheduler, LocalExecutor workers, REST API), counted by
the simulator: every case must deliver and create no EvoLink task beyond the first.

Cases run one after the other on one cluster, since simulator faults apply to every request. A clear of a
*delivered* task (one new generation) and a retry after a worker SIGKILLed while it polls (no new one) are
the ``e2e_clearable`` and ``e2e_worker_crash`` cases of tests/e2e/test_airflow_e2e.py; a worker SIGKILLed
between its POST and the answer (the task created, only the intent recorded) is the last case here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from tests.e2e.airflow_cluster import AirflowCluster

pytestmark = pytest.mark.e2e

DAGS = [
    "e2e_ledger_refused",
    "e2e_ledger_chunked",
    "e2e_ledger_failed",
    "e2e_ledger_reread",
    "e2e_ledger_killed_at_post",
]
RUN_TIMEOUT = 240
REFUSED = {"kind": "status", "status": 403, "method": "GET", "path_prefix": "/media/"}
#: The simulator creates the task, then holds the POST's answer this long: the kill lands in that window.
ANSWER_HELD = {
    "kind": "slow",
    "method": "POST",
    "path_prefix": "/v1/videos/generations",
    "after_processing": True,
    "delay": 60,
    "count": 1,
}
READ_FAULTS = {
    "404": {"kind": "not_found", "method": "GET", "path_prefix": "/v1/tasks/", "count": 1},
    "503": {"kind": "status", "status": 503, "method": "GET", "path_prefix": "/v1/tasks/", "count": 5},
}


@dataclass
class Case:
    state: str
    posts: int
    tries: int
    result: Any = None
    created: int = 0
    keys: dict[str, int] | None = None


class Runner:
    def __init__(self, cluster: AirflowCluster) -> None:
        self.cluster = cluster

    def faults(self, *rules: dict[str, Any]) -> None:
        requests.post(f"{self.cluster.sim_url}/_simulator/faults", json={"rules": list(rules)}, timeout=5)

    def clear_faults(self) -> None:
        requests.delete(f"{self.cluster.sim_url}/_simulator/faults", timeout=5)

    def posts(self) -> int:
        return int(self.cluster.sim_stats()["requests"].get("POST /v1/videos/generations", 0))

    def run(self, dag_id: str, conf: dict[str, Any] | None = None) -> tuple[str, Case]:
        before = self.posts()
        run_id = self.cluster.trigger(dag_id, conf)
        state = self.cluster.wait_for_runs({dag_id: run_id}, RUN_TIMEOUT)[dag_id]
        return run_id, self.case(dag_id, run_id, state, before)

    def case(self, dag_id: str, run_id: str, state: str, before: int) -> Case:
        ti = self.cluster.task_instances(dag_id, run_id)["generate"]
        result = self.cluster.xcom(dag_id, run_id, "generate") if state == "success" else None
        return Case(state, self.posts() - before, ti.try_number, result)


def kill_between_post_and_answer(runner: Runner) -> Case:
    """SIGKILL the worker while EvoLink has created the task and its answer is on the way: only the intent
    (the key) is recorded, and the scheduler's retry must resend that key."""
    cluster, dag_id = runner.cluster, "e2e_ledger_killed_at_post"
    stats = cluster.sim_stats()
    before, created = runner.posts(), stats["tasks_created"]
    runner.faults(ANSWER_HELD)
    run_id = cluster.trigger(dag_id)

    def posted_unanswered() -> dict[str, Any] | None:
        ti = cluster.task_instances(dag_id, run_id).get("generate")
        record = cluster.task_state_store(dag_id, run_id, "generate").get("evolink_submission")
        if ti is None or ti.state != "running" or not record:
            return None
        return dict(record) if cluster.sim_stats()["tasks_created"] > created else None

    intent = cluster.wait_for(posted_unanswered, 180, "the POST to create the task, its answer held")
    assert intent.get("task_id") is None, "the kill must land before the answer is recorded"
    cluster.kill_worker(dag_id, run_id, "generate")
    state = cluster.wait_for_runs({dag_id: run_id}, RUN_TIMEOUT)[dag_id]
    runner.clear_faults()
    case = runner.case(dag_id, run_id, state, before)
    case.created = cluster.sim_stats()["tasks_created"] - created
    keys = cluster.sim_stats()["posts_by_idempotency_key"]
    case.keys = {intent["idempotency_key"]: keys.get(intent["idempotency_key"], 0)}
    return case


@pytest.fixture(scope="module")
def cases() -> Iterator[dict[str, Case]]:
    found: dict[str, Case] = {}
    with AirflowCluster(task_seconds=2, parallelism=4) as cluster:
        cluster.wait_for_dags(DAGS)
        runner = Runner(cluster)

        runner.faults({**REFUSED, "count": 1})
        found["403 once on a fresh link"] = runner.run("e2e_ledger_refused")[1]
        runner.clear_faults()

        runner.faults(
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
        found["chunked, 2nd download failed"] = runner.run("e2e_ledger_chunked")[1]
        runner.clear_faults()

        for name, fault in READ_FAULTS.items():
            found[f"{name} on the retry's task read"] = runner.run(
                "e2e_ledger_reread", {"retry_faults": [fault]}
            )[1]
            runner.clear_faults()

        runner.faults(REFUSED)
        run_id, failed = runner.run("e2e_ledger_failed")
        found["failed run (every link refused)"] = failed
        runner.clear_faults()
        before = runner.posts()
        cluster.clear("e2e_ledger_failed", run_id, ["generate"])
        state = cluster.wait_for_runs({"e2e_ledger_failed": run_id}, RUN_TIMEOUT)["e2e_ledger_failed"]
        found["clear of the failed task"] = runner.case("e2e_ledger_failed", run_id, state, before)

        found["killed between the POST and its answer"] = kill_between_post_and_answer(runner)
    print("e2e ledger cases:", {k: (v.state, v.posts, v.tries) for k, v in found.items()})
    yield found
    shutil.rmtree(cluster.home, ignore_errors=True)


def test_a_403_once_on_a_fresh_link_buys_nothing(cases: dict[str, Case]) -> None:
    case = cases["403 once on a fresh link"]
    assert (case.state, case.posts, case.tries) == ("success", 1, 2)
    assert len(case.result["files"]) == 1


def test_chunked_results_with_a_failed_second_download_are_delivered(cases: dict[str, Case]) -> None:
    case = cases["chunked, 2nd download failed"]
    assert (case.state, case.posts, case.tries) == ("success", 1, 2)
    assert len(case.result["files"]) == 2


@pytest.mark.parametrize("fault", sorted(READ_FAULTS))
def test_an_error_on_the_retrys_task_read_buys_nothing(cases: dict[str, Case], fault: str) -> None:
    case = cases[f"{fault} on the retry's task read"]
    assert (case.state, case.posts) == ("success", 1)
    assert case.tries >= 2


def test_a_clear_of_a_failed_task_whose_generation_completed_pays_nothing(cases: dict[str, Case]) -> None:
    failed, cleared = cases["failed run (every link refused)"], cases["clear of the failed task"]
    assert (failed.state, failed.posts) == ("failed", 1)
    assert (cleared.state, cleared.posts) == ("success", 0)
    assert len(cleared.result["files"]) == 1


def test_a_worker_killed_between_the_post_and_its_answer_buys_nothing(cases: dict[str, Case]) -> None:
    case = cases["killed between the POST and its answer"]
    assert (case.state, case.tries, case.created) == ("success", 2, 1)
    assert case.posts == 2 and case.keys is not None and list(case.keys.values()) == [2], "the key resent"
