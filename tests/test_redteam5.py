"""A fifth attack on the money path (red-team pass 5), by a helper who wrote none of it.

Its finding F1: a templated ``output_path`` that renders another folder on a later try made the stored,
recorded files invisible, so a clear bought a second generation (R28) and a retry failed for good (R26)
although rows R08/R09 say "use stored". The record now says where the files are (``stored_in``).
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.exceptions import EvolinkBadAnswerError, EvolinkError, EvolinkNotFoundError
from evolink_provider.records import STATE_KEY, SubmissionRecord
from evolink_provider.storage import StoredFile, file_stamp
from tests.test_ledger import FakeHook, MemoryStore, context, make

TASK = "task-unified-1774857405-abc123"
DAY = 24 * 3600.0


class ExpiredLinksHook(FakeHook):
    """Reads answer the recorded task completed; every result link is refused (404), as after 24 h."""

    def __init__(self) -> None:
        super().__init__([completed()] * 10)
        self.downloads = 0

    @contextmanager
    def open_result(self, url: str, deadline: float | None = None) -> Any:
        self.downloads += 1
        raise EvolinkNotFoundError("expired", status_code=404)
        yield  # pragma: no cover


def completed() -> dict[str, Any]:
    return {
        "id": TASK,
        "status": "completed",
        "created": int(time.time() - 3 * DAY),
        "results": ["https://cdn.example/v.mp4"],
    }


def stored_everything(store: MemoryStore, folder: Path) -> None:
    """Every result of TASK stored under ``folder`` and recorded, first seen completed two days ago, not
    delivered (the try failed after storing, e.g. killed or marked failed before post_execute)."""
    folder.mkdir(parents=True, exist_ok=True)
    video = b"\x00\x00\x00\x18ftypisom-paid-video"
    path = folder / f"{TASK}-0.mp4"
    path.write_bytes(video)
    record = SubmissionRecord(
        "fp-1",
        0,
        "evl-" + "0" * 48,
        TASK,
        "seq-2",
        completed_seen_at=time.time() - 2 * DAY,
        results=1,
        stored=(StoredFile(0, path.name, len(video), hashlib.sha256(video).hexdigest(), file_stamp(path)),),
        stored_in=str(folder),
    )
    store.set(STATE_KEY, record.as_stored())


def run_try(hook: ExpiredLinksHook, store: MemoryStore, output: Path, max_tries: int) -> dict[str, Any]:
    ledger = make(hook, context(store, max_tries=max_tries, try_number=2))
    task = ledger.start(str(output))
    if task.get("from_storage"):
        return task
    return {**task, "files": ledger.store(task, str(output), None)}


def test_baseline_stored_files_are_used_on_a_clear_when_output_path_is_the_same(tmp_path: Path) -> None:
    """R08: every result on disk as recorded -> use stored, nothing read, nothing paid."""
    store, hook = MemoryStore(), ExpiredLinksHook()
    stored_everything(store, tmp_path / "out")

    task = run_try(hook, store, tmp_path / "out", max_tries=5)

    assert task["from_storage"] is True and hook.keys == [] and hook.read_ids == []


def test_a_clear_that_renders_another_output_path_does_not_pay_again_for_stored_files(tmp_path: Path) -> None:
    """F1. A templated ``output_path`` (e.g. ``{{ macros.datetime.now() }}`` or a Variable) renders another
    folder on the clear. Every paid file is on disk as recorded (row R08/R09: use stored), but the record
    does not say where, so the ledger looks only in the new folder, finds nothing, reads the task, gets
    the expired-link 404 and (R28, a clear) POSTs a second generation."""
    store, hook = MemoryStore(), ExpiredLinksHook()
    stored_everything(store, tmp_path / "first")

    run_try(hook, store, tmp_path / "second", max_tries=5)  # a clear

    assert hook.keys == [], "a second generation was bought for a result stored in full"


def test_a_retry_that_renders_another_output_path_still_delivers_the_stored_files(tmp_path: Path) -> None:
    """F1, retry flavour: the same situation on an automatic retry ends the task for good (R26, "expired")
    although every paid file is on disk; only a paid clear gets past it."""
    store, hook = MemoryStore(), ExpiredLinksHook()
    stored_everything(store, tmp_path / "first")

    task = run_try(hook, store, tmp_path / "second", max_tries=2)  # a retry

    assert task.get("files") and hook.keys == []


# -- a POST answer that the strict checks refuse ----------------------------------------------------


class BadAnswerOnPost(FakeHook):
    """EvoLink created (and bills) the task; its answer, and every replay of it, fails checked_task on a
    field that does not matter to the money path (as the real hook raises)."""

    def __init__(self, odd: dict[str, Any]) -> None:
        super().__init__()
        self.odd = odd

    def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        from evolink_provider.answers import checked_task

        self.keys.append(idempotency_key)
        return checked_task({"id": TASK, "status": "pending", **self.odd})


@pytest.mark.parametrize(
    "odd",
    [{"created": 1774857405123}, {"usage": []}, {"task_info": []}, {"progress": 100.5}],
    ids=["created-ms", "usage-empty-list", "task_info-empty-list", "progress-over-100"],
)
def test_a_paid_post_answer_failing_a_check_is_resent_with_its_key_and_buys_nothing(
    odd: dict[str, Any],
) -> None:
    """Observation O1, a chosen limit: an answer that fails a check is not trusted in part (its id is not
    recorded), so every retry and clear resends the same key and buys nothing; the error names the key for
    the user to look up (``regenerate`` pays again). EvoLink's documented answers pass the checks."""
    store = MemoryStore()
    hook = BadAnswerOnPost(odd)
    for max_tries, try_number in ((2, 1), (2, 2), (2, 3), (6, 4)):  # three tries, then a clear
        with pytest.raises(EvolinkBadAnswerError):
            make(hook, context(store, max_tries=max_tries, try_number=try_number)).start(None)
    record = store.get(STATE_KEY)
    assert record.get("task_id") is None  # the billed task's safe id was never recorded
    assert len(set(hook.keys)) == 1  # the same key every time: no extra generation, but no delivery


