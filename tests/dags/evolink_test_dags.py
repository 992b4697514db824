"""DAGs the operator tests run with ``dag.test()`` against the simulator (one per scenario and mode).

Each DAG ends in a check task that reads what the EvoLink task handed downstream through XCom, so a
run only succeeds when the values a user's next step would use are really there.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from typing import Any

import pendulum
import requests
from airflow.sdk import DAG, task

from evolink_provider.operators.evolink import (
    EvolinkHappyHorseReferenceToVideoOperator,
    EvolinkHappyHorseTextToVideoOperator,
    EvolinkSeedanceTextToVideoOperator,
    EvolinkSoraCharacterOperator,
    EvolinkVideoGenerationOperator,
)
from evolink_provider.sensors.evolink import EvolinkTaskSensor

START = pendulum.datetime(2026, 1, 1, tz="UTC")
#: Every DAG of this file by id, for the tests to run.
DAGS: dict[str, DAG] = {}
FAST = {"poll_interval": 0.2, "max_poll_interval": 1.0}
IMAGES = [
    "https://images.example.com/hero.png",
    "https://images.example.com/sidekick.jpg",
]


class NotThisRun(Exception):
    """Raised by :func:`new_dag` for a DAG a test's parse does not need; ``with suppress(NotThisRun),
    new_dag(...)`` then skips the block (building every DAG took 50 ms of each run's parse)."""


def new_dag(dag_id: str, **kwargs: Any) -> DAG:
    # A test's parse builds and registers only the DAG it runs: dag.test() parses the file and serializes
    # and stores every DAG its parse registers, on every call (tests/conftest.py, ONLY_DAGS_ENV). Unset:
    # every DAG, registered; empty (the test process's own import): every DAG, none registered.
    wanted = os.environ.get("EVOLINK_TEST_ONLY_DAGS")
    if wanted and dag_id not in wanted.split(","):
        raise NotThisRun(dag_id)
    DAGS[dag_id] = DAG(
        dag_id, schedule=None, start_date=START, catchup=False, auto_register=wanted != "", **kwargs
    )
    return DAGS[dag_id]


@task
def check_video(generated: dict[str, Any]) -> str:
    """Downstream step: the task object has a playable result URL."""
    assert generated["status"] == "completed", generated
    url = generated["results"][0]
    head = requests.get(url, timeout=10, stream=True)
    assert head.status_code == 200 and head.headers["Content-Type"] == "video/mp4", url
    return str(url)


@task
def check_character(generated: dict[str, Any]) -> str:
    """Downstream step: the character name and its picture are there."""
    data = generated["result_data"]
    assert data["character_name"].startswith("chr_"), data
    assert requests.get(data["profile_picture_url"], timeout=10).status_code == 200
    return str(data["character_name"])


def seedance(mode: str, **kwargs: Any) -> EvolinkSeedanceTextToVideoOperator:
    return EvolinkSeedanceTextToVideoOperator(
        task_id="generate",
        prompt=kwargs.pop("prompt", "A paper boat sails across a rainy street, cinematic"),
        duration=kwargs.pop("duration", 4),
        deferrable=mode == "deferrable",
        **FAST,
        **kwargs,
    )


for mode in ("sync", "deferrable"):
    with suppress(NotThisRun), new_dag(f"evolink_seedance_{mode}"):
        # 2 s, beyond the first poll: a poll sees it running (its progress line is checked).
        prompt = "A paper boat sails across a rainy street, cinematic [sim:seconds=2]"
        check_video(seedance(mode, prompt=prompt, aspect_ratio="16:9").output)

    with suppress(NotThisRun), new_dag(f"evolink_happyhorse_{mode}"):
        happyhorse = EvolinkHappyHorseReferenceToVideoOperator(
            task_id="generate",
            prompt="character1 hands character2 a glowing lantern in a snowy forest",
            image_urls=IMAGES,
            quality="720p",
            aspect_ratio="4:5",
            duration=3,
            deferrable=mode == "deferrable",
            **FAST,
        )
        check_video(happyhorse.output)

    with suppress(NotThisRun), new_dag(f"evolink_happyhorse_text_{mode}"):
        horse = EvolinkHappyHorseTextToVideoOperator(
            task_id="generate",
            prompt="A wooden horse gallops along a moonlit beach",
            aspect_ratio="9:21",
            duration="{{ 1 + 2 }}",
            model="happyhorse-1.1-text-to-video",
            deferrable=mode == "deferrable",
            **FAST,
        )
        check_video(horse.output)

    with suppress(NotThisRun), new_dag(f"evolink_sora_character_{mode}"):
        sora = EvolinkSoraCharacterOperator(
            task_id="generate",
            video_url="https://videos.example.com/actor.mp4",
            timestamps="1,3",
            deferrable=mode == "deferrable",
            **FAST,
        )
        check_character(sora.output)

    with suppress(NotThisRun), new_dag(f"evolink_generic_{mode}"):
        known = EvolinkVideoGenerationOperator(
            task_id="generate",
            model="seedance-2.0-text-to-video",
            prompt="Northern lights over a frozen lake",
            quality="1080p",
            duration=4,
            deferrable=mode == "deferrable",
            **FAST,
        )
        unknown = EvolinkVideoGenerationOperator(
            task_id="generate_future_model",
            model="evolink-future-video-2",
            prompt="A hummingbird in slow motion",
            request_fields={"duration": 4, "style": "documentary"},
            deferrable=mode == "deferrable",
            **FAST,
        )
        check_video(known.output)
        check_video.override(task_id="check_future_model")(unknown.output)

    with suppress(NotThisRun), new_dag(f"evolink_reattach_{mode}"):
        # Each try gives up waiting after 0.5 s (as a crashed worker would stop waiting) while the task
        # takes 3 s: every retry must reattach to the same EvoLink task, never submit a second one.
        check_video(
            seedance(
                mode, prompt="reattach me [sim:seconds=3]", timeout=0.5, retries=10, retry_delay=0
            ).output
        )

    with suppress(NotThisRun), new_dag(f"evolink_sensor_{mode}"):
        submitted = seedance("sync", wait_for_completion=False)
        waited = EvolinkTaskSensor(
            task_id="wait",
            evolink_task_id="{{ ti.xcom_pull(task_ids='generate')['id'] }}",
            poke_interval=0.2,
            max_poll_interval=1.0,
            timeout=60,
            mode="reschedule" if mode == "sync" else "poke",
            deferrable=mode == "deferrable",
        )
        submitted >> waited
        check_video(waited.output)

with suppress(NotThisRun), new_dag("evolink_min_credits"):
    # The balance is set by the test (the simulator's credits control); retries must not be burnt.
    check_video(seedance("sync", min_credits=50, retries=2, retry_delay=0).output)

with suppress(NotThisRun), new_dag("evolink_reattach_min_credits"):
    # Only the first try submits, so only it reads the balance; the retries reattach and spend nothing.
    seedance(
        "sync", prompt="reattach me [sim:seconds=3]", timeout=0.5, retries=10, retry_delay=0, min_credits=1
    )

with suppress(NotThisRun), new_dag("evolink_bad_input"):
    seedance("sync", duration=99, retries=2, retry_delay=0)

with suppress(NotThisRun), new_dag("evolink_templated_fields", params={"seconds": 6}):
    check_video(seedance("sync", duration="{{ params.seconds }}", generate_audio="{{ 'false' }}").output)

with suppress(NotThisRun), new_dag("evolink_content_blocked"):
    seedance("sync", prompt="forbidden [sim:fail=content_policy_violation]", retries=2, retry_delay=0)

with suppress(NotThisRun), new_dag("evolink_transient_failure"):
    check_video(
        seedance("sync", prompt="flaky upstream [sim:fail=service_error:1]", retries=1, retry_delay=0).output
    )

with suppress(NotThisRun), new_dag("evolink_wait_timeout"):
    seedance("sync", prompt="never ends [sim:stay=processing]", timeout=1)

with suppress(NotThisRun), new_dag("evolink_trigger_timeout"):
    # Announces 30 s and never starts: the operator defers, the trigger's wait budget (2 s) runs out, and
    # the timeout must reach the operator as a retryable error: the retry reattaches and defers again.
    seedance(
        "deferrable",
        prompt="never starts [sim:stay=pending] [sim:estimate=30]",
        timeout=2,
        retries=1,
        retry_delay=0,
    )

# Deferrable generations around the wait-on-worker window (tests/conftest.py steers it to 1 s): one
# expected to end within it, one expected to outlast it.
with suppress(NotThisRun), new_dag("evolink_deferrable_short"):
    seedance("deferrable", prompt="a blink [sim:seconds=0.5]")

with suppress(NotThisRun), new_dag("evolink_deferrable_long"):
    seedance("deferrable", prompt="a long take [sim:seconds=2]")

MAPPED_PROMPTS = ["A red kite over dunes", "A tram in the fog", "Koi in a pond"]
with suppress(NotThisRun), new_dag("evolink_mapped"):
    generated = EvolinkSeedanceTextToVideoOperator.partial(task_id="generate", duration=4, **FAST).expand(
        prompt=MAPPED_PROMPTS
    )
    check_video.expand(generated=generated.output)

#: EvoLink's task error codes and whether a retry helps (the shared API facts).
TASK_ERROR_CODES = {
    "content_policy_violation": False,
    "invalid_parameters": False,
    "image_processing_error": False,
    "image_dimension_mismatch": False,
    "resource_not_found": False,
    "request_cancelled": False,
    "generation_failed_no_content": True,
    "service_error": True,
    "generation_timeout": True,
    "resource_exhausted": True,
    "quota_exceeded": True,
    "service_unavailable": True,
    "unknown_error": True,
}

with suppress(NotThisRun), new_dag("evolink_task_error_codes"):
    for code, retryable in TASK_ERROR_CODES.items():
        # Retryable codes fail only the first task created with the marker: the Airflow retry succeeds.
        # 0.4 s generations: 21 of them run one after the other.
        marker = f"[sim:fail={code}:1]" if retryable else f"[sim:fail={code}]"
        EvolinkSeedanceTextToVideoOperator(
            task_id=code,
            prompt=f"error code {code} {marker} [sim:seconds=0.4]",
            duration=4,
            retries=1,
            retry_delay=0,
            **FAST,
        )

for mode in ("sync", "deferrable"):
    with suppress(NotThisRun), new_dag(f"evolink_faulty_{mode}"):
        check_video(seedance(mode, prompt=f"through the storm ({mode}) [sim:seconds=4]").output)

with suppress(NotThisRun), new_dag("evolink_permanent_fault"):
    seedance("sync", prompt="never reachable")

# -- EvoLink's real answers (tests/test_real_answers.py) -------------------------------------------------

with suppress(NotThisRun), new_dag("evolink_daily_quota_then_success"):
    # 402 token_daily_quota_exceeded: not AirflowFailException, so the Airflow retry submits again.
    check_video(
        seedance(
            "sync", prompt="quota resets [sim:reject=token_daily_quota_exceeded:1]", retries=1, retry_delay=0
        ).output
    )

with suppress(NotThisRun), new_dag("evolink_insufficient_quota"):
    seedance("sync", prompt="no balance [sim:reject=insufficient_quota]", retries=2, retry_delay=0)

with suppress(NotThisRun), new_dag("evolink_paid_outcome_unknown"):
    # Six 409s: more than the hook's five attempts, so the first try ends unknown and the Airflow retry
    # must come back with the same Idempotency-Key to find the task the first POST created.
    check_video(
        seedance(
            "sync", prompt="unsure gateway [sim:reject=paid_outcome_unknown:6]", retries=1, retry_delay=0
        ).output
    )

with suppress(NotThisRun), new_dag("evolink_channel_busy"):
    check_video(
        seedance(
            "deferrable", prompt="busy upstream [sim:fail=channel:seedance-busy:1]", retries=1, retry_delay=0
        ).output
    )

for marker in ("cancel=none", "cancel=request_cancelled", "fail=request_cancelled"):
    with suppress(NotThisRun), new_dag(f"evolink_cancelled_{marker.replace('=', '_')}"):
        seedance("deferrable", prompt=f"stopped [sim:{marker}]", retries=2, retry_delay=0)

with suppress(NotThisRun), new_dag("evolink_bare_failure_is_retried"):
    check_video(seedance("sync", prompt="no reason given [sim:fail=none:1]", retries=1, retry_delay=0).output)


@task
def check_result_data_video(generated: dict[str, Any]) -> str:
    """Downstream step: the video listed only in result_data[].video_url was stored."""
    assert generated["results"] == [] and generated["result_data"][0]["video_url"], generated
    stored = generated["files"]
    assert len(stored) == 1, stored
    with open(stored[0], "rb") as video:
        assert video.read(12)[4:8] == b"ftyp", stored
    return str(stored[0])


for mode in ("sync", "deferrable"):
    with suppress(NotThisRun), new_dag(f"evolink_result_data_video_{mode}"):
        check_result_data_video(
            seedance(
                mode,
                prompt="listed elsewhere [sim:output=result_data_list]",
                output_path=os.path.join(tempfile.gettempdir(), "evolink-test-output"),
            ).output
        )


with suppress(NotThisRun), new_dag("evolink_stored_asset_deferrable"):
    # What the Airflow smoke matrix runs on every supported minor: storage (ObjectStoragePath) and the
    # asset events on an alias, both of which depend on the Airflow version's own libraries.
    check_result_data_video(
        seedance(
            "deferrable",
            prompt="stored and announced [sim:output=result_data_list]",
            output_path=os.path.join(tempfile.gettempdir(), "evolink-test-output"),
            asset_alias="evolink_smoke_videos",
        ).output
    )


with suppress(NotThisRun), new_dag("evolink_local_video_reference"):
    EvolinkSoraCharacterOperator(
        task_id="generate", video_url="/tmp/a-local-clip.mp4", retries=2, retry_delay=0, **FAST
    )

#: The example DAGs' reference images (copied into the test DAGs folder with them).
ASSETS = __import__("pathlib").Path(__file__).resolve().parent / "assets"
for mode in ("sync", "deferrable"):
    for inputs, images in (
        ("local", [str(ASSETS / "hero.png"), str(ASSETS / "sidekick.png")]),
        ("storage_uri", [(ASSETS / "hero.png").as_uri(), (ASSETS / "robot.png").as_uri()]),
    ):
        with suppress(NotThisRun), new_dag(f"evolink_reattach_{inputs}_images_{mode}"):
            # As evolink_reattach_*: every try stops waiting after 0.5 s of a 3 s generation, so each
            # retry must reattach, without uploading the images again.
            check_video(
                EvolinkHappyHorseReferenceToVideoOperator(
                    task_id="generate",
                    prompt="character1 and character2 share an umbrella [sim:seconds=3]",
                    image_urls=images,
                    duration=3,
                    deferrable=mode == "deferrable",
                    timeout=0.5,
                    retries=10,
                    retry_delay=0,
                    **FAST,
                ).output
            )

with suppress(NotThisRun), new_dag("evolink_clearable", params={"output_dir": ""}):
    seedance("sync", prompt="clear me to get a new take", output_path="{{ params.output_dir }}")

with suppress(NotThisRun), new_dag("evolink_clearable_never_reattach"):
    seedance("sync", prompt="every try is its own take", reattach="never")

with suppress(NotThisRun), new_dag("evolink_never_reattach"):
    # As evolink_reattach_*, but every try must submit its own generation (so none lives to its end).
    seedance(
        "sync",
        prompt="every try is its own take [sim:seconds=3]",
        reattach="never",
        timeout=0.5,
        retries=2,
        retry_delay=0,
    )

with suppress(NotThisRun), new_dag("evolink_mapped_local_images"):
    EvolinkHappyHorseReferenceToVideoOperator.partial(
        task_id="generate",
        prompt="character1 waves [sim:seconds=3]",
        duration=3,
        timeout=0.5,
        retries=10,
        retry_delay=0,
        **FAST,
    ).expand(image_urls=[[str(ASSETS / "hero.png")], [(ASSETS / "robot.png").as_uri()]])

with suppress(NotThisRun), new_dag("evolink_upload_step_cleared"):
    from evolink_provider.operators.upload import EvolinkUploadImagesOperator

    # The first run's generation times out while its EvoLink task is still running; a clear of the whole
    # run uploads the image again (a new URL for the same bytes) and must reattach, not pay again.
    upload = EvolinkUploadImagesOperator(task_id="upload", images=[str(ASSETS / "hero.png")])
    EvolinkHappyHorseReferenceToVideoOperator.partial(
        task_id="generate",
        prompt="character1 waves [sim:seconds=3]",
        duration=3,
        image_urls=upload.output["images"],
        timeout=0.5,
        **FAST,
    ).expand(seed=[7])

with suppress(NotThisRun), new_dag("evolink_completed_without_output"):
    seedance("sync", prompt="empty handed [sim:output=none]", retries=3, retry_delay=0)


def between_tries(context: Any) -> None:
    """``on_retry_callback``: what the test asked to happen between two tries, through the run's params:
    simulator ``faults`` to add (they then hit the retry's first requests), and ``tamper``, which writes
    other bytes over the stored first result (a different file under the result's name)."""
    import json
    from pathlib import Path

    params = context["params"]
    if params.get("faults"):
        host = json.loads(os.environ["AIRFLOW_CONN_EVOLINK_DEFAULT"])["host"]
        requests.post(
            f"{host}/_simulator/faults", json={"rules": params["faults"]}, timeout=5
        ).raise_for_status()
    if params.get("tamper"):
        for stored in Path(params["output_dir"]).glob("task-*-0.*"):
            stored.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"not the paid video" * 3)


