"""A third attack on the money path (issue 21), in real DAG runs counted by the simulator."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.storage import EvolinkServedContentError, store_results
from tests.airflow_runs import clear_and_rerun, run_dag, run_dag_with_id, task_state_store
from tests.conftest import SimulatorControl
from tests.test_hostile import HostileServer, completed, files_under
from tests.test_hostile import hook as hook  # the hostile server fixtures
from tests.test_hostile import hostile as hostile

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.mark.parametrize("value", ["true", 1, {"generate": True}])
def test_a_regenerate_conf_value_that_is_not_true_or_a_list_fails_before_any_call(
    sim: SimulatorControl, tmp_path: Path, value: Any
) -> None:
    """``{"evolink_regenerate": "true"}`` typed into the trigger form was silently no forced take (a clear
    collected the old video): now the try fails at once, naming the key and what it accepts."""
    state, tasks = run_dag(
        "evolink_ledger_one", run_conf={"output_dir": str(tmp_path), "evolink_regenerate": value}
    )

    assert (state, tasks["generate"]) == ("failed", ("failed", 1)), "no retry of a refused value"
    assert sim.stats()["tasks_created"] == 0 and sim.posts() == 0


def test_a_clear_of_a_task_whose_every_post_answer_was_lost_pays_nothing(
    sim: SimulatorControl, tmp_path: Path
) -> None:
    """Every answer to every try's POST is lost after EvoLink created the task: the run fails with only the
    intent (the key) recorded and the outcome unknown. A clear of that failed task must resend the same key
    (EvoLink answers with the task it created) and deliver, not buy a second generation."""
    lost = {
        "kind": "reset",
        "method": "POST",
        "path_prefix": "/v1/videos/generations",
        "after_processing": True,
    }
    sim.add_faults(lost)
    state, run_id, tasks = run_dag_with_id("evolink_ledger_one", run_conf={"output_dir": str(tmp_path)})
    assert (state, tasks["generate"][0]) == ("failed", "failed"), tasks
    key = task_state_store("evolink_ledger_one", run_id, "generate")["evolink_submission"]["idempotency_key"]
    assert sim.stats()["tasks_created"] == 1
    sim.clear_faults()

    state, tasks = clear_and_rerun("evolink_ledger_one", run_id)

    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 1
    record = task_state_store("evolink_ledger_one", run_id, "generate")["evolink_submission"]
    assert record["idempotency_key"] == key and record["delivered"] is True


@pytest.fixture
def reads_after_completed(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Server side (the in-process simulator's task object; the provider and Airflow are untouched): once
    a task was answered ``completed`` (or, with ``from_first_completed``, from then on), its next reads
    answer the statuses in ``plan`` in turn (``completed`` there: without any result)."""
    from evolink_provider.simulator.tasks import TaskStore

    original = TaskStore.task_object
    state: dict[str, Any] = {"plan": [], "seen": set(), "served": 0}

    def task_object(self: TaskStore, task: Any, base_url: str) -> dict[str, Any]:
        body = original(self, task, base_url)
        first = state.get("from_first_completed", False)
        if body["status"] == "completed" and (first or task.id in state["seen"]) and state["plan"]:
            status, code = state["plan"].pop(0)
            state["served"] += 1
            body = {k: v for k, v in body.items() if k not in ("results", "result_data")}
            body["status"] = status
            if code:
                body["error"] = {"code": code, "message": "flapped", "type": "task_error"}
        elif body["status"] == "completed":
            state["seen"].add(task.id)
        return body

    monkeypatch.setattr(TaskStore, "task_object", task_object)
    yield state


