"""A second attack on the money path (issue 21), in real DAG runs counted by the simulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkTransportError
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.storage import store_results
from tests.airflow_runs import run_dag
from tests.conftest import SimulatorControl
from tests.test_hostile import MP4, HostileServer, completed, files_under
from tests.test_hostile import hook as hook  # the hostile server fixtures
from tests.test_hostile import hostile as hostile

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_a_404_on_a_poll_during_the_wait_is_retried_not_given_up(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    """Right after the POST one poll answers 404 (read-after-write lag, a gateway blip): the paid task
    must still be delivered by the automatic retry, not failed for good."""
    sim.add_faults({"kind": "not_found", "method": "GET", "path_prefix": "/v1/tasks/", "count": 1})

    state, tasks = run_dag("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})

    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 1)), "read again within the try"


def test_a_404_on_the_triggers_poll_is_retried_not_given_up(sim: SimulatorControl, tmp_path: Path) -> None:
    """The deferrable twin: the trigger's first poll answers 404; its non-retryable error event must not
    end the task instance for good with the video paid for."""
    sim.add_faults({"kind": "not_found", "method": "GET", "path_prefix": "/v1/tasks/", "count": 1})

    state, tasks = run_dag("evolink_ledger_deferrable", run_conf={"output_dir": str(tmp_path)})

    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 1)), "read again within the try"


def test_a_resent_key_is_not_refused_by_min_credits(sim: SimulatorControl, tmp_path: Path) -> None:
    """Every answer to the first try's POST is lost after EvoLink created the task (it reserved the
    credits): the retry resends the recorded key. The balance is now below ``min_credits`` because of
    that very task; refusing the resend would leave the paid video undelivered for good (a clear
    resends the same key and is refused again)."""
    sim.set_credits(remaining=101)
    sim.add_faults(
        {
            "kind": "reset",
            "method": "POST",
            "path_prefix": "/v1/videos/generations",
            "after_processing": True,
            "count": 5,  # the hook's max_retries + 1 attempts of the first try
        }
    )

    state, tasks = run_dag("evolink_ledger_min_credits", run_conf={"output_dir": str(tmp_path)})

    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 2)), tasks


@pytest.fixture
def without_task_state_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Airflow 3.0-3.2 in this 3.3 process: the ledger finds no ``task_state_store`` in the context."""
    from evolink_provider.records import SubmissionStore

    monkeypatch.setattr(SubmissionStore, "__init__", lambda self, context: setattr(self, "_store", None))
    yield


@pytest.mark.usefixtures("without_task_state_store")
def test_without_a_store_a_retry_with_local_images_fails_naming_the_paid_key(
    sim: SimulatorControl, capfd: pytest.CaptureFixture[str]
) -> None:
    """On 3.0-3.2 a retry uploads the local images again (new URLs), so resending the derived key is a
    different body: EvoLink answers idempotency_conflict. Nothing more may be bought, and the failure
    must say where the paid task is and how to avoid it, not show a bare 409."""
    state, tasks = run_dag("evolink_mapped_local_images")

    assert state == "failed"
    assert tasks == {"generate[0]": ("failed", 2), "generate[1]": ("failed", 2)}, "no retry burnt on a 409"
    assert sim.stats()["tasks_created"] == 2, "one per prompt: the retry bought nothing"
    log = "".join(capfd.readouterr())
    assert log.count("EvoLink refused Idempotency-Key evl-") >= 2 and "EvolinkUploadImagesOperator" in log


@pytest.fixture
def results_lag_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Server side (the in-process simulator's task object; the provider and Airflow are untouched): the
    first read of a completed task answers ``completed`` before its result list is filled in."""
    from evolink_provider.simulator.tasks import SimTask, TaskStore

    original = TaskStore.task_object
    seen = {"empty": 0}

    def task_object(self: TaskStore, task: SimTask, base_url: str) -> dict[str, Any]:
        body = original(self, task, base_url)
        if body["status"] == "completed" and seen["empty"] == 0:
            seen["empty"] += 1
            body = {**body, "results": []}
            body.pop("result_data", None)
        return body

    monkeypatch.setattr(TaskStore, "task_object", task_object)
    yield seen


@pytest.mark.parametrize("dag_id", ["evolink_ledger_one", "evolink_ledger_deferrable"])
def test_a_completed_read_whose_results_lag_is_read_again_not_given_up(
    sim: SimulatorControl, tmp_path: Path, results_lag_once: dict[str, int], dag_id: str
) -> None:
    """``completed`` with no result yet, once (the list filled in a moment after the status): the paid
    video must be delivered, not given up with an AirflowFailException."""
    state, tasks = run_dag(dag_id, run_conf={"output_dir": str(tmp_path)})

    assert results_lag_once["empty"] == 1
    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 1)), tasks


@pytest.mark.parametrize("status", [400, 401])
def test_a_fresh_result_link_refused_with_another_4xx_buys_nothing_and_is_delivered(
    sim: SimulatorControl, tmp_path: Path, status: int
) -> None:
    """A signed link refused once with 400 (how Google Cloud Storage answers an expired or not-yet-valid
    signature) or 401 (a CDN's signature check): the same evidence as a 403 on a fresh link (row R25),
    so the retry downloads it again; it must not end the task instance with the video paid for."""
    sim.add_faults(
        {"kind": "status", "status": status, "method": "GET", "path_prefix": "/media/", "count": 1}
    )

    state, tasks = run_dag("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})

    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 2)), tasks


def test_a_page_served_once_instead_of_the_video_buys_nothing_and_is_delivered(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    """A fresh link answers 200 with an HTML page once (a CDN or WAF challenge page): nothing is stored
    from it, and, being what the host served this time and no evidence about the paid result, it fails the
    try retryably; the retry downloads the video."""
    sim.add_faults({"kind": "wrong_content_type", "method": "GET", "path_prefix": "/media/", "count": 1})

    state, tasks = run_dag("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})

    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 2)), tasks


def test_a_chunked_result_cut_off_before_its_last_chunk_is_not_stored(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path
) -> None:
    """Without Content-Length only the chunked framing says where the body ends: a connection closed
    before the last (empty) chunk is a broken download (retryable), never a stored result."""

    def cut_off(handler: Any) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n%s\r\n" % (2000, MP4[:2000]))
        handler.close_connection = True

    hostile.routes["/media/"] = cut_off

    with pytest.raises(EvolinkTransportError, match="broke off") as raised:
        store_results(hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))
    assert raised.value.retryable
    assert files_under(tmp_path) == []
