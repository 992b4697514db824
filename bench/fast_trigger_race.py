"""How soon after a deferral may a trigger fire? The window behind the trigger hold, measured.

Airflow 3.2-3.3's scheduler can fail a task instance whose trigger fires seconds after the deferral
(apache/airflow#66374, #67287, #71580, #72716): the stale "success" of the worker's defer-exit is processed
after the task was resumed. This runs a real cluster (``tests/e2e/airflow_cluster.py``: api-server,
scheduler, dag-processor, triggerer, LocalExecutor) once per delay given, with 200 mapped deferrable
generations of 1-5 s and ``retries=0``, every one deferred (no wait on the worker) and its trigger allowed
to fire ``delay`` seconds after the deferral, and counts the task instances that did not succeed. Then it
clears those through the REST API (as a user would) and counts what that cost: the simulator's POSTs and
EvoLink tasks beyond one per prompt (a lost race should cost no second video: the ledger picks the paid
generation up).

    python bench/fast_trigger_race.py 0 15      # about 5 minutes per delay on a 2-core machine

The provider's hold and wait-on-worker window are set through the test-only timing variable of
:mod:`evolink_provider.timing`, which every process of the cluster reads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evolink_provider.timing import TEST_TIMING_ENV
from tests.e2e.airflow_cluster import AirflowCluster

GENERATIONS = 200
DAG_SOURCE = """
import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

with DAG("race_{name}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         max_active_tasks=64):
    EvolinkSeedanceTextToVideoOperator.partial(
        task_id="generate", duration=4, deferrable=True, poll_interval=1, max_poll_interval=2, retries=0
    ).expand(prompt=[f"Race {{i}} [sim:seconds={{1 + i % 5}}] [sim:estimate=1]" for i in range({count})])
"""


def measure(delay: float) -> tuple[int, int, float, int, int]:
    """(failed task instances, deferred ones, seconds, extra generations after clearing the failed ones,
    task instances still not successful after that clear) for one run at ``delay``."""
    name = str(delay).replace(".", "_")
    dag_id = f"race_{name}"
    source = DAG_SOURCE.format(name=name, count=GENERATIONS)
    # Every generation defers (no wait on the worker), and its trigger may fire ``delay`` s after.
    timing = json.dumps({"trigger_hold": float(delay), "wait_on_worker_window": 0.0})
    with AirflowCluster(
        extra_dag_sources={f"{dag_id}.py": source}, extra_env={TEST_TIMING_ENV: timing}
    ) as cluster:
        cluster.wait_for_dags([dag_id])
        began = time.monotonic()
        run_id = cluster.trigger(dag_id)
        cluster.wait_for_runs({dag_id: run_id}, timeout=1800)
        elapsed = time.monotonic() - began
        instances = cluster.task_instances(dag_id, run_id)
        failed = sum(1 for ti in instances.values() if ti.state != "success")
        deferred = sum(
            1 for i in range(GENERATIONS) if "deferred" in cluster.seen((dag_id, run_id, "generate", i))
        )
        if failed:
            cluster.clear(dag_id, run_id, ["generate"], only_failed=True)
            cluster.wait_for_runs({dag_id: run_id}, timeout=1800)
        extra = _generations(cluster.sim_stats()) - GENERATIONS
        unrecovered = sum(
            1 for ti in cluster.task_instances(dag_id, run_id).values() if ti.state != "success"
        )
    return failed, deferred, elapsed, extra, unrecovered


def _generations(stats: dict[str, object]) -> int:
    """EvoLink tasks the simulator created (a replayed Idempotency-Key creates none)."""
    created = stats.get("tasks_created")
    assert isinstance(created, int)
    return created


def main() -> None:
    delays = [float(arg) for arg in sys.argv[1:]] or [0.0, 15.0]
    print(
        "| trigger may fire after deferral | task instances failed | deferred | run time "
        "| extra generations after clearing them | still failed after the clear |"
    )
    print("|---|---|---|---|---|---|")
    for delay in delays:
        failed, deferred, elapsed, extra, unrecovered = measure(delay)
        print(
            f"| {delay:.0f} s | {failed} of {GENERATIONS} | {deferred} | {elapsed:.0f} s | {extra} "
            f"| {unrecovered} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
