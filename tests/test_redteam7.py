"""A seventh attack on the money path (red-team pass 7), by a helper who wrote none of it.

First target: the newest changes to ``stored_in`` (the recorded folder holds only while a recorded file is
still there: ``Ledger._folder_of``, ``storage.holds_any``), a clear handing over stored files recording its
generation (``_from_storage``), and an output folder that cannot be created (``EvolinkStorageError``).
Its findings, each fixed (their tests failed before, as strict xfails on the pass's branch): F1 a recorded
folder this worker cannot open (no gcsfs, an unreachable endpoint) ended every try, a forced clear included,
with a raw ImportError; F2 an output folder that could not be created once ended the task without its
retries; F3 a result file put back with the recorded bytes but a new inode (``cp -a``, a shared mount's
inode numbers) was paid for again on a clear (R28). The rest are attacks the provider handled correctly.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError, fail_for
from evolink_provider.ledger import NewGeneration
from evolink_provider.records import STATE_KEY
from evolink_provider.storage import EvolinkStorageError
from tests.test_ledger import FakeHook, MemoryStore, context, make
from tests.test_redteam6 import TASK, VIDEO, DownloadHook, one_try, record_stored

#: An object-storage folder this worker cannot open (the try that stored there ran on a worker with
#: gcsfs; this one has none: fsspec raises ImportError). Any protocol whose filesystem raises something
#: other than OSError behaves the same (botocore's EndpointConnectionError for an unreachable S3 endpoint,
#: ValueError for a protocol fsspec does not know).
UNOPENABLE = "gs://bucket-of-try-one/A"


def pin_to_unopenable(store: MemoryStore, tmp_path: Path, indexes: tuple[int, ...], results: int) -> None:
    record_stored(store, tmp_path / "was-A", indexes=indexes, results=results, seen_ago=600)
    store.set(STATE_KEY, {**store.get(STATE_KEY), "stored_in": UNOPENABLE})


# -- findings ---------------------------------------------------------------------------------------


def test_an_unopenable_recorded_folder_does_not_crash_a_retry_rendering_another_folder(
    tmp_path: Path,
) -> None:
    """Result 0 of two went to gs://.../A (stored_in); the try failed before result 1. The retry runs on a
    worker that cannot open gs:// (no gcsfs there), and the user renders a local folder B. The links are
    alive: B can receive the whole set. But ``_recorded()`` -> ``stored_files()`` -> ``_folder_of`` ->
    ``holds_any`` opens the recorded folder outside any except, so every try dies with a raw ImportError
    before the ledger decides anything (not an EvolinkError)."""
    store, hook = MemoryStore(), DownloadHook(results=2, age=3600)
    pin_to_unopenable(store, tmp_path, indexes=(0,), results=2)
    try:
        task = one_try(hook, store, tmp_path / "B", max_tries=2, try_number=2)
    except (EvolinkError, AirflowFailException):
        return  # a clear refusal would be acceptable
    assert hook.keys == [] and len(task["files"]) == 2


def test_an_unopenable_recorded_folder_does_not_block_a_regenerate_clear(tmp_path: Path) -> None:
    """Same record. The user gives up on the paid video and clears with dag_run.conf evolink_regenerate
    (R13: submit). ``start`` builds its Situation first, and ``_recorded()`` opens the recorded folder:
    the forced clear dies with the same raw ImportError, so not even paying again gets the task instance
    out; only deleting its task_state_store row does."""
    store, hook = MemoryStore(), DownloadHook(results=2, age=3600)
    pin_to_unopenable(store, tmp_path, indexes=(0,), results=2)
    ctx = context(store, max_tries=5, try_number=3)
    ctx["dag_run"].conf = {"evolink_regenerate": True}
    task = make(hook, ctx).start(str(tmp_path / "B"))
    assert len(hook.keys) == 1 and task["id"] != TASK


def test_a_transient_output_folder_error_leaves_the_automatic_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paid task is completed; creating the output folder fails once with a transient OSError (EIO
    from a network mount, an automounter not up yet). 66a9ca6 turned that into an EvolinkStorageError,
    which is not retryable, so the operator's ``fail_for`` raises AirflowFailException and Airflow skips
    every remaining retry (before, the raw OSError was retried, as an OSError while writing the file
    still is). The paid video then waits for a human's clear; one after the links' 24 h pays again
    (R28), where the automatic retry a minute later would have delivered it."""
    store, hook = MemoryStore(), DownloadHook(results=1, age=600)
    record_stored(store, tmp_path / "unused", indexes=(), results=1, seen_ago=600)
    out = tmp_path / "B"
    real_mkdir = Path.mkdir
    calls = {"n": 0}

    def flaky_mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == out and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", flaky_mkdir)
    ledger = make(hook, context(store, max_tries=2, try_number=1))
    task = ledger.start(str(out))
    with pytest.raises(Exception) as raised:
        try:
            ledger.store(task, str(out), None)
        except EvolinkError as error:  # what BaseEvolinkOperator._finish does with it
            fail_for(error)
    assert not isinstance(raised.value, AirflowFailException), "a transient mkdir error skipped every retry"
    # The automatic retry (same generation) would have delivered it without paying.
    again = one_try(hook, store, out, max_tries=2, try_number=2)
    assert hook.keys == [] and again["files"] == [str(out / f"{TASK}-0.mp4")]