# The money path of the ledger (evolink_provider/ledger.py): each try may fail, a retry must deliver what
# the first try paid for without paying again.
for name, prompt in (("one", "one paid take"), ("two", "two paid takes [sim:results=2]")):
    with (
        suppress(NotThisRun),
        new_dag(
            f"evolink_ledger_{name}",
            params={"output_dir": "", "faults": [], "tamper": False, "regenerate": False},
        ),
    ):
        seedance(
            "sync",
            prompt=prompt,
            output_path="{{ params.output_dir }}",
            regenerate="{{ params.regenerate }}",
            retries=3,
            retry_delay=0,
            on_retry_callback=between_tries,
        )


with suppress(NotThisRun), new_dag("evolink_ledger_deferrable", params={"output_dir": "", "faults": []}):
    # The deferrable twin of evolink_ledger_one: its wait runs in the trigger (tests/test_redteam2.py).
    seedance(
        "deferrable",
        prompt="one paid take, waited for in the triggerer [sim:seconds=3]",
        output_path="{{ params.output_dir }}",
        retries=3,
        retry_delay=0,
        on_retry_callback=between_tries,
    )


with suppress(NotThisRun), new_dag("evolink_ledger_short_wait", params={"output_dir": "", "faults": []}):
    # A 2 s wait budget for a 45 s generation, no retry: the try must end by its deadline, whatever its
    # polls answer (tests/test_redteam3.py).
    seedance(
        "deferrable",
        prompt="outlives its wait budget [sim:seconds=45]",
        output_path="{{ params.output_dir }}",
        timeout=2,
        retries=0,
    )


