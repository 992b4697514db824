"""``storage._matches`` and ``storage.file_stamp`` on object storage (the ``fs.info`` branch).

The local-folder tests never reach that branch; red-team pass 9's mutation run left its type, size and
stamp checks with no test that fails when they are broken. Here an in-memory fsspec bucket, opened through
Airflow's ``ObjectStoragePath`` like any ``s3://`` folder, answers ``info`` with an S3-like ``ETag`` and
counts reads, so each outcome the module documents is pinned: kept without reading, not there (False), or
no verdict (the retryable ``EvolinkStorageUnavailableError``).
"""

from __future__ import annotations

import errno
import hashlib
from typing import Any, ClassVar

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from evolink_provider.storage import (
    EvolinkStorageUnavailableError,
    StoredFile,
    _folder,
    _matches,
    file_stamp,
    holds_any,
)
from tests.test_redteam6 import TASK, VIDEO
from tests.test_redteam9 import register_scheme

FOLDER = "objtest://bucket/A"
NAME = f"{TASK}-0.mp4"
SHA256 = hashlib.sha256(VIDEO).hexdigest()


class Bucket(MemoryFileSystem):
    """fsspec's memory filesystem with its own store, an S3-like ``ETag`` (the md5 of a single-part
    upload) on files, the size a POSIX-like backend gives a directory (4096), a count of reads, and an
    ``info`` that raises ``fail_with`` when a test sets it (a store not answering)."""

    protocol = "objtest"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    reads: ClassVar[list[str]] = []
    fail_with: ClassVar[BaseException | None] = None
    DIR_SIZE = 4096

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        return super()._strip_protocol(path.removeprefix("objtest://") if isinstance(path, str) else path)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        info = dict(super().info(path, **kwargs))
        if info["type"] == "file":
            info["ETag"] = f'"{hashlib.md5(self.cat_file(path), usedforsecurity=False).hexdigest()}"'
        else:
            info["size"] = self.DIR_SIZE
        return info

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "r" in mode:
            self.reads.append(path)
        return super()._open(path, mode, *args, **kwargs)


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Bucket:
    monkeypatch.setattr(Bucket, "store", {})
    monkeypatch.setattr(Bucket, "pseudo_dirs", [""])
    monkeypatch.setattr(Bucket, "reads", [])
    register_scheme(
        monkeypatch, "objtest", lambda conn_id, options=None: Bucket(skip_instance_cache=True), Bucket
    )
    return Bucket(skip_instance_cache=True)


def etag_of(data: bytes) -> str:
    """The stamp ``file_stamp`` records for ``data`` in this bucket (written out, not computed by it)."""
    return f'ETag="{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def record(size: int = len(VIDEO), stamp: str = etag_of(VIDEO), sha256: str = SHA256) -> StoredFile:
    return StoredFile(0, NAME, size, sha256, stamp)


def check(item: StoredFile) -> bool:
    return _matches(_folder(FOLDER) / NAME, item)


def test_an_object_as_recorded_is_kept_without_reading_it(bucket: Bucket) -> None:
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO)
    assert file_stamp(_folder(FOLDER) / NAME) == etag_of(VIDEO)
    assert check(record()) is True
    assert bucket.reads == []  # the stamp settles it: the bytes are not read
    assert holds_any(TASK, FOLDER, [record()]) is True


def test_an_object_of_another_size_is_not_kept(bucket: Bucket) -> None:
    """Only the size is compared when the record has no stamp (a backend whose ``info`` gives none)."""
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO + b"!")
    assert check(record(stamp="")) is False
    assert check(record()) is False


def test_a_directory_in_place_of_the_object_is_not_kept(bucket: Bucket) -> None:
    """A "directory" (a prefix with objects under it) whose listed size is the recorded size."""
    bucket.pipe_file(f"bucket/A/{NAME}/part", VIDEO)
    assert bucket.info(f"bucket/A/{NAME}")["type"] == "directory"
    assert check(record(size=Bucket.DIR_SIZE, stamp="")) is False
    assert check(record(size=Bucket.DIR_SIZE)) is False
    assert bucket.reads == []


def test_a_missing_object_is_not_kept(bucket: Bucket) -> None:
    bucket.pipe_file("bucket/A/other.mp4", VIDEO)
    assert check(record()) is False
    assert check(record(stamp="")) is False
    assert holds_any(TASK, FOLDER, [record()]) is False


def test_another_stamp_with_the_recorded_sha256_is_kept(bucket: Bucket) -> None:
    """The same bytes under another version (a multipart re-upload: another ETag): the sha256 decides,
    the object read once."""
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO)
    assert check(record(stamp='ETag="3858f62230ac3c915f300c664312c63f-2"')) is True
    assert bucket.reads == [f"/bucket/A/{NAME}"]


def test_another_stamp_and_another_sha256_is_not_kept(bucket: Bucket) -> None:
    """Other bytes of the recorded size under another stamp; and a record without a sha256 (nothing to
    decide by) is not kept either."""
    other = VIDEO[:-1] + b"?"
    bucket.pipe_file(f"bucket/A/{NAME}", other)
    assert check(record()) is False
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO)
    assert check(record(stamp='ETag="old"', sha256="")) is False


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.EIO, "Input/output error"),
        PermissionError(errno.EACCES, "Access Denied"),
        TimeoutError("read timed out"),
        ConnectionError("endpoint not answering"),
        RuntimeError("event loop closed"),
        KeyError("Credentials"),
    ],
    ids=["EIO", "EACCES", "timeout", "connection", "runtime", "key"],
)
def test_an_info_that_cannot_answer_gives_no_verdict(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO)
    monkeypatch.setattr(Bucket, "fail_with", error)
    with pytest.raises(EvolinkStorageUnavailableError) as raised:
        check(record())
    assert raised.value.retryable is True


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError(errno.ENOENT, "Not Found"), NotADirectoryError(errno.ENOTDIR, "Not a directory")],
)
def test_an_info_that_says_not_there_is_not_kept(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO)
    monkeypatch.setattr(Bucket, "fail_with", error)
    assert check(record()) is False


def test_without_a_stamp_the_recorded_sha256_decides(bucket: Bucket) -> None:
    """A backend whose ``info`` gives no ETag or time records no stamp: other bytes of the recorded size
    are not kept (the size alone kept them), the recorded bytes are, read once."""
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO[:-1] + b"?")
    assert check(record(stamp="")) is False
    bucket.pipe_file(f"bucket/A/{NAME}", VIDEO)
    bucket.reads.clear()
    assert check(record(stamp="")) is True
    assert bucket.reads == [f"/bucket/A/{NAME}"]