# -- attacks handled correctly (regression tests) -----------------------------------------------------


def test_a_write_error_inside_the_folder_stays_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the finding above: an OSError while writing the result is raw (Airflow retries it)."""
    import evolink_provider.storage as storage

    store, hook = MemoryStore(), DownloadHook(results=1, age=600)
    record_stored(store, tmp_path / "unused", indexes=(), results=1, seen_ago=600)

    def no_space(_partial: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "_create_new", no_space)
    ledger = make(hook, context(store, max_tries=2, try_number=1))
    task = ledger.start(str(tmp_path / "B"))
    with pytest.raises(OSError):
        ledger.store(task, str(tmp_path / "B"), None)
    assert hook.keys == []


def test_a_clear_from_storage_then_a_clear_that_reads_keeps_one_generation(tmp_path: Path) -> None:
    """Clear 1 hands over the stored set (generation recorded), fails before post_execute; clear 2 (another
    generation), files still there: used again, 0 POSTs, 0 reads."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_stored(store, tmp_path / "A")
    first = one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    assert store.get(STATE_KEY)["generation"] == "seq-5"
    second = one_try(hook, store, tmp_path / "C", max_tries=8, try_number=6)
    assert first["from_storage"] and second["from_storage"] and first["files"] == second["files"]
    assert hook.keys == [] and hook.read_ids == []


def test_a_set_split_between_the_recorded_folder_and_the_rendered_one_is_never_handed_over_mixed(
    tmp_path: Path,
) -> None:
    """Result 0 in A (recorded), a stray copy of result 1 in B under its final name: the set completes in A
    (the stray B file is never taken for result 1 of the set, nor written over)."""
    store, hook = MemoryStore(), DownloadHook(results=2, age=3600)
    record_stored(store, tmp_path / "A", indexes=(0,), results=2, seen_ago=600)
    (tmp_path / "B").mkdir()
    (tmp_path / "B" / f"{TASK}-1.mp4").write_bytes(b"stray")
    task = one_try(hook, store, tmp_path / "B", max_tries=2, try_number=2)
    assert task["files"] == [str(tmp_path / "A" / f"{TASK}-{i}.mp4") for i in (0, 1)]
    assert (tmp_path / "B" / f"{TASK}-1.mp4").read_bytes() == b"stray" and hook.keys == []


