"""HappyHorse reference-to-video from three reference images kept in storage.

Shows: image inputs given as local paths (or any ``ObjectStoragePath`` URI such as ``s3://...``); the
operator uploads them through EvoLink's Files API before submitting, and the prompt names them
``character1``, ``character2`` and ``character3`` in list order. The result is stored with ``output_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import EvolinkHappyHorseReferenceToVideoOperator

ASSETS = Path(__file__).resolve().parent / "assets"

# [START howto_evolink_reference_images]
with DAG(
    "example_evolink_reference_images",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A deferrable wait wants one retry: the scheduler can fail a task whose trigger fires soon after
    # its deferral (apache/airflow#66374), and the retry collects the paid video (the provider warns).
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    tags=["evolink", "example"],
    params={"output_dir": ""},
) as dag:

    @task
    def output_folder(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        import os
        import tempfile

        base = (params or {}).get("output_dir") or os.environ.get("EVOLINK_DEMO_OUTPUT")
        base = base or os.path.join(tempfile.gettempdir(), "evolink-demo")
        return os.path.join(base, "reference_images", str(run_id).replace(":", "_").replace("+", "_"))

    EvolinkHappyHorseReferenceToVideoOperator(
        task_id="generate",
        prompt=(
            "character1, character2 and character3 meet on a rooftop garden at golden hour "
            "and raise their cups in a toast"
        ),
        image_urls=[str(ASSETS / "hero.png"), str(ASSETS / "sidekick.png"), (ASSETS / "robot.png").as_uri()],
        duration=4,
        aspect_ratio="16:9",
        deferrable=True,
        output_path=output_folder(),
    )
# [END howto_evolink_reference_images]
