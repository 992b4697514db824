"""An eighth attack on the money path (red-team pass 8), by a helper who wrote none of it.

First target: the seventh pass's fixes (``storage.holds_any`` treats a recorded folder it cannot open as
holding nothing; an output folder that cannot be created is ``EvolinkStorageUnavailableError``;
``storage._matches`` accepts a file whose stamp differs when its bytes hash to the recorded sha256;
``Ledger._from_storage`` fails retryably when the stored set changed between two checks).
Its finding F1, fixed (its tests failed before, as strict xfails on the pass's branch): a read error while
checking the stored set (EIO on a mount, a recorded bucket not answering) counted as "not stored", so a
clear after the links expired paid again (R28). A check that cannot tell now fails the try retryably. The
rest are attacks the provider handled correctly.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from evolink_provider.compat import AirflowFailException
from evolink_provider.exceptions import EvolinkError, RetryLaterError
from evolink_provider.ledger import NewGeneration
from evolink_provider.records import STATE_KEY, SubmissionRecord
from evolink_provider.storage import EvolinkStorageUnavailableError, StoredFile, file_stamp
from tests.test_ledger import MemoryStore
from tests.test_redteam6 import TASK, VIDEO, DownloadHook, one_try

DAY = 24 * 3600.0


def record_real(
    store: MemoryStore,
    folder: Path,
    indexes: tuple[int, ...] = (0,),
    results: int = 1,
    seen_ago: float = 2 * DAY,
) -> list[Path]:
    """Like test_redteam6.record_stored, with the real sha256 of the stored bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    stored, paths = [], []
    for index in indexes:
        path = folder / f"{TASK}-{index}.mp4"
        path.write_bytes(VIDEO)
        stored.append(
            StoredFile(index, path.name, len(VIDEO), hashlib.sha256(VIDEO).hexdigest(), file_stamp(path))
        )
        paths.append(path)
    record = SubmissionRecord(
        "fp-1",
        0,
        "evl-" + "0" * 48,
        TASK,
        "seq-2",
        completed_seen_at=time.time() - seen_ago,
        results=results,
        stored=tuple(stored),
        stored_in=str(folder),
    )
    store.set(STATE_KEY, record.as_stored())
    return paths


