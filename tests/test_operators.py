"""Operators and the sensor inside real Airflow DAG runs (``dag.test()``), against the simulator.

The DAGs live in ``tests/dags/evolink_test_dags.py`` (copied into the test DAGs folder, where dag.test()
needs them); each ends in a check task that uses the XCom value as a downstream step would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.timing import steered
from tests.airflow_runs import (
    clear_and_rerun,
    dag_module,
    ended_at,
    run_dag,
    run_dag_with_id,
    task_state_store,
    triggers_for,
    xcom,
)
from tests.conftest import SimulatorControl

pytestmark = pytest.mark.usefixtures("airflow_db")


MODES = ["sync", "deferrable"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "scenario", ["seedance", "happyhorse", "happyhorse_text", "sora_character", "generic"]
)
def test_every_model_operator_completes(sim: SimulatorControl, scenario: str, mode: str) -> None:
    dag_id = f"evolink_{scenario}_{mode}"

    state, tasks = run_dag(dag_id)

    assert state == "success", tasks
    assert all(task_state == "success" for task_state, _ in tasks.values()), tasks
    generated = xcom(dag_id, "generate")
    assert generated["id"].startswith("task-unified-")
    assert generated["status"] == "completed"
    expected_posts = 2 if scenario == "generic" else 1
    assert sim.stats()["tasks_created"] == expected_posts


def test_an_operator_derived_from_its_schema_sends_its_fields(sim: SimulatorControl) -> None:
    """EvolinkHappyHorseTextToVideoOperator is only a typed signature: model, duration reach EvoLink."""
    state, tasks = run_dag("evolink_happyhorse_text_sync")

    assert state == "success", tasks
    generated = xcom("evolink_happyhorse_text_sync", "generate")
    assert generated["model"] == "happyhorse-1.1-text-to-video"
    assert generated["task_info"]["video_duration"] == 3  # the rendered template "3", sent as 3


def test_character_name_reaches_downstream(sim: SimulatorControl) -> None:
    state, _ = run_dag("evolink_sora_character_sync")
    assert state == "success"
    assert xcom("evolink_sora_character_sync", "check_character").startswith("chr_")


@pytest.mark.parametrize("mode", MODES)
def test_retry_reattaches_instead_of_submitting_again(sim: SimulatorControl, mode: str) -> None:
    state, tasks = run_dag(f"evolink_reattach_{mode}")

    assert state == "success", tasks
    task_state, tries = tasks["generate"]
    assert task_state == "success"
    assert tries >= 2, "the first try should time out and a retry reattach"
    stats = sim.stats()
    assert stats["requests"]["POST /v1/videos/generations"] == 1
    assert stats["tasks_created"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_sensor_waits_for_a_task_submitted_elsewhere(sim: SimulatorControl, mode: str) -> None:
    state, tasks = run_dag(f"evolink_sensor_{mode}")
    assert state == "success", tasks
    assert xcom(f"evolink_sensor_{mode}", "wait")["status"] == "completed"


def test_bad_input_fails_before_any_request_and_without_retries(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_bad_input")
    assert state == "failed"
    assert tasks["generate"] == ("failed", 1)  # AirflowFailException: retries=2 left unused
    assert sum(sim.stats()["requests"].values()) == 0


def test_templated_strings_are_coerced_after_rendering(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_templated_fields")
    assert state == "success", tasks
    assert xcom("evolink_templated_fields", "generate")["task_info"]["video_duration"] == 6


def test_a_content_block_fails_at_once_without_retries(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_content_blocked")
    assert state == "failed"
    assert tasks["generate"] == ("failed", 1)
    assert sim.stats()["tasks_created"] == 1


def test_a_transient_task_failure_is_resubmitted_by_the_retry(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_transient_failure")
    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2)
    stats = sim.stats()
    assert stats["tasks_created"] == 2  # the failed one (not billed) and its replacement
    assert len(stats["posts_by_idempotency_key"]) == 2  # a fresh key for the deliberate resubmission


def test_wait_timeout_fails_the_task_on_time(sim: SimulatorControl) -> None:
    """timeout=1 on a task that never ends: the wait ends after 1 s (not by a hang), once, and no trigger."""
    began = time.time()
    state, run_id, tasks = run_dag_with_id("evolink_wait_timeout")

    assert (state, tasks["generate"]) == ("failed", ("failed", 1))
    generated = sim.stats()["tasks_by_idempotency_key"]
    assert len(generated) == 1
    (task_id,) = next(iter(generated.values()))
    created = float(EvolinkHook().get_task(task_id)["created"])  # whole seconds, at most 1 s early
    assert created >= int(began)
    waited = ended_at("evolink_wait_timeout", run_id, "generate") - created
    assert 1.0 <= waited <= 1.0 + 1.0 + 3.0  # the budget, the rounding of created, a margin


def test_a_trigger_timeout_is_retried_and_the_retry_reattaches(sim: SimulatorControl) -> None:
    """The trigger's wait budget (2 s) runs out: a retryable error, so the retry runs, reattaches to the
    same EvoLink task (one POST) and defers again, until the retries are spent."""
    state, tasks = run_dag("evolink_trigger_timeout")

    assert (state, tasks["generate"]) == ("failed", ("failed", 2))
    stats = sim.stats()
    assert stats["requests"]["POST /v1/videos/generations"] == 1
    (task_ids,) = stats["tasks_by_idempotency_key"].values()
    assert len(triggers_for(task_ids)) == 2, "each try deferred once"


@pytest.mark.parametrize(("length", "defers"), [("short", False), ("long", True)])
def test_only_a_task_expected_beyond_the_window_defers(
    sim: SimulatorControl, length: str, defers: bool
) -> None:
    """0.5 s (estimate 1 s, within the 1 s window): waited for on the worker; 2 s: deferred, and resumed
    no earlier than its trigger's not_before."""
    dag_id = f"evolink_deferrable_{length}"
    state, run_id, tasks = run_dag_with_id(dag_id)

    assert state == "success", tasks
    generated = xcom(dag_id, "generate")
    deferred = triggers_for([generated["id"]])
    assert len(deferred) == (1 if defers else 0), deferred
    if defers:
        assert ended_at(dag_id, run_id, "generate") >= deferred[0]["not_before"]


