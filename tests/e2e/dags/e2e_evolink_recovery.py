"""End-to-end recovery DAGs: a generation that must survive a killed worker, and one that must survive a
triggerer restart, each without a second submission."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

WORKER_CRASH_PROMPT = "A lighthouse survives a storm (worker crash) [sim:seconds=40]"
TRIGGERER_RESTART_PROMPT = "A lighthouse survives a storm (triggerer restart) [sim:seconds=40]"

for dag_id, prompt, deferrable in (
    ("e2e_worker_crash", WORKER_CRASH_PROMPT, False),
    ("e2e_triggerer_restart", TRIGGERER_RESTART_PROMPT, True),
):
    with DAG(dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
        EvolinkSeedanceTextToVideoOperator(
            task_id="generate",
            prompt=prompt,
            duration=4,
            deferrable=deferrable,
            poll_interval=1,
            max_poll_interval=3,
            retries=2,
            retry_delay=timedelta(seconds=2),
        )