# -- real DAG runs counted by the simulator ----------------------------------------------------------


@pytest.mark.usefixtures("airflow_db")
def test_an_odd_id_a_lost_post_answer_and_chunked_results_pay_once_then_a_clear_reuses_nothing_paid(
    sim: Any, tmp_path: Path
) -> None:
    """The docs' id shape, the first POST's answer lost after EvoLink created the task (R02: resend the
    same key), chunked results without Content-Length; then a clear of the delivered task (R11: one new
    generation, by the table) - never more."""
    from tests.airflow_runs import clear_and_rerun, run_dag_with_id, task_state_store

    sim.issue_task_ids(TASK, "task-unified-1774857406-def456")
    sim.add_faults(
        {
            "kind": "reset",
            "method": "POST",
            "path_prefix": "/v1/videos/generations",
            "after_processing": True,
            "count": 1,
        },
        {"kind": "chunked", "method": "GET", "path_prefix": "/media/"},
    )
    state, run_id, tasks = run_dag_with_id("evolink_ledger_two", run_conf={"output_dir": str(tmp_path)})
    assert state == "success", tasks
    stats = sim.stats()
    assert stats["tasks_created"] == 1, stats
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{TASK}-0.mp4", f"{TASK}-1.mp4"]
    record = task_state_store("evolink_ledger_two", run_id, "generate")["evolink_submission"]
    assert record["task_id"] == TASK and record["delivered"] is True

    state, tasks = clear_and_rerun("evolink_ledger_two", run_id)
    assert state == "success", tasks
    assert sim.stats()["tasks_created"] == 2  # R11: a clear of a delivered result asks for a new one


@pytest.mark.parametrize("conf", [{}, {"evolink_regenerate": True}, {"evolink_regenerate": ["t"]}])
def test_a_retry_after_a_forced_take_whose_post_answer_was_lost_resends_its_key(conf: dict[str, Any]) -> None:
    """regenerate on a clear (R13) POSTs with a new key; the answer is lost (intent only). The automatic
    retry of that clear (same max_tries) must resend that key (R02), not force yet another take."""

    class LostAnswer(FakeHook):
        def create_video_task(self, payload: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
            self.keys.append(idempotency_key)
            if len(self.keys) == 1:
                from evolink_provider.exceptions import EvolinkTransportError

                raise EvolinkTransportError("reset after processing", request_sent=True)
            return {"id": TASK, "status": "pending"}

    store = MemoryStore()
    store.set(
        STATE_KEY,
        SubmissionRecord(
            "fp-1", 0, "evl-" + "0" * 48, "task-unified-1-old", "seq-2", delivered=True
        ).as_stored(),
    )
    hook = LostAnswer()
    cleared = context(store, max_tries=5, try_number=3)
    cleared["dag_run"].conf = conf
    with pytest.raises(EvolinkError):  # the POST's outcome is unknown
        make(hook, cleared, regenerate=not conf).start(None)
    retry = context(store, max_tries=5, try_number=4)
    retry["dag_run"].conf = conf
    task = make(hook, retry, regenerate=not conf).start(None)

    assert task["id"] == TASK and len(hook.keys) == 2 and hook.keys[0] == hook.keys[1]


def test_reattach_never_ignores_a_stored_set_by_design(tmp_path: Path) -> None:
    """reattach="never": every try is its own generation (R13), stored files or not (documented)."""
    store, hook = MemoryStore(), ExpiredLinksHook()
    stored_everything(store, tmp_path / "out")
    ledger = make(hook, context(store, max_tries=2, try_number=2), reattach="never")
    ledger.start(str(tmp_path / "out"))
    assert len(hook.keys) == 1
