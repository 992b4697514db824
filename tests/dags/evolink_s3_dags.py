"""A generation stored in S3 through an Airflow connection named in the path (``s3://conn_id@bucket/...``),
announced as asset events; ``tests/test_s3_storage.py`` runs it against a moto S3 server."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

S3_CONN_ID = "evolink_test_s3"
BUCKET = "evolink-videos"
DAGS: dict[str, DAG] = {}

with DAG("evolink_store_in_s3", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt="a paper boat in the rain",
        duration=4,
        # A key with "+" and ":" (valid S3 characters) to check the links' encoding.
        output_path=f"s3://{S3_CONN_ID}@{BUCKET}/content/{{{{ ds }}}}/take+1:a",
        asset_alias="evolink_s3_videos",
        poll_interval=0.2,
        max_poll_interval=1.0,
    )
DAGS[dag.dag_id] = dag
