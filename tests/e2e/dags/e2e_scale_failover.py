"""Scale and failover on the production-shaped cluster (tests/e2e/test_celery_cluster.py).

Two DAGs, the same but for the connection: ``e2e_scale_batch_polling`` polls through ``evolink_default``
(``batch_polling`` on), ``e2e_scale_single_reads`` through ``evolink_single_reads`` (off). Each maps 200
deferrable generations of 20-60 s and 4 synchronous ones (``deferrable=False``) of 45-60 s, so
one run measures what a worker slot costs per generation in both modes. Every prompt is unique: the
simulator counts the tasks created per prompt, which must be exactly one each although the test SIGKILLs a
triggerer and a Celery worker mid-run (the retries reattach to the submitted task).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

DEFERRABLE_GENERATIONS = 200
SYNC_GENERATIONS = 4
SCALE_DAGS = {"e2e_scale_batch_polling": "evolink_default", "e2e_scale_single_reads": "evolink_single_reads"}
LONGEST_SECONDS = 60


def seconds_of(index: int) -> int:
    """20-60 s, spread over the map indexes."""
    return 20 + (index * 7) % (LONGEST_SECONDS - 20 + 1)


def sync_seconds_of(index: int) -> int:
    """The longest durations, so that the test finds one running when it kills a worker."""
    return LONGEST_SECONDS - 5 * index


def prompts(dag_id: str, kind: str, count: int) -> list[str]:
    # An honest estimate above the operators' 15 s wait-on-worker window: deferrable tasks defer at once.
    seconds = sync_seconds_of if kind == "sync" else seconds_of
    return [
        f"{dag_id} {kind} take {i} [sim:seconds={seconds(i)}] [sim:estimate={seconds(i)}]"
        for i in range(count)
    ]


for dag_id, conn_id in SCALE_DAGS.items():
    with DAG(
        dag_id,
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_tasks=256,
        default_args={"retries": 3, "retry_delay": timedelta(seconds=5)},
    ):
        EvolinkSeedanceTextToVideoOperator.partial(
            task_id="generate_deferrable",
            evolink_conn_id=conn_id,
            duration=4,
            deferrable=True,
            poll_interval=5,
            max_poll_interval=10,
        ).expand(prompt=prompts(dag_id, "deferrable", DEFERRABLE_GENERATIONS))
        EvolinkSeedanceTextToVideoOperator.partial(
            task_id="generate_sync",
            evolink_conn_id=conn_id,
            duration=4,
            deferrable=False,
            priority_weight=10,  # started early, while the triggerers fill up
            poll_interval=5,
            max_poll_interval=10,
        ).expand(prompt=prompts(dag_id, "sync", SYNC_GENERATIONS))
