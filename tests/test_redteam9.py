"""A ninth attack on the money path (red-team pass 9), by a helper who wrote none of it.

Target: ``storage.holds_any`` / ``storage._matches`` telling "cannot tell" (retryable
``EvolinkStorageUnavailableError``) from "not there" (False). Its findings, each fixed (their tests failed
before, as strict xfails on the pass's branch): F1 fsspec's own ``exists()`` answers False on any error, so
a store not answering still counted as "not there" and a clear paid again (R28); F2 a forced clear (R13)
looked at the old folder first and failed while it could not be read; F3 a symlink loop in the output
folder ended the try with a raw RuntimeError.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.spec import AbstractFileSystem

from evolink_provider.exceptions import EvolinkError
from evolink_provider.ledger import NewGeneration
from evolink_provider.records import STATE_KEY
from evolink_provider.storage import EvolinkStorageUnavailableError, holds_any
from tests.test_ledger import MemoryStore, context, make
from tests.test_redteam6 import TASK, VIDEO, DownloadHook, one_try
from tests.test_redteam8 import record_real


def errors_inside(monkeypatch: pytest.MonkeyPatch, folder: Path, error: OSError) -> None:
    """Every stat/lstat of a file inside ``folder`` raises ``error``."""
    real_stat = Path.stat

    def stat(self: Path, *args: Any, **kwargs: Any) -> os.stat_result:
        if self.parent == folder:
            raise error
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)


class NotAnswering(AbstractFileSystem):
    """An fsspec backend that inherits AbstractFileSystem.exists (sftp, ftp, smb, webhdfs, ... do): the
    server does not answer, so every info() raises an I/O error."""

    protocol = "rt9flaky"

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        raise OSError(errno.EIO, "server not answering", path)


def register_scheme(
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
    get_fs: Callable[..., AbstractFileSystem],
    implementation: type[AbstractFileSystem],
) -> None:
    """``protocol://`` URIs open through Airflow's ``ObjectStoragePath`` with ``get_fs`` (the signature of
    a provider's ``get_fs(conn_id, options)``), and through fsspec's registry as ``implementation``."""
    import airflow.sdk.io.fs as airflow_fs

    registered = dict(airflow_fs._register_filesystems())
    registered[protocol] = get_fs
    monkeypatch.setattr(airflow_fs, "_register_filesystems", lambda: registered)
    fsspec.register_implementation(protocol, implementation, clobber=True)


@pytest.fixture
def flaky_scheme(monkeypatch: pytest.MonkeyPatch) -> None:
    register_scheme(
        monkeypatch,
        "rt9flaky",
        lambda conn_id, options=None: NotAnswering(skip_instance_cache=True),
        NotAnswering,
    )


# -- findings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rendered", ["same", "other"])
def test_a_not_answering_sync_fsspec_backend_does_not_pay_a_clear_again(
    tmp_path: Path, flaky_scheme: None, rendered: str
) -> None:
    """The set is stored in rt9flaky://bucket/A (an SFTP/FTP/SMB-like backend: fsspec's own
    AbstractFileSystem.exists is ``try: info() except: return False``). Two days later (links expired) a
    plain clear runs while that server does not answer. ``_matches`` calls ``path.exists()``, which turns
    the I/O error into False *inside fsspec*, so the new "cannot tell" branch is never reached: the
    set reads as gone, the expired link is refused and R28 buys a new generation while the paid bytes
    are where they were recorded."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_real(store, tmp_path / "was-A")
    store.set(STATE_KEY, {**store.get(STATE_KEY), "stored_in": "rt9flaky://bucket/A"})
    out = "rt9flaky://bucket/A" if rendered == "same" else str(tmp_path / "B")
    try:
        one_try(hook, store, out, max_tries=5, try_number=3)
    except NewGeneration:
        pass
    except EvolinkError as error:
        assert error.retryable
    assert hook.keys == [], f"{len(hook.keys)} generation(s) paid while the recorded server was down"


def test_control_the_not_answering_backend_is_reached(flaky_scheme: None) -> None:
    """F1's control: the scheme opens (no ValueError/ImportError "never open" path), and fsspec's exists()
    answers False on the outage rather than raising; the check asks info() and has no verdict."""
    from evolink_provider.storage import StoredFile, _folder

    folder = _folder("rt9flaky://bucket/A")
    assert isinstance(folder.fs, NotAnswering)
    with pytest.raises(OSError):
        folder.fs.info("bucket/A/x")
    assert folder.fs.exists("bucket/A/x") is False
    item = StoredFile(0, f"{TASK}-0.mp4", len(VIDEO), "h", "etag=1")
    with pytest.raises(EvolinkStorageUnavailableError):  # not "not there"
        holds_any(TASK, "rt9flaky://bucket/A", [item])


