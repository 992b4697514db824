"""Text to video, stored, then edited: the pipeline the README's demo runs.

Shows: ``EvolinkSeedanceTextToVideoOperator`` in deferrable mode streaming its result into storage
(``output_path``), and editing steps on the stored file with the bundled ffmpeg
(``evolink_provider.editing``): a trim, a caption band (watermark), and a thumbnail. The last task returns
the paths of the raw video, the edited video and the thumbnail.

Runs on the bundled simulator without a key and on EvoLink with ``evolink_default`` holding a real one.
Set the DAG param ``output_dir`` (or ``EVOLINK_DEMO_OUTPUT``) to choose where files go.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

# [START howto_evolink_text_to_video_edit]
with DAG(
    "example_evolink_text_to_video_edit",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A deferrable wait wants one retry: the scheduler can fail a task whose trigger fires soon after
    # its deferral (apache/airflow#66374), and the retry collects the paid video (the provider warns).
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    tags=["evolink", "example"],
    params={
        "prompt": "A paper boat sails across a rainy city street at dusk, cinematic, gentle camera push-in",
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
        return os.path.join(base, "text_to_video_edit", str(run_id).replace(":", "_").replace("+", "_"))

    folder = output_folder()

    generate = EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt="{{ params.prompt }}",
        duration=5,
        aspect_ratio="16:9",
        quality="720p",
        deferrable=True,
        output_path=folder,
    )

    @task
    def edit(generated: dict[str, Any], folder: str) -> dict[str, str]:
        """Trim to 4 s, burn in a caption band, and take a thumbnail from the edited cut."""
        import os

        from evolink_provider import editing

        raw = generated["files"][0]
        trimmed = editing.trim(raw, os.path.join(folder, "trimmed.mp4"), start=0.5, duration=4.0)
        edited = editing.add_watermark(trimmed, os.path.join(folder, "edited.mp4"), "Made with EvoLink")
        os.remove(trimmed)
        thumb = editing.thumbnail(edited, os.path.join(folder, "thumbnail.png"), at_seconds=1.0)
        return {"raw": raw, "edited": str(edited), "thumbnail": str(thumb)}

    edit(generate.output, folder)
# [END howto_evolink_text_to_video_edit]
