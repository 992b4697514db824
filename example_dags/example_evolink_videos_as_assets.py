"""Generated videos announced as Airflow assets: generate, store, one asset event per stored file.

Shows: ``asset_alias`` on a generation operator. Which files a generation writes is known only when it
ends, so the operator announces them through an ``AssetAlias``: each file stored under ``output_path``
becomes one asset event (URI ``file:///...`` here, ``s3://...`` for a bucket) whose ``extra`` carries the
EvoLink task id, the model, the prompt's sha256, the duration, the size and the credits. The task view
shows extra links to the result video (and to the stored file where its storage has a web address).
``example_evolink_publish_new_videos`` is scheduled on the alias and runs on every new video.

Runs on the bundled simulator without a key and on EvoLink with ``evolink_default`` holding a real one.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

#: The alias new videos are announced on; the publishing DAG is scheduled on it.
VIDEOS_ALIAS = "evolink_videos"

# [START howto_evolink_videos_as_assets]
with DAG(
    "example_evolink_videos_as_assets",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A deferrable wait wants one retry: the scheduler can fail a task whose trigger fires soon after
    # its deferral (apache/airflow#66374), and the retry collects the paid video (the provider warns).
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    tags=["evolink", "example", "assets"],
    params={
        "prompt": "A lighthouse beam sweeps over a stormy sea at night, waves crashing, cinematic",
        "output_dir": "",
    },
) as dag:

    @task
    def output_folder(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        """One folder per run, so runs never overwrite each other."""
        import os
        import tempfile

        base = (params or {}).get("output_dir") or os.environ.get("EVOLINK_DEMO_OUTPUT")
        base = base or os.path.join(tempfile.gettempdir(), "evolink-demo")
        return os.path.join(base, "videos_as_assets", str(run_id).replace(":", "_").replace("+", "_"))

    EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt="{{ params.prompt }}",
        duration=4,
        aspect_ratio="16:9",
        quality="720p",
        deferrable=True,
        output_path=output_folder(),
        asset_alias=VIDEOS_ALIAS,
    )
# [END howto_evolink_videos_as_assets]
