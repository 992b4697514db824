"""DAGs whose inputs break EvoLink's documented rules: each must fail before any EvoLink call.

The images are written by ``tests/test_input_rules.py`` into ``rule_images/`` beside this file (inside
the DAGs folder, where local inputs may be uploaded from) before a run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG

from evolink_provider.operators.evolink import (
    EvolinkHappyHorseReferenceToVideoOperator,
    EvolinkHappyHorseTextToVideoOperator,
    EvolinkVideoGenerationOperator,
)

START = pendulum.datetime(2026, 1, 1, tz="UTC")
RULE_IMAGES = Path(__file__).resolve().parent / "rule_images"
DAGS: dict[str, DAG] = {}
#: Retries are allowed: a refusal must not spend them (AirflowFailException).
COMMON: dict[str, Any] = {"retries": 2, "retry_delay": 0, "poll_interval": 0.2, "max_poll_interval": 1.0}


def new_dag(dag_id: str) -> DAG:
    # As in evolink_test_dags.py: a test's parse registers only the DAG it runs.
    wanted = os.environ.get("EVOLINK_TEST_ONLY_DAGS")
    register = wanted is None or dag_id in wanted.split(",")
    DAGS[dag_id] = DAG(dag_id, schedule=None, start_date=START, catchup=False, auto_register=register)
    return DAGS[dag_id]


with new_dag("evolink_image_rules_refused"):
    EvolinkHappyHorseReferenceToVideoOperator(
        task_id="small_reference",
        prompt="character1 waves",
        image_urls=[str(RULE_IMAGES / "small-128.png")],
        **COMMON,
    )
    EvolinkVideoGenerationOperator(
        task_id="wide_frame",
        model="happyhorse-1.0-image-to-video",
        image_urls=[str(RULE_IMAGES / "wide-9-to-1.png")],
        **COMMON,
    )
    EvolinkHappyHorseReferenceToVideoOperator(
        task_id="heavy_reference",
        prompt="character1 waves",
        image_urls=[str(RULE_IMAGES / "heavy-12mb.png")],
        **COMMON,
    )

with new_dag("evolink_image_rules_warned"):
    EvolinkHappyHorseReferenceToVideoOperator(
        task_id="small_reference",
        prompt="character1 waves",
        image_urls=[str(RULE_IMAGES / "small-128.png")],
        local_checks="warn",
        **COMMON,
    )

with new_dag("evolink_prompt_refused"):
    EvolinkHappyHorseTextToVideoOperator(
        task_id="long_prompt", prompt="a paper boat " * 700, prompt_policy="refuse", **COMMON
    )

#: The example DAGs' reference images (copied into the test DAGs folder with them).
ASSETS = Path(__file__).resolve().parent / "assets"

with new_dag("evolink_upload_once_mapped"):
    from evolink_provider.operators.upload import EvolinkUploadImagesOperator

    upload = EvolinkUploadImagesOperator(
        task_id="upload",
        images=[str(ASSETS / "hero.png"), str(ASSETS / "sidekick.png"), (ASSETS / "robot.png").as_uri()],
        model="happyhorse-1.0-reference-to-video",
    )
    EvolinkHappyHorseReferenceToVideoOperator.partial(
        task_id="generate",
        prompt="character1, character2 and character3 wave",
        image_urls=upload.output["images"],
        wait_for_completion=False,
    ).expand(seed=list(range(1, 51)))
