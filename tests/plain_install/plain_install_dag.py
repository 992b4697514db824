"""A DAG run inside a fresh virtualenv holding only the wheel (no extras): see tests/test_packaging.py.

Run as a script from the DAGs folder; prints one JSON line with the stored files and where the provider
was imported from.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pendulum
from airflow.sdk import DAG

import evolink_provider
from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

OUTPUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/evolink-plain-install"

with DAG("plain_install", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt="A paper boat sails across a rainy street",
        duration=4,
        aspect_ratio="16:9",
        poll_interval=0.2,
        max_poll_interval=1.0,
        output_path=OUTPUT,
        deferrable=True,
    )

if __name__ == "__main__":
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    run = dag.test()
    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id="plain_install", key="return_value").one()
        result = XComModel.deserialize_value(row)
    print(
        json.dumps(
            {
                "state": str(run.state),
                "files": result.get("files"),
                "provider": evolink_provider.__file__,
                "imageio_ffmpeg": importlib.util.find_spec("imageio_ffmpeg") is not None,
            }
        )
    )