@pytest.mark.parametrize(
    ("dag_id", "running_reads"),
    [("evolink_ledger_one", 1), ("evolink_ledger_deferrable", 12)],
    ids=["sync-wait", "trigger-event"],
)
def test_a_wait_ending_failed_after_the_task_was_seen_completed_is_retried(
    sim: SimulatorControl,
    tmp_path: Path,
    reads_after_completed: dict[str, Any],
    dag_id: str,
    running_reads: int,
) -> None:
    """Row R29 during a wait, not only on a retry's first read: try 1 sees the task completed (billed)
    and a result link is refused once; the retry reads it ``processing`` (long enough, when deferrable,
    to outlast the wait on the worker and defer), then its wait ends ``failed`` with an unfixable code.
    That contradiction must fail the try retryably (the next one delivers), not end the task instance
    for good with the paid video undelivered."""
    reads_after_completed["plan"] = [("processing", None)] * running_reads + [
        ("failed", "content_policy_violation")
    ]
    sim.add_faults({"kind": "status", "status": 403, "method": "GET", "path_prefix": "/media/", "count": 1})

    state, tasks = run_dag(dag_id, run_conf={"output_dir": str(tmp_path)})

    assert reads_after_completed["served"] == running_reads + 1, "the flips must hit the retry's reads"
    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 3)), tasks


@pytest.mark.parametrize("dag_id", ["evolink_ledger_one", "evolink_ledger_deferrable"])
def test_a_task_read_completed_without_results_then_failed_is_not_paid_again(
    sim: SimulatorControl, tmp_path: Path, reads_after_completed: dict[str, Any], dag_id: str
) -> None:
    """The first ``completed`` read has no result yet (re-read within the try, ``Ledger.reread_empty``),
    and the re-read, then the retry's read, answer ``failed`` with a fixable code: the task was seen
    completed (billed), so that is the contradiction of row R29, not a failed uncharged task to
    resubmit. Nothing more may be bought; the next try collects the paid video."""
    reads_after_completed["from_first_completed"] = True
    reads_after_completed["plan"] = [
        ("completed", None),
        ("failed", "service_error"),
        ("failed", "service_error"),
    ]

    state, tasks = run_dag(dag_id, run_conf={"output_dir": str(tmp_path)})

    assert reads_after_completed["served"] == 3, "the re-read and the retry's read must be answered failed"
    assert sim.stats()["tasks_created"] == 1
    assert (state, tasks["generate"]) == ("success", ("success", 3)), tasks


@pytest.fixture
def every_other_task_read_not_found(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Server side (the in-process simulator's fault plan): every other read of a task answers 404, so
    each poll of the trigger answers 404 and each re-read of the worker answers the task (a flapping
    gateway in front of a task that runs for a long time)."""
    from evolink_provider.simulator.faults import FaultPlan, FaultRule

    original = FaultPlan.pick
    reads = {"count": 0}

    def pick(self: FaultPlan, method: str, path: str) -> FaultRule | None:
        if method == "GET" and path.startswith("/v1/tasks/"):
            reads["count"] += 1
            if reads["count"] % 2 == 1:
                return FaultRule("not_found")
        return original(self, method, path)

    monkeypatch.setattr(FaultPlan, "pick", pick)
    yield reads


def test_a_flapping_404_does_not_restart_the_deferred_waits_budget(
    sim: SimulatorControl, tmp_path: Path, every_other_task_read_not_found: dict[str, int]
) -> None:
    """Each 404 of the trigger's poll is re-read on the worker (rows R23, R24), which deferred again with a
    fresh ``timeout``: a wait that never ends by its budget (here 2 s for a 45 s generation). The try must
    end by the deadline the trigger was given, retryably, with nothing more bought."""
    started = time.monotonic()

    _state, tasks = run_dag("evolink_ledger_short_wait", run_conf={"output_dir": str(tmp_path)})

    elapsed = time.monotonic() - started
    assert every_other_task_read_not_found["count"] >= 2, "the trigger's poll must have met a 404"
    assert sim.stats()["tasks_created"] == 1
    assert tasks["generate"] == ("failed", 1), tasks
    assert elapsed < 40, f"the wait ran {elapsed:.0f} s on a 2 s budget"
    assert list(tmp_path.iterdir()) == [], "not waited for past the budget and stored"


def test_a_served_content_type_is_shown_as_server_text(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path
) -> None:
    """The ``Content-Type`` of a page served instead of the video is server-supplied text: in the
    (retryable) error it obeys the printable and length rule, not 20,000 characters of header."""
    hostile.file("/media/", b"<html>challenge</html>", "text/html" + "\x85x" * 10_000)

    with pytest.raises(EvolinkServedContentError) as raised:
        store_results(hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))
    assert raised.value.retryable and len(str(raised.value)) < 300
    assert "\x85" not in str(raised.value)
    assert files_under(tmp_path) == []
