"""DAGs for tests/test_assets.py: a hostile answer's links and result URLs, run through dag.test()."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkVideoGenerationOperator

with DAG(
    "evolink_hostile_result_links",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
) as hostile_links:
    EvolinkVideoGenerationOperator(
        task_id="generate",
        evolink_conn_id="evolink_hostile",
        model="seedance-2.0-fast-text-to-video",
        prompt="a hostile server answers this one",
        poll_interval=0.1,
        max_poll_interval=0.1,
        timeout=60,
        asset_alias="evolink_test_result_urls",
        announce_result_urls=True,
    )