with suppress(NotThisRun), new_dag("evolink_ledger_min_credits", params={"output_dir": "", "faults": []}):
    # A reserve of 100 credits kept: the first try's check passes, its own generation then spends the
    # balance below the reserve (tests/test_redteam2.py).
    seedance(
        "sync",
        prompt="keep a reserve",
        output_path="{{ params.output_dir }}",
        min_credits=100,
        retries=2,
        retry_delay=0,
    )


def fail_once_after_execute(context: Any, result: Any = None) -> None:
    """A user's ``post_execute`` hook that fails once (the marker file in ``output_dir``): a failure after
    ``execute`` returned, before the try succeeded."""
    from pathlib import Path

    marker = Path(context["params"]["output_dir"]) / "FAIL_AFTER_EXECUTE"
    if marker.exists():
        marker.unlink()
        raise RuntimeError("publishing failed after execute returned")


for mode in ("sync", "deferrable"):
    with suppress(NotThisRun), new_dag(f"evolink_ledger_post_execute_{mode}", params={"output_dir": ""}):
        seedance(
            mode,
            prompt="delivered only on success [sim:seconds=4]",
            output_path="{{ params.output_dir }}",
            retries=0,
            post_execute=fail_once_after_execute,
        )

with suppress(NotThisRun), new_dag("evolink_ledger_forced", params={"output_dir": "", "faults": []}):
    # The operator's own "fresh take on a clear" (rendered: "{{ 'True' }}" is the string a template gives).
    seedance(
        "sync",
        prompt="a fresh take on every clear",
        output_path="{{ params.output_dir }}",
        regenerate="{{ 'True' }}",
        retries=3,
        retry_delay=0,
    )

