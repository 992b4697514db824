"""End-to-end clear: a short generation that the test clears through the REST API once it has finished,
as a user's Clear in the UI does; the cleared task must submit a new generation on the same run."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

with DAG("e2e_clearable", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False):
    EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt="A take to do again [sim:seconds=2]",
        duration=4,
        poll_interval=1,
        max_poll_interval=3,
    )