@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Permission denied"), OSError(errno.ESTALE, "Stale file handle")],
    ids=["EACCES", "ESTALE"],
)
def test_a_forced_clear_buys_a_fresh_take_when_the_old_folder_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    """R13: a clear with dag_run.conf evolink_regenerate=true submits whatever is recorded (intent, task
    or stored). ``Ledger._recorded()`` checks the old stored set before ``decide`` looks at ``why``, so
    an old folder this worker cannot read (EACCES: chmod'ed, or another user's; ESTALE) fails the forced
    clear retryably, forever when the error is permanent: the fresh take the user asked for (and would
    be stored in another folder) cannot be bought, and no retry or clear delivers the old one either."""
    store, hook = MemoryStore(), DownloadHook(expired=True)
    folder = tmp_path / "A"
    record_real(store, folder)
    errors_inside(monkeypatch, folder, error)
    ctx = context(store, max_tries=5, try_number=3)
    ctx["dag_run"].conf = {"evolink_regenerate": True}
    task = make(hook, ctx).start(str(tmp_path / "B"))
    assert len(hook.keys) == 1 and task["id"] != TASK


# -- attacks handled correctly ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.ENAMETOOLONG, "File name too long"),
        OSError(errno.ESTALE, "Stale file handle"),
        OSError(errno.EIO, "Input/output error"),
        TimeoutError("timed out"),
    ],
    ids=["EACCES", "ENAMETOOLONG", "ESTALE", "EIO", "timeout"],
)
@pytest.mark.parametrize("rendered", ["same", "other"])
def test_an_unreadable_recorded_file_on_a_plain_clear_buys_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, rendered: str
) -> None:
    store, hook = MemoryStore(), DownloadHook(expired=True)
    folder = tmp_path / "A"
    (path,) = record_real(store, folder)
    errors_inside(monkeypatch, folder, error)
    out = folder if rendered == "same" else tmp_path / "B"
    with pytest.raises(EvolinkStorageUnavailableError) as raised:
        one_try(hook, store, out, max_tries=5, try_number=3)
    monkeypatch.undo()
    assert raised.value.retryable and hook.keys == [] and path.read_bytes() == VIDEO


def test_the_stored_set_is_used_once_the_mount_answers_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, hook = MemoryStore(), DownloadHook(expired=True)
    folder = tmp_path / "A"
    record_real(store, folder)
    errors_inside(monkeypatch, folder, OSError(errno.ESTALE, "Stale file handle"))
    with pytest.raises(EvolinkStorageUnavailableError):
        one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    monkeypatch.undo()
    task = one_try(hook, store, tmp_path / "B", max_tries=5, try_number=4)  # its automatic retry
    assert task["from_storage"] is True and hook.keys == [] and hook.downloads == []
    assert task["files"] == [str(folder / f"{TASK}-0.mp4")]


def test_a_recorded_folder_that_became_a_file_holds_nothing(tmp_path: Path) -> None:
    store = MemoryStore()
    folder = tmp_path / "A"
    record_real(store, folder)
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
    folder.write_bytes(b"x")  # NotADirectoryError: genuinely not there
    from evolink_provider.storage import StoredFile

    item = StoredFile(0, f"{TASK}-0.mp4", len(VIDEO), "h", "1:2")
    assert holds_any(TASK, str(folder), [item]) is False


@pytest.mark.parametrize("raised", [RuntimeError("boom"), KeyError("endpoint_url"), TimeoutError("t")])
def test_an_object_storage_folder_whose_fs_raises_is_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception
) -> None:
    def broken(conn_id: Any, options: Any = None) -> Any:
        raise raised

    register_scheme(monkeypatch, "rt9broken", broken, NotAnswering)
    store, hook = MemoryStore(), DownloadHook(expired=True)
    record_real(store, tmp_path / "was-A")
    store.set(STATE_KEY, {**store.get(STATE_KEY), "stored_in": "rt9broken://bucket/A"})
    with pytest.raises(EvolinkStorageUnavailableError):
        one_try(hook, store, tmp_path / "B", max_tries=5, try_number=3)
    assert hook.keys == []


@pytest.mark.parametrize("recorded", [True, False], ids=["retry-of-stored-set", "fresh-collect"])
def test_a_symlink_loop_output_folder_fails_as_an_evolink_error(tmp_path: Path, recorded: bool) -> None:
    """The output folder (or an ancestor) is a symlink loop (a mis-pointed mount symlink). ``_folder``
    -> ``as_storage_path`` -> ``Path.resolve()`` raises ``RuntimeError("Symlink loop ...")`` on Python
    3.11/3.12; ``verify_stored`` and ``store_results`` call ``_folder`` outside any handler, so the try
    (a retry of a stored set, or the collect of a task just paid for) ends with a raw RuntimeError, not
    an EvolinkError (only ``holds_any`` wraps it, as retryable)."""
    store, hook = MemoryStore(), DownloadHook(expired=False, age=3600)
    folder = tmp_path / "A"
    if recorded:
        record_real(store, folder)
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
    folder.symlink_to(folder)
    if not recorded:
        from evolink_provider.records import SubmissionRecord

        store.set(STATE_KEY, SubmissionRecord("fp-1", 0, "evl-" + "0" * 48, TASK, "seq-2").as_stored())
    with pytest.raises(Exception) as raised:
        one_try(hook, store, folder, max_tries=2, try_number=2)
    assert isinstance(raised.value, EvolinkError), repr(raised.value)
    assert hook.keys == []