def test_a_retry_with_expired_links_and_the_recorded_folder_emptied_fails_without_paying(
    tmp_path: Path,
) -> None:
    """Every file in A removed, links expired, a retry renders B: R26 (fail), nothing written to A or B."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_stored(store, tmp_path / "A", seen_ago=3 * 24 * 3600)
    for item in (tmp_path / "A").iterdir():
        item.unlink()
    with pytest.raises(AirflowFailException):
        one_try(hook, store, tmp_path / "B", max_tries=2, try_number=2)
    assert hook.keys == [] and list((tmp_path / "A").iterdir()) == []


def test_an_expired_clear_after_a_partial_set_pays_once_and_starts_a_clean_record(tmp_path: Path) -> None:
    """Result 0 of two in A, links expired, a clear (R28): one POST, and the new record carries no stored_in
    (the new task's files go where this try asks)."""
    store, hook = MemoryStore(), DownloadHook(results=2, expired=True)
    record_stored(store, tmp_path / "A", indexes=(0,), results=2, seen_ago=3 * 24 * 3600)
    with pytest.raises(NewGeneration):
        one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    saved = store.get(STATE_KEY)
    assert len(hook.keys) == 1 and "stored_in" not in saved and saved["task_id"] != TASK


def test_a_relative_output_path_and_its_absolute_form_are_one_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, hook = MemoryStore(), DownloadHook(expired=True)
    monkeypatch.chdir(tmp_path)
    record_stored(store, tmp_path / "A")
    store.set(STATE_KEY, {**store.get(STATE_KEY), "stored_in": "A"})
    task = one_try(hook, store, tmp_path / "A", max_tries=5, try_number=3)
    assert task["from_storage"] is True and hook.keys == []


def test_the_stored_video_bytes_are_what_was_downloaded(tmp_path: Path) -> None:
    store, hook = MemoryStore(), DownloadHook(results=1, age=600)
    record_stored(store, tmp_path / "unused", indexes=(), results=1, seen_ago=600)
    task = one_try(hook, store, tmp_path / "B", max_tries=2, try_number=1)
    assert Path(task["files"][0]).read_bytes() == VIDEO and hook.keys == []


def test_a_fake_hook_never_posts_when_nothing_is_recorded_but_stored_in() -> None:
    """A record holding only stored_in (no task id) is an intent: resent, never a fresh key."""
    store, hook = MemoryStore(), FakeHook()
    store.set(
        STATE_KEY,
        {"fingerprint": "fp-1", "submission": 0, "idempotency_key": "evl-" + "1" * 48, "stored_in": "/x"},
    )
    make(hook, context(store, max_tries=2, try_number=2)).start("/y")
    assert hook.keys == ["evl-" + "1" * 48]


_ = EvolinkStorageError  # what the second finding's mkdir error becomes


def test_a_restored_file_with_the_recorded_bytes_is_not_paid_for_again(tmp_path: Path) -> None:
    """Every result stored in A and recorded (name, size, sha256, stamp = mtime_ns:inode); not delivered.
    The file is then restored from a backup or copied back with its times (cp -a, rsync -a: same bytes,
    same mtime, a new inode), or A is a shared mount whose inode numbers differ per worker (CIFS
    noserverino, gcsfuse, s3fs-fuse). A clear a day later (links expired): the stamp differs, so the set
    is not "stored" (R08), the task is read, the file "contradicts its record" and is downloaded again,
    the link is refused as expired and R28 pays a new generation, while the exact bytes paid for (their
    sha256 recorded) are on disk. (An automatic retry in the same state fails for good under R26.)"""
    import hashlib
    import os
    import shutil

    from evolink_provider.records import SubmissionRecord
    from evolink_provider.storage import StoredFile, file_stamp

    store, hook = MemoryStore(), DownloadHook(expired=True)
    folder = tmp_path / "A"
    folder.mkdir()
    path = folder / f"{TASK}-0.mp4"
    path.write_bytes(VIDEO)
    item = StoredFile(0, path.name, len(VIDEO), hashlib.sha256(VIDEO).hexdigest(), file_stamp(path))
    import time as _time

    record = SubmissionRecord(
        "fp-1",
        0,
        "evl-" + "0" * 48,
        TASK,
        "seq-2",
        completed_seen_at=_time.time() - 2 * 24 * 3600,
        results=1,
        stored=(item,),
        stored_in=str(folder),
    )
    store.set(STATE_KEY, record.as_stored())
    backup = tmp_path / "backup.mp4"
    shutil.copy2(path, backup)
    os.replace(backup, path)  # restored in place: same bytes, same mtime_ns, another inode
    assert path.read_bytes() == VIDEO and path.stat().st_mtime_ns == int(item.stamp.split(":")[0])

    try:
        task = one_try(hook, store, folder, max_tries=5, try_number=3)  # a plain clear
    except NewGeneration:
        task = {}
    assert hook.keys == [], f"paid a new generation ({len(hook.keys)}) for bytes already on disk"
    assert task.get("files") == [str(path)]


@pytest.mark.usefixtures("airflow_db")
def test_dag_a_restored_result_file_is_not_paid_for_again_by_a_clear(
    sim: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1 stores the video in A and fails in the user's post_execute (paid, undelivered). The file is
    restored in place with its bytes and times (a new inode). A clear a day later, links expired: the
    simulator counts a second task created."""
    import os
    import shutil

    from evolink_provider.timing import current, steered
    from tests.airflow_runs import clear_and_rerun
    from tests.test_redteam6 import _expire_links_of, _undelivered_run

    run_id, first, control = _undelivered_run(sim, tmp_path, monkeypatch)
    stored = tmp_path / "A" / f"{first}-0.mp4"
    shutil.copy2(stored, tmp_path / "copy")
    os.replace(tmp_path / "copy", stored)
    _expire_links_of(sim, first)
    (control / "FAIL").unlink()
    real = current().clock
    with steered(clock=lambda: real() + 24 * 3600 + 60):
        _state, _tasks = clear_and_rerun("evolink_rt6_var_output", run_id)
    assert sim.stats()["tasks_created"] == 1, "the clear paid again for bytes already in A"