def io_errors_inside(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Every stat of a file inside ``folder`` fails with EIO (an NFS/CIFS/FUSE mount hiccup, a stale
    handle); the folder itself still answers (so mkdir(exist_ok=True) succeeds)."""
    real_stat = Path.stat

    def flaky_stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        if self.parent == folder:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", flaky_stat)


# -- findings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rendered", ["same", "other"])
def test_a_transient_read_error_on_the_stored_set_does_not_pay_a_clear_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rendered: str
) -> None:
    """The whole set is stored in A and recorded (real sha256), undelivered (the try failed in the user's
    post_execute). Two days later (links expired) the user clears; at that moment the mount holding A
    answers stat with EIO (NFS hiccup, stale handle; for an object-storage folder the seventh pass's
    ``holds_any`` does the same with any backend exception, e.g. an unreachable endpoint). ``_matches``
    turns every OSError into "not as recorded", ``holds_any`` into "holds nothing": the set is not "stored"
    (R08 skipped), the task is read (completed), the file is "downloaded again", the link is refused as
    expired and R28 submits a new generation, while the paid bytes are on disk, unchanged. Rendering the
    same folder or another one makes no difference. Expected: a retryable refusal (nothing bought), as an
    output folder that cannot be created already gets (EvolinkStorageUnavailableError)."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    folder = tmp_path / "A"
    (path,) = record_real(store, folder)
    io_errors_inside(monkeypatch, folder)
    out = folder if rendered == "same" else tmp_path / "B"
    try:
        one_try(hook, store, out, max_tries=5, try_number=3)  # a plain clear
    except NewGeneration:
        pass
    except EvolinkError as error:
        assert error.retryable
    monkeypatch.undo()
    assert path.read_bytes() == VIDEO  # the paid bytes never went anywhere
    assert hook.keys == [], f"{len(hook.keys)} new generation(s) paid while the paid set was on disk"


def test_an_unreachable_recorded_bucket_does_not_pay_a_clear_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The set is in s3://bucket/A (stored_in); the clear renders a local folder B. The S3 endpoint does
    not answer at that moment (here: the storage backend raises ConnectionError, as botocore's
    EndpointConnectionError is not an OSError). ``holds_any`` catches it and says the folder holds
    nothing, so the set "starts again" in B, the expired link is refused and R28 pays again."""
    import evolink_provider.storage as storage

    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_real(store, tmp_path / "was-A")
    store.set(STATE_KEY, {**store.get(STATE_KEY), "stored_in": "s3://bucket/A"})
    real_folder = storage._folder

    class Unreachable(Exception):
        pass

    def folder_of(output_path: str) -> Any:
        if output_path.startswith("s3://"):
            raise Unreachable("Could not connect to the endpoint URL")
        return real_folder(output_path)

    monkeypatch.setattr(storage, "_folder", folder_of)
    try:
        one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    except NewGeneration:
        pass
    except (EvolinkError, Unreachable):
        pass  # a refusal (even a raw one) buys nothing
    assert hook.keys == [], f"{len(hook.keys)} new generation(s) paid while the bucket was unreachable"


# -- attacks handled correctly (regression tests) -----------------------------------------------------


def test_same_size_other_bytes_with_a_new_stamp_is_never_handed_over(tmp_path: Path) -> None:
    """The sha256 fallback: a file of the recorded size, new stamp, other bytes is not the paid result; with
    the links expired a retry fails (R26) and hands nothing over, 0 POSTs."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    (path,) = record_real(store, tmp_path / "A")
    path.unlink()
    path.write_bytes(VIDEO[:-1] + b"X")
    with pytest.raises(AirflowFailException):
        one_try(hook, store, tmp_path / "A", max_tries=2, try_number=2)
    assert hook.keys == [] and path.read_bytes() == VIDEO[:-1] + b"X"


def test_same_bytes_behind_a_symlink_are_not_taken(tmp_path: Path) -> None:
    """The recorded name is now a symlink to a file with the recorded bytes: never followed (links
    expired, a retry: R26), nothing written through it."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    (path,) = record_real(store, tmp_path / "A")
    elsewhere = tmp_path / "elsewhere.mp4"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    with pytest.raises((AirflowFailException, EvolinkError)):
        one_try(hook, store, tmp_path / "A", max_tries=2, try_number=2)
    assert hook.keys == [] and elsewhere.read_bytes() == VIDEO


def test_a_directory_or_fifo_in_place_of_the_result_is_not_read(tmp_path: Path) -> None:
    """A FIFO under the recorded name with a new stamp: never opened for the sha256 (no hang)."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    (path,) = record_real(store, tmp_path / "A")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises((AirflowFailException, EvolinkError)):
        one_try(hook, store, tmp_path / "A", max_tries=2, try_number=2)
    assert hook.keys == []


def test_a_set_that_changes_between_the_two_checks_fails_retryably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import evolink_provider.storage as storage

    store, hook = MemoryStore(), DownloadHook(expired=True)
    (path,) = record_real(store, tmp_path / "A")
    real = storage.verify_stored
    calls = {"n": 0}

    def verify(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            path.unlink()
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "verify_stored", verify)
    with pytest.raises(RetryLaterError):
        one_try(hook, store, tmp_path / "A", max_tries=5, try_number=3)
    assert hook.keys == [] and hook.read_ids == []


def test_a_file_in_the_way_of_the_output_folder_is_retryable_and_buys_nothing(tmp_path: Path) -> None:
    store, hook = MemoryStore(), DownloadHook(results=1, age=600)
    record_real(store, tmp_path / "unused", indexes=(), results=1, seen_ago=600)
    blocker = tmp_path / "B"
    blocker.write_bytes(b"in the way")
    with pytest.raises(EvolinkStorageUnavailableError):
        one_try(hook, store, blocker, max_tries=2, try_number=2)
    assert hook.keys == [] and blocker.read_bytes() == b"in the way"


def test_a_restored_copy_in_another_rendered_folder_is_used_where_recorded(tmp_path: Path) -> None:
    """The set in A restored with a new inode (sha256 fallback) while the clear renders B: handed over
    from A, 0 POSTs, 0 reads, nothing written in B."""
    import shutil

    store, hook = MemoryStore(), DownloadHook(expired=True)
    (path,) = record_real(store, tmp_path / "A")
    shutil.copy2(path, tmp_path / "copy")
    os.replace(tmp_path / "copy", path)
    task = one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    assert task["from_storage"] and task["files"] == [str(path)]
    assert hook.keys == [] and hook.read_ids == [] and not (tmp_path / "B").exists()