def test_the_event_waits_for_not_before(sim: SimulatorControl) -> None:
    """A 3 s hold on a 2 s generation: its trigger sees the end first, and fires only after the hold."""
    with steered(trigger_hold=3.0):
        state, run_id, tasks = run_dag_with_id("evolink_deferrable_long")

    assert state == "success", tasks
    generated = xcom("evolink_deferrable_long", "generate")
    (deferred,) = triggers_for([generated["id"]])
    created = float(generated["created"])  # whole seconds, at most 1 s early
    assert deferred["not_before"] >= created + 3.0
    assert ended_at("evolink_deferrable_long", run_id, "generate") >= deferred["not_before"]


def test_dynamic_mapping_generates_one_video_per_prompt(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_mapped")
    assert state == "success", tasks
    assert {k for k in tasks if k.startswith("generate[")} == {"generate[0]", "generate[1]", "generate[2]"}
    # One generation per request identity (prompt), none shared or doubled across map indexes.
    assert sim.stats()["tasks_by_prompt"] == dict.fromkeys(dag_module().MAPPED_PROMPTS, 1)


def uploads(sim: SimulatorControl) -> int:
    return int(sim.stats()["requests"].get("POST /api/v1/files/upload/stream", 0))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("inputs", ["local", "storage_uri"])
def test_retries_with_local_inputs_reattach_without_uploading_again(
    sim: SimulatorControl, inputs: str, mode: str
) -> None:
    state, tasks = run_dag(f"evolink_reattach_{inputs}_images_{mode}")

    assert state == "success", tasks
    assert tasks["generate"][1] >= 2, "the first try should time out and a retry reattach"
    stats = sim.stats()
    assert stats["tasks_created"] == 1
    assert stats["requests"]["POST /v1/videos/generations"] == 1
    assert uploads(sim) == 2  # each image once, by the first try; the retries reused them


def test_mapped_local_inputs_reattach_per_map_index(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_mapped_local_images")

    assert state == "success", tasks
    assert all(tries >= 2 for name, (_, tries) in tasks.items() if name.startswith("generate[")), tasks
    assert sim.stats()["tasks_created"] == 2
    assert uploads(sim) == 2


def test_a_cleared_upload_step_gives_new_urls_and_the_generation_reattaches(sim: SimulatorControl) -> None:
    """The upload step's entries carry each image's sha256: the request's identity names the digest, so
    the same bytes under a new URL are the same request (a clear reads the paid task, R06, not R12)."""
    state, run_id, tasks = run_dag_with_id("evolink_upload_step_cleared")
    assert state == "failed" and tasks["generate[0]"][0] == "failed", tasks  # the wait timed out
    first = xcom("evolink_upload_step_cleared", "upload")
    assert sim.stats()["tasks_created"] == 1
    time.sleep(3)  # the paid EvoLink task completes meanwhile

    state, tasks = clear_and_rerun("evolink_upload_step_cleared", run_id)

    second = xcom("evolink_upload_step_cleared", "upload")
    assert second["images"][0]["sha256"] == first["images"][0]["sha256"]
    assert second["urls"] != first["urls"], "the clear must upload again, under a new URL"
    assert uploads(sim) == 2
    stats = sim.stats()
    assert stats["requests"]["POST /v1/videos/generations"] == 1, stats["requests"]
    assert stats["tasks_created"] == 1
    assert state == "success", tasks


def test_a_cleared_completed_task_submits_a_new_generation(sim: SimulatorControl, tmp_path: Path) -> None:
    """A clear keeps the run and its task_state_store record: only the clear check tells it from a retry
    (which would reattach to the completed task)."""
    state, run_id, _ = run_dag_with_id("evolink_clearable", run_conf={"output_dir": str(tmp_path)})
    assert state == "success"
    first = xcom("evolink_clearable", "generate")
    record = task_state_store("evolink_clearable", run_id, "generate")["evolink_submission"]
    assert record["task_id"] == first["id"]

    state, tasks = clear_and_rerun("evolink_clearable", run_id)

    assert state == "success", tasks
    second = xcom("evolink_clearable", "generate")
    assert second["id"] != first["id"]
    stats = sim.stats()
    assert stats["tasks_created"] == 2
    assert sorted(stats["posts_by_idempotency_key"].values()) == [1, 1]  # a fresh key for the clear
    after = task_state_store("evolink_clearable", run_id, "generate")["evolink_submission"]
    assert after["task_id"] == second["id"] and after["generation"] != record["generation"]


def test_a_cleared_task_whose_results_expired_generates_anew(sim: SimulatorControl, tmp_path: Path) -> None:
    state, run_id, _ = run_dag_with_id("evolink_clearable", run_conf={"output_dir": str(tmp_path)})
    assert state == "success"
    first = xcom("evolink_clearable", "generate")
    # From now on every result link answers as an expired one does.
    sim.add_faults({"kind": "not_found", "method": "GET", "path_prefix": f"/media/{first['id']}"})

    state, tasks = clear_and_rerun("evolink_clearable", run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 2
    assert xcom("evolink_clearable", "generate")["id"] != first["id"]


def test_reattach_never_submits_on_every_try(sim: SimulatorControl) -> None:
    """Every try stops waiting after 0.5 s of a 3 s generation: with ``never`` each retry submits its own
    (``auto`` would reattach, as test_retry_reattaches_instead_of_submitting_again shows)."""
    state, tasks = run_dag("evolink_never_reattach")

    assert (state, tasks["generate"]) == ("failed", ("failed", 3)), "each of the 3 tries times out"
    stats = sim.stats()
    assert stats["tasks_created"] == 3
    assert sorted(stats["posts_by_idempotency_key"].values()) == [1, 1, 1]


def test_a_cleared_never_reattach_task_submits_again(sim: SimulatorControl) -> None:
    state, run_id, _ = run_dag_with_id("evolink_clearable_never_reattach")
    assert state == "success"

    state, tasks = clear_and_rerun("evolink_clearable_never_reattach", run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 2


def test_a_completed_task_without_results_is_read_again_by_each_retry_and_never_paid_again(
    sim: SimulatorControl, capfd: pytest.CaptureFixture[str]
) -> None:
    state, tasks = run_dag("evolink_completed_without_output")
    assert state == "failed"
    assert tasks["generate"] == ("failed", 4)  # retryable: every retry reads the paid task again
    assert sim.stats()["tasks_created"] == 1
    out, err = capfd.readouterr()
    assert "evolink_regenerate" in out + err, "the message names what really makes a new generation"


# -- credits and progress in view (issue 14) ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_final_line_and_xcom_carry_links_and_credits(
    sim: SimulatorControl, mode: str, capfd: pytest.CaptureFixture[str]
) -> None:
    state, tasks = run_dag(f"evolink_seedance_{mode}")

    assert state == "success", tasks
    generated = xcom(f"evolink_seedance_{mode}", "generate")
    reserved = generated["usage"]["credits_reserved"]
    assert reserved > 0
    assert generated["credits"] == {"reserved": reserved, "used": reserved}
    assert generated["result_urls"] == generated["results"] and generated["character_name"] is None
    logged = "".join(capfd.readouterr())
    final = f"EvoLink task {generated['id']} completed, "
    assert final in logged
    final_line = logged[logged.index(final) :].splitlines()[0]
    assert generated["results"][0] in final_line
    assert f"credits reserved: {reserved:g}, used: {reserved:g}" in final_line
    assert "expected to end around" in logged  # the submission line
    assert f"EvoLink task {generated['id']}: pending" in logged or f"{generated['id']}: processing" in logged


def test_the_character_name_and_picture_are_in_view(
    sim: SimulatorControl, capfd: pytest.CaptureFixture[str]
) -> None:
    state, _ = run_dag("evolink_sora_character_sync")

    assert state == "success"
    generated = xcom("evolink_sora_character_sync", "generate")
    name = generated["result_data"]["character_name"]
    assert generated["character_name"] == name
    assert generated["result_urls"] == [generated["result_data"]["profile_picture_url"]]
    assert f"; character: {name}; credits reserved: " in "".join(capfd.readouterr())


@pytest.mark.parametrize("mode", MODES)
def test_the_sensor_logs_its_outcome(
    sim: SimulatorControl, mode: str, capfd: pytest.CaptureFixture[str]
) -> None:
    state, tasks = run_dag(f"evolink_sensor_{mode}")

    assert state == "success", tasks
    waited = xcom(f"evolink_sensor_{mode}", "wait")
    assert waited["credits"]["reserved"] == waited["usage"]["credits_reserved"]
    logged = "".join(capfd.readouterr())
    assert f"EvoLink task {waited['id']} completed, " in logged
    assert waited["results"][0] in logged


@pytest.mark.parametrize(
    "balance",
    [
        {"remaining": 12.5, "key_unlimited": True},
        {"remaining": 100_000, "key_remaining": 12.5},
    ],
    ids=["account-balance", "key-quota"],
)
def test_min_credits_refuses_to_submit_below_what_the_key_can_spend(
    sim: SimulatorControl, capfd: pytest.CaptureFixture[str], balance: dict[str, Any]
) -> None:
    sim.set_credits(**balance)

    state, tasks = run_dag("evolink_min_credits")

    assert state == "failed"
    assert tasks["generate"] == ("failed", 1), "an AirflowFailException: no retry is burnt"
    stats = sim.stats()
    assert stats["requests"].get("POST /v1/videos/generations", 0) == 0
    assert stats["requests"]["GET /v1/credits"] == 1
    assert "EvoLink balance is 12.5 credits, below min_credits=50: nothing was submitted" in "".join(
        capfd.readouterr()
    )


@pytest.mark.parametrize(
    "balance",
    [{"remaining": 50, "key_unlimited": True}, {"remaining": 80, "key_remaining": 50}],
    ids=["account-balance", "key-quota"],
)
def test_min_credits_lets_what_the_key_can_spend_submit(
    sim: SimulatorControl, balance: dict[str, Any]
) -> None:
    sim.set_credits(**balance)

    state, tasks = run_dag("evolink_min_credits")

    assert state == "success", tasks
    assert sim.posts() == 1


def test_a_key_without_a_quota_of_its_own_still_spends_the_accounts_balance(sim: SimulatorControl) -> None:
    """``token.unlimited_credits`` lifts the key's quota, never the account's balance."""
    sim.set_credits(0, key_unlimited=True)

    state, tasks = run_dag("evolink_min_credits")

    assert state == "failed" and tasks["generate"] == ("failed", 1), tasks
    assert sim.posts() == 0


def test_a_reattaching_retry_does_not_read_the_balance_again(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_reattach_min_credits")

    assert state == "success", tasks
    assert tasks["generate"][1] >= 2, "the first try should time out and a retry reattach"
    stats = sim.stats()
    assert stats["requests"]["POST /v1/videos/generations"] == 1
    assert stats["requests"]["GET /v1/credits"] == 1


@pytest.mark.parametrize("bad", [-1, float("nan"), "50", True])
def test_a_bad_min_credits_is_refused_before_any_request(sim: SimulatorControl, bad: Any) -> None:
    import logging

    from evolink_provider.compat import AirflowFailException
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.submission import check_balance

    with pytest.raises(AirflowFailException, match=r"min_credits=.*allowed values are None or a number"):
        check_balance(EvolinkHook(), bad, logging.getLogger(__name__))
    assert sim.stats()["requests"] == {}
