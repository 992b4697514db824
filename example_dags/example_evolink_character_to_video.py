"""A character extracted with sora-character, then cast as ``character1`` of a HappyHorse video.

Shows: chaining models through XCom. A short Seedance clip (or the DAG param ``source_video_url``) is the
source; ``EvolinkSoraCharacterOperator`` returns ``result_data.character_name`` and
``profile_picture_url``; the picture feeds ``EvolinkHappyHorseReferenceToVideoOperator``; the last task
keeps the character name and the video in the run's output, with the credits the run's three generations
used (one ``xcom_pull``). sora-character availability depends on the
EvoLink account (its page left the public docs in 2026-05).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import (
    EvolinkHappyHorseReferenceToVideoOperator,
    EvolinkSeedanceTextToVideoOperator,
    EvolinkSoraCharacterOperator,
)

# [START howto_evolink_character_to_video]
with DAG(
    "example_evolink_character_to_video",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    # A deferrable wait wants one retry: the scheduler can fail a task whose trigger fires soon after
    # its deferral (apache/airflow#66374), and the retry collects the paid video (the provider warns).
    default_args={"retries": 1, "retry_delay": pendulum.duration(seconds=30)},
    tags=["evolink", "example"],
    params={"source_video_url": ""},
) as dag:
    source_clip = EvolinkSeedanceTextToVideoOperator(
        task_id="source_clip",
        prompt="A friendly lighthouse keeper waves at the camera, medium shot, soft daylight",
        duration=4,
        aspect_ratio="16:9",
        deferrable=True,
    )

    extract_character = EvolinkSoraCharacterOperator(
        task_id="extract_character",
        video_url="{{ params.source_video_url or ti.xcom_pull(task_ids='source_clip')['results'][0] }}",
        timestamps="0,2",
        deferrable=True,
    )

    cast = EvolinkHappyHorseReferenceToVideoOperator(
        task_id="cast_character",
        prompt="character1 walks along a windy pier at sunrise and looks out to sea",
        image_urls=["{{ ti.xcom_pull(task_ids='extract_character')['result_data']['profile_picture_url'] }}"],
        duration=4,
        deferrable=True,
    )

    @task
    def summarize(character: dict[str, Any], video: dict[str, Any], ti: Any = None) -> dict[str, Any]:
        """What the run produced (the reusable character name and the video it starred in) and spent."""
        generations = ti.xcom_pull(task_ids=["source_clip", "extract_character", "cast_character"])
        return {
            "character_name": character["character_name"],
            "video": video["result_urls"][0],
            "credits_used": sum(generation["credits"]["used"] or 0 for generation in generations),
        }

    source_clip >> extract_character >> cast
    summarize(extract_character.output, cast.output)
# [END howto_evolink_character_to_video]