with suppress(NotThisRun), new_dag("evolink_ledger_reread", params={"faults": []}):
    # Every try stops waiting after 0.5 s of a 3 s generation; each retry reads the recorded task first.
    check_video(
        seedance(
            "sync",
            prompt="read me again [sim:seconds=3]",
            timeout=0.5,
            retries=10,
            retry_delay=0,
            on_retry_callback=between_tries,
        ).output
    )


@task
def check_stored_under_its_id(generated: dict[str, Any]) -> str:
    """Downstream step: the result was stored as ``<task id>-0.<ext>``, whatever the id's shape."""
    (stored,) = generated["files"]
    assert os.path.basename(stored) == f"{generated['id']}-0.mp4", (stored, generated["id"])
    with open(stored, "rb") as video:
        assert video.read(12)[4:8] == b"ftyp", stored
    return str(stored)


for mode in ("sync", "deferrable"):
    with suppress(NotThisRun), new_dag(f"evolink_issued_id_{mode}", params={"output_dir": ""}):
        # The simulator is told which id to answer the create with (tests/test_task_ids.py).
        check_stored_under_its_id(
            seedance(mode, prompt="an id of EvoLink's examples", output_path="{{ params.output_dir }}").output
        )


# Red-team pass 6 (tests/test_redteam6.py): output_path from a Variable (env AIRFLOW_VAR_EVOLINK_RT6_OUT,
# "" when unset); a user's post_execute hook steered by marker files in EVOLINK_RT6_CTL: FAIL raises after
# execute returned (the result stays undelivered), WIPE first deletes the stored results (as a retry landing
# on another worker, whose local folder does not have them).
def rt6_after_execute(context: Any, result: Any = None) -> None:
    from pathlib import Path

    control = Path(os.environ["EVOLINK_RT6_CTL"])
    if (control / "WIPE").exists() and isinstance(result, dict):
        for stored in result.get("files") or []:
            Path(stored).unlink(missing_ok=True)
    if (control / "FAIL").exists():
        raise RuntimeError("publishing failed after execute returned")


with suppress(NotThisRun), new_dag("evolink_rt6_var_output"):
    seedance(
        "sync",
        prompt="red-team six [sim:seconds=1]",
        output_path="{{ var.value.get('evolink_rt6_out', '') }}",
        retries=1,
        retry_delay=0,
        post_execute=rt6_after_execute,
    )
