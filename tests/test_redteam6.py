"""A sixth attack on the money path (red-team pass 6), by a helper who wrote none of it.

First target: ``SubmissionRecord.stored_in`` (a task's files stay in the folder the first of them went to).
Its findings, each fixed (the tests under "findings" failed before): F1 a clear that handed over stored
files kept the old generation, so its automatic retry counted as a clear and paid (R28 instead of R26);
F2 the pinned folder was used with nothing recorded left in it; F3 an unusable pinned folder failed every
try with a raw OSError; F4 a try rendering no ``output_path`` did not see the stored set (R08). The others
are attacks the provider handled correctly, kept as regression tests.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkNotFoundError
from evolink_provider.ledger import NewGeneration
from evolink_provider.records import STATE_KEY, SubmissionRecord
from evolink_provider.storage import StoredFile
from tests.test_ledger import FakeHook, MemoryStore, context, make

TASK = "task-unified-1774857405-abc123"
DAY = 24 * 3600.0
VIDEO = b"\x00\x00\x00\x18ftypisom" + b"-paid-video-bytes" * 8


def completed(results: int = 1, age: float = 3 * DAY) -> dict[str, Any]:
    return {
        "id": TASK,
        "status": "completed",
        "created": int(time.time() - age),
        "results": [f"https://cdn.example/v{i}.mp4" for i in range(results)],
    }


class DownloadHook(FakeHook):
    """Reads answer TASK completed; result links serve VIDEO, or 404 when ``expired``."""

    def __init__(self, results: int = 1, expired: bool = False, age: float = 3 * DAY) -> None:
        super().__init__([completed(results, age)] * 20)
        self.expired = expired
        self.downloads: list[str] = []

    @contextmanager
    def open_result(self, url: str, deadline: float | None = None) -> Any:
        self.downloads.append(url)
        if self.expired:
            raise EvolinkNotFoundError("expired", status_code=404)
        yield SimpleNamespace(content_type="video/mp4", content_length=len(VIDEO), chunks=iter([VIDEO]))


def record_stored(
    store: MemoryStore,
    folder: Path,
    indexes: tuple[int, ...] = (0,),
    results: int = 1,
    seen_ago: float = 2 * DAY,
    generation: str = "seq-2",
    stored_in: bool = True,
) -> None:
    """Results ``indexes`` of TASK stored under ``folder`` and recorded; not delivered."""
    folder.mkdir(parents=True, exist_ok=True)
    stored = []
    for index in indexes:
        path = folder / f"{TASK}-{index}.mp4"
        path.write_bytes(VIDEO)
        from evolink_provider.storage import file_stamp

        stored.append(StoredFile(index, path.name, len(VIDEO), "h", file_stamp(path)))
    record = SubmissionRecord(
        "fp-1",
        0,
        "evl-" + "0" * 48,
        TASK,
        generation,
        completed_seen_at=time.time() - seen_ago,
        results=results,
        stored=tuple(stored),
        stored_in=str(folder) if stored_in else None,
    )
    store.set(STATE_KEY, record.as_stored())


def one_try(hook: FakeHook, store: MemoryStore, output: Path | str, max_tries: int, try_number: int) -> Any:
    """What the operator does with the ledger on one try: start, then store unless handed from storage."""
    ledger = make(hook, context(store, max_tries=max_tries, try_number=try_number))
    task = ledger.start(str(output))
    if task.get("from_storage"):
        return task
    return {**task, "files": ledger.store(task, str(output), None)}


# -- findings ---------------------------------------------------------------------------------------


def test_the_automatic_retry_of_a_clear_that_used_stored_files_does_not_pay_for_expired_links(
    tmp_path: Path,
) -> None:
    """A clear (max_tries 2 -> 5) finds every file stored (R08: use stored) and hands it over, but the try
    fails before post_execute (a user's post_execute, an XCom push, a killed worker). _from_storage never
    records the clear's generation (the read path and delivered() do), so its *automatic retry* (same
    max_tries) is classified a clear again. On that retry the local file is not there (another worker, or
    it was removed), the task is read, the links are proven expired: a retry must fail (R26: "an
    automatic retry never buys a new generation"), but as a "clear" it POSTs a new generation (R28)."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    out = tmp_path / "out"
    record_stored(store, out)

    cleared = one_try(hook, store, out, max_tries=5, try_number=3)  # the clear: from storage, 0 POSTs
    assert cleared["from_storage"] is True and hook.keys == []
    # ... and that try fails after the ledger handed the files over (nothing marks them delivered).
    (out / f"{TASK}-0.mp4").unlink()  # the retry runs on another worker

    with pytest.raises((AirflowFailException, NewGeneration)) as raised:
        one_try(hook, store, out, max_tries=5, try_number=4)  # its automatic retry
    assert raised.type is AirflowFailException, f"an automatic retry bought a generation: {hook.keys}"
    assert hook.keys == []


def test_control_the_retry_of_a_clear_that_read_its_task_is_a_retry(tmp_path: Path) -> None:
    """Control for F1: when the clear read the task (R06), its generation is recorded, and its retry with
    expired links fails (R26) without a POST."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    out = tmp_path / "out"
    record_stored(store, out, indexes=(0,), results=2, seen_ago=DAY - 600)  # partial, links still alive
    hook.expired = False
    hook.reads = [completed(2)] * 20

    class Boom(Exception):
        pass

    def fail_second(url: str) -> None:
        if url.endswith("v1.mp4"):
            raise Boom

    original = hook.open_result

    @contextmanager
    def flaky(url: str, deadline: float | None = None) -> Any:
        fail_second(url)
        with original(url, deadline) as result:
            yield result

    hook.open_result = flaky  # type: ignore[method-assign]
    with pytest.raises(Boom):
        one_try(hook, store, out, max_tries=5, try_number=3)  # a clear: read (R06), stores nothing new
    assert store.get(STATE_KEY)["generation"] == "seq-5"


def test_a_pinned_folder_with_nothing_left_in_it_does_not_receive_the_set(tmp_path: Path) -> None:
    """Result 0 of two went to A (stored_in=A); the try failed. The user then removes A (the wrong place)
    and renders output_path B. Nothing recorded is left in A, so there is no set to keep together; yet
    the retry recreates A and downloads every result there (written outside the try's output_path),
    and hands downstream paths the user no longer intends."""
    store, hook = MemoryStore(), DownloadHook(results=2, age=3600)
    first, second = tmp_path / "A", tmp_path / "B"
    record_stored(store, first, indexes=(0,), results=2, seen_ago=600)
    for item in first.iterdir():
        item.unlink()
    first.rmdir()

    task = one_try(hook, store, second, max_tries=2, try_number=2)

    assert not first.exists(), f"the removed folder was recreated and filled: {task['files']}"
    assert all(str(second) in f for f in task["files"])


def test_a_pinned_folder_that_cannot_be_written_any_more_still_lets_the_paid_video_be_delivered(
    tmp_path: Path,
) -> None:
    """Result 0 of two went to A; A is then unusable (here a regular file stands in its place, as when a
    mount, a bucket connection or a worker-local disk is gone) and the user renders output_path B. Before
    the fix every retry and plain clear insisted on A and died with a raw FileExistsError before any
    download; now nothing recorded is left in A, so the set is stored in B."""
    store, hook = MemoryStore(), DownloadHook(results=2, age=3600)
    first, second = tmp_path / "A", tmp_path / "B"
    record_stored(store, first, indexes=(0,), results=2, seen_ago=600)
    for item in first.iterdir():
        item.unlink()
    first.rmdir()
    first.write_bytes(b"not a folder")

    task = one_try(hook, store, second, max_tries=2, try_number=2)  # the retry delivers into B

    assert hook.keys == [] and task["files"] == [str(second / f"{TASK}-{i}.mp4") for i in (0, 1)]


@pytest.mark.parametrize("rendered", [None, ""])
def test_a_stored_set_is_used_when_a_later_try_renders_no_output_path(
    tmp_path: Path, rendered: str | None
) -> None:
    """Every result is stored in A and recorded (stored_in=A), not delivered; links expired. A later try's
    output_path renders empty (a Variable or param gone): the record's docstring says R08/R09 hold
    "whatever it renders", and the table's "stored" is "every result file recorded and still on disk".
    Before the fix the try read the task (R06) and handed downstream only its expired links, recorded as
    delivered, so the next clear paid again (R11)."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_stored(store, tmp_path / "A")
    ledger = make(hook, context(store, max_tries=5, try_number=3))
    task = ledger.start(rendered)  # type: ignore[arg-type]
    assert task.get("from_storage") is True, f"read the task instead ({hook.read_ids}): dead links handed on"


# -- attacks handled correctly (regression tests) -----------------------------------------------------


def test_a_complete_set_whose_pinned_folder_was_deleted_is_downloaded_again_within_a_day(
    tmp_path: Path,
) -> None:
    store, hook = MemoryStore(), DownloadHook(results=2, age=3600)
    first = tmp_path / "A"
    record_stored(store, first, indexes=(0, 1), results=2, seen_ago=600)
    for item in first.iterdir():
        item.unlink()
    task = one_try(hook, store, first, max_tries=2, try_number=2)
    assert hook.keys == [] and len(task["files"]) == 2 and len(hook.downloads) == 2


def test_a_replaced_file_in_the_pinned_folder_is_never_handed_over(tmp_path: Path) -> None:
    """The only recorded file in A was replaced (same size, other bytes): nothing of the set is left to keep
    together there, so the result is downloaded again where this try asks (B), never taken from A."""
    store, hook = MemoryStore(), DownloadHook(results=1, age=3600)
    first = tmp_path / "A"
    record_stored(store, first, seen_ago=600)
    target = first / f"{TASK}-0.mp4"
    target.unlink()
    target.write_bytes(b"X" * len(VIDEO))  # same size, other bytes, new inode
    task = one_try(hook, store, tmp_path / "B", max_tries=2, try_number=2)
    assert hook.keys == [] and hook.downloads
    assert task["files"] == [str(tmp_path / "B" / f"{TASK}-0.mp4")]
    assert (tmp_path / "B" / f"{TASK}-0.mp4").read_bytes() == VIDEO


def test_expired_links_and_a_changed_file_on_a_retry_fail_without_paying(tmp_path: Path) -> None:
    store, hook = MemoryStore(), DownloadHook(expired=True)
    first = tmp_path / "A"
    record_stored(store, first)
    (first / f"{TASK}-0.mp4").write_bytes(b"changed")
    with pytest.raises(AirflowFailException):
        one_try(hook, store, tmp_path / "B", max_tries=2, try_number=2)
    assert hook.keys == []


def test_a_regenerate_clear_starts_a_new_folder_record(tmp_path: Path) -> None:
    store, hook = MemoryStore(), DownloadHook(results=1, age=3600)
    record_stored(store, tmp_path / "A")
    ctx = context(store, max_tries=5, try_number=3)
    ctx["dag_run"].conf = {"evolink_regenerate": True}
    task = make(hook, ctx).start(str(tmp_path / "B"))
    saved = store.get(STATE_KEY)
    assert len(hook.keys) == 1 and task["id"] != TASK
    assert "stored_in" not in saved and "stored" not in saved


def test_stored_in_and_output_path_in_object_storage_uri_form(tmp_path: Path) -> None:
    """stored_in as a file:// URI, output_path a plain path (and the reverse): the set is used in place."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    first = tmp_path / "A"
    record_stored(store, first)
    saved = store.get(STATE_KEY)
    store.set(STATE_KEY, {**saved, "stored_in": first.as_uri()})
    task = one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    assert task["from_storage"] is True and task["files"] == [(first / f"{TASK}-0.mp4").as_uri()]
    assert hook.keys == [] and hook.read_ids == []


@pytest.mark.parametrize("value", [7, "", None, ["x"], {"a": 1}])
def test_a_garbled_stored_in_falls_back_to_output_path(tmp_path: Path, value: Any) -> None:
    store, hook = MemoryStore(), DownloadHook(expired=True)
    first = tmp_path / "A"
    record_stored(store, first)
    store.set(STATE_KEY, {**store.get(STATE_KEY), "stored_in": value})
    task = one_try(hook, store, first, max_tries=2, try_number=2)
    assert task["from_storage"] is True and hook.keys == []


def test_two_map_indexes_keep_their_own_folders(tmp_path: Path) -> None:
    """Each map index has its own record; their files never mix (names carry the task id)."""
    from evolink_provider.records import task_instance_identity

    a, b = context(MemoryStore()), context(MemoryStore())
    b["ti"].map_index = 1
    assert task_instance_identity(a) != task_instance_identity(b)


def test_a_legacy_record_without_stored_in_uses_output_path(tmp_path: Path) -> None:
    """Written before stored_in existed: the same output_path still finds the set (R08)."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_stored(store, tmp_path / "A", stored_in=False)
    task = one_try(hook, store, tmp_path / "A", max_tries=5, try_number=3)
    assert task["from_storage"] is True and hook.keys == []


def test_partial_sets_over_three_renders_end_in_one_folder(tmp_path: Path) -> None:
    """Result 0 in A, result 1 on a try rendering B, result 2 on a try rendering C: all in A."""
    store = MemoryStore()
    record_stored(store, tmp_path / "A", indexes=(0,), results=3, seen_ago=600)
    hook = DownloadHook(results=3, age=3600)
    task = one_try(hook, store, tmp_path / "B", max_tries=2, try_number=2)
    assert all(str(tmp_path / "A") in f for f in task["files"]) and len(hook.downloads) == 2
    again = one_try(FakeHook(), store, tmp_path / "C", max_tries=5, try_number=3)
    assert again["from_storage"] is True and again["files"] == task["files"]
    assert not (tmp_path / "B").exists() and not (tmp_path / "C").exists()


# -- the same findings in real DAG runs (dag.test(), clears as the UI does), counted by the simulator ------


def _expire_links_of(sim: Any, task_id: str) -> None:
    sim.add_faults({"kind": "status", "status": 404, "method": "GET", "path_prefix": f"/media/{task_id}/"})


def _undelivered_run(sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, Path]:
    """Run 1: the video is stored in A, both tries fail in the user's post_execute: paid, undelivered."""
    from tests.airflow_runs import run_dag_with_id, task_state_store

    control, out = tmp_path / "ctl", tmp_path / "A"
    control.mkdir()
    monkeypatch.setenv("EVOLINK_RT6_CTL", str(control))
    monkeypatch.setenv("AIRFLOW_VAR_EVOLINK_RT6_OUT", str(out))
    (control / "FAIL").write_text("x")
    _state, run_id, tasks = run_dag_with_id("evolink_rt6_var_output")
    assert tasks["generate"][0] == "failed", tasks
    record = task_state_store("evolink_rt6_var_output", run_id, "generate")["evolink_submission"]
    assert not record.get("delivered") and record["stored_in"] == str(out)
    assert sim.stats()["tasks_created"] == 1
    return run_id, record["task_id"], control


def _clear_a_day_later(run_id: str) -> tuple[str, Any]:
    """Clear the run's task instances as the UI does, a day after the task was seen completed."""
    from evolink_provider.timing import current, steered
    from tests.airflow_runs import clear_and_rerun

    real = current().clock
    with steered(clock=lambda: real() + 24 * 3600 + 60):
        return clear_and_rerun("evolink_rt6_var_output", run_id)


@pytest.mark.usefixtures("airflow_db")
def test_dag_the_retry_of_a_clear_that_used_stored_files_buys_no_generation(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, first, control = _undelivered_run(sim, tmp_path, monkeypatch)
    _expire_links_of(sim, first)
    (control / "WIPE").write_text("x")  # the clear's try uses the stored set, then fails on "another worker"
    _state, tasks = _clear_a_day_later(run_id)
    assert tasks["generate"][1] == 4, tasks  # the clear's try and its automatic retry
    assert sim.stats()["tasks_created"] == 1, "the automatic retry of the clear bought a new generation"


@pytest.mark.usefixtures("airflow_db")
def test_dag_a_later_try_without_output_path_hands_over_the_stored_set(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.airflow_runs import task_state_store, xcom

    run_id, first, control = _undelivered_run(sim, tmp_path, monkeypatch)
    _expire_links_of(sim, first)
    (control / "FAIL").unlink()
    monkeypatch.delenv("AIRFLOW_VAR_EVOLINK_RT6_OUT")  # the Variable is gone: output_path renders ""
    state, tasks = _clear_a_day_later(run_id)
    value = xcom("evolink_rt6_var_output", "generate")
    record = task_state_store("evolink_rt6_var_output", run_id, "generate")["evolink_submission"]
    assert sim.stats()["tasks_created"] == 1
    # Delivered from A, where the files are (before the fix the XCom held only the expired links).
    assert state == "success" and record["delivered"] is True, (state, tasks)
    assert value.get("files") == [str(tmp_path / "A" / f"{first}-0.mp4")], value


def test_a_set_moved_to_the_folder_a_later_try_renders_is_used_there(tmp_path: Path) -> None:
    """The user moved the stored set from A to B and renders B: nothing is left in A, the set is complete
    in B as recorded (name, size; a move keeps the inode), so it is handed over from B, nothing read."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    first, second = tmp_path / "A", tmp_path / "B"
    record_stored(store, first)
    first.rename(second)

    task = one_try(hook, store, second, max_tries=2, try_number=2)

    assert task["from_storage"] is True and task["files"] == [str(second / f"{TASK}-0.mp4")]
    assert hook.keys == [] and hook.read_ids == []
