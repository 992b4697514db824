"""A generation stored in S3 through an Airflow connection named in the path (``s3://conn_id@bucket/...``),
announced as asset events; ``tests/test_s3_storage.py`` runs it against a moto S3 server."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, task

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

S3_CONN_ID = "evolink_test_s3"
BUCKET = "evolink-videos"
DAGS: dict[str, DAG] = {}
LOGICAL_DATE = pendulum.datetime(2026, 1, 1, tz="UTC")
#: The EvoLink task id the simulator is told to issue, so that the consumer can name the stored object.
PRODUCED_TASK_ID = "task-unified-1767225600-s3consumer"
#: What a user writes for the stored file: the object, without the connection id.
PRODUCED_URI = f"s3://{BUCKET}/content/2026-01-01/take+1:a/{PRODUCED_TASK_ID}-0.mp4"

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


with DAG("evolink_consume_s3_video", schedule=[Asset(PRODUCED_URI)], start_date=LOGICAL_DATE) as consumer:

    @task(inlets=[Asset(PRODUCED_URI)])
    def read_stored_video(inlet_events: Any = None) -> dict[str, Any] | None:
        """Open the latest event's asset by its URI (the object, no connection id in it) through the
        connection that can read the bucket; ``None`` before anything was produced."""
        from airflow.sdk import ObjectStoragePath

        events = inlet_events[Asset(PRODUCED_URI)]
        if not events:
            return None
        uri = events[-1].asset.uri
        with ObjectStoragePath(uri, conn_id=S3_CONN_ID).open("rb") as stored:
            head = stored.read(12)
        return {"uri": uri, "box": head[4:8].decode("latin-1")}

    read_stored_video()
DAGS[consumer.dag_id] = consumer

# The README's S3-in/S3-out reel pipeline ("Run it on a real Airflow"), with the test's connection.
with DAG("evolink_s3_reel", schedule=None, start_date=LOGICAL_DATE) as reel_dag:
    from evolink_provider.editing import concat

    generate = EvolinkSeedanceTextToVideoOperator.partial(
        task_id="generate",
        output_path=f"s3://{S3_CONN_ID}@{BUCKET}/clips/{{{{ ds }}}}",
        duration=4,
        poll_interval=0.2,
        max_poll_interval=1.0,
    ).expand(prompt=["a paper boat in the rain", "a lighthouse at dusk", "a fox in the snow"])

    @task
    def reel(generations: list[dict], ds: str | None = None) -> str:
        clips = [generation["files"][0] for generation in generations]
        return str(concat(clips, f"s3://{S3_CONN_ID}@{BUCKET}/reels/{ds}.mp4", width=320, height=180))

    reel(generate.output)
DAGS[reel_dag.dag_id] = reel_dag
