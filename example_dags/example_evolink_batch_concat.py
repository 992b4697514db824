"""A daily batch: prompts from a file, one generation each, then one reel and a contact sheet.

Shows: dynamic task mapping (``.partial(...).expand(prompt=...)``) over prompts read at run time from
``prompts.txt``, deferrable waits for all of them, results stored with ``output_path``, and editing steps
that concatenate the clips into one video and tile their thumbnails into a contact-sheet PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import EvolinkSeedanceTextToVideoOperator

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.txt"

# [START howto_evolink_batch_concat]
with DAG(
    "example_evolink_batch_concat",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A deferrable wait wants one retry: the scheduler can fail a task whose trigger fires soon after
    # its deferral (apache/airflow#66374), and the retry collects the paid video (the provider warns).
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    tags=["evolink", "example"],
    params={"output_dir": "", "prompts_file": str(PROMPTS_FILE)},
) as dag:

    @task
    def output_folder(params: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        import os
        import tempfile

        base = (params or {}).get("output_dir") or os.environ.get("EVOLINK_DEMO_OUTPUT")
        base = base or os.path.join(tempfile.gettempdir(), "evolink-demo")
        return os.path.join(base, "batch_concat", str(run_id).replace(":", "_").replace("+", "_"))

    @task
    def read_prompts(params: dict[str, Any] | None = None) -> list[str]:
        """One prompt per non-empty line; read when the run starts, not when the DAG is parsed."""
        text = Path((params or {})["prompts_file"]).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    folder = output_folder()
    clips = EvolinkSeedanceTextToVideoOperator.partial(
        task_id="generate", duration=4, aspect_ratio="16:9", deferrable=True, output_path=folder
    ).expand(prompt=read_prompts())

    @task
    def assemble(generated: list[dict[str, Any]], folder: str) -> dict[str, Any]:
        """Concatenate every clip into one reel and tile their thumbnails into a contact sheet."""
        import os

        from evolink_provider import editing

        videos = [item["files"][0] for item in generated]
        thumbs = [
            editing.thumbnail(video, os.path.join(folder, f"thumb-{index}.png"), at_seconds=1.0)
            for index, video in enumerate(videos)
        ]
        reel = editing.concat(videos, os.path.join(folder, "reel.mp4"))
        sheet = editing.contact_sheet(thumbs, os.path.join(folder, "contact_sheet.png"), columns=3)
        return {"clips": videos, "reel": str(reel), "contact_sheet": str(sheet)}

    assemble(clips.output, folder)
# [END howto_evolink_batch_concat]
