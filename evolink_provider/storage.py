"""Results out of EvoLink: streamed into a local folder or any object storage.

Result URLs expire after 24 h and editing steps need files, so the operators copy results into a local folder
or any ``ObjectStoragePath`` (``file://``, ``s3://``, ``gs://``, ...). Copies stream chunk by chunk (constant
memory), land under a temporary name first and are renamed only once complete and the size matches
``Content-Length``, so no half-written file ever carries the final name. HTTP stays in the hook.

Trust boundary: the answer that names the results is not trusted. File names are built only from the task
id (checked for safety: :data:`evolink_provider.answers.TASK_ID_PATTERN`) and the result's index
(:data:`STORED_NAME`); the extension comes from the file's first bytes (an allow-list of video and image
formats), never from the URL or ``Content-Type``; a symlink in the output folder is never followed, replaced
or taken for a stored result; each result is capped at :data:`DEFAULT_MAX_RESULT_BYTES` and every download
ends by the operator's deadline. Local inputs are checked and uploaded by :mod:`evolink_provider.uploads`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from evolink_provider.answers import (
    MAX_RESULTS_PER_TASK,
    TASK_ID_PATTERN,
    checked_task,
    is_task_id,
)
from evolink_provider.exceptions import EvolinkError, EvolinkTransportError, server_text
from evolink_provider.results import result_urls

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from evolink_provider.hooks.evolink import EvolinkHook

log = logging.getLogger(__name__)

#: Content types a result may be served as; its first bytes then decide what it is. Besides video and
#: image types, the generic ones object stores use for an object stored without a type (S3:
#: ``binary/octet-stream``), and RFC 4337's ``application/mp4``.
ACCEPTED_TYPES = ("video/", "image/", "application/octet-stream", "binary/octet-stream", "application/mp4")
#: EvoLink's own CLI refuses results above 1 GiB.
DEFAULT_MAX_RESULT_BYTES = 1 << 30
#: ``ftyp`` major brands of MP4 video (QuickTime's ``qt  `` is MOV); others (HEIC, AVIF, M4A) are refused.
MP4_BRANDS = frozenset(
    {b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"dash", b"mmp4"}
    | {b"M4V ", b"M4VP", b"M4VH", b"MSNV", b"f4v "}
)
#: Bytes read before the type is decided (WebM names its DocType within its first few dozen bytes).
HEAD_BYTES = 64
#: A stored result's name: ``<task id>-<index>.<ext>``, the id as :func:`~evolink_provider.answers.is_task_id`
#: allows it. The index is the digits after the last ``-``, so a name parses one way only: ids may contain
#: ``-<digits>`` and dots (``a-0.5`` is a safe id), so a name is taken for a task's result only when its
#: ``id`` and ``index`` groups are that task's (:func:`_is_result_name`), never by a glob alone.
STORED_NAME = re.compile(
    rf"(?P<id>{TASK_ID_PATTERN.pattern})-(?P<index>[0-9]+)\.(?P<ext>mp4|mov|webm|png|jpg|webp)"
)


class EvolinkStorageError(EvolinkError):
    """A result could not be stored as promised (wrong type, wrong size, a different file in the way)."""


class EvolinkStorageUnavailableError(EvolinkStorageError):
    """The output folder cannot be created or reached now (a network mount or a bucket not answering):
    nothing about the paid result, so a later try stores it."""

    retryable = True


class EvolinkServedContentError(EvolinkStorageError):
    """A result host served something that is not a video or image (an HTML error or challenge page with
    status 200): what it served this time, no evidence about the paid result, so nothing is stored and a
    later try downloads again (the ledger's row R25)."""

    retryable = True


@dataclass(frozen=True)
class StoredFile:
    """One result file as stored: its index in the task's results, final name, size and sha256 (computed
    while it streamed in), and ``stamp``, what the storage says identifies that version of the file (see
    :func:`file_stamp`). The ledger keeps these so that a later try accepts a file without reading it: the
    size alone would keep other bytes of the same size."""

    index: int
    name: str
    size: int
    sha256: str
    stamp: str = ""

    @classmethod
    def from_stored(cls, value: object) -> StoredFile | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(
                int(value["index"]),
                str(value["name"]),
                int(value["size"]),
                str(value["sha256"]),
                str(value.get("stamp") or ""),
            )
        except (KeyError, TypeError, ValueError):
            return None


#: Called after each rename with the file and how many results the task has.
OnStored = Callable[[StoredFile, int], None]


def as_storage_path(location: str) -> ObjectStoragePath:
    """A local path or a storage URI as one ``ObjectStoragePath`` (plain paths become ``file://``)."""
    from airflow.sdk import ObjectStoragePath

    if "://" not in location:
        location = Path(location).expanduser().resolve().as_uri()
    try:
        return ObjectStoragePath(location)
    except TypeError as error:
        # Airflow 3.0's ObjectStoragePath refuses every protocol under universal-pathlib 0.3 (Airflow 3.1
        # pins <0.3, 3.2 supports 0.3); pip lets the two meet when Airflow's constraints file is not used.
        raise EvolinkStorageError(
            f"Airflow cannot open {location!r} as object storage ({error}). On Airflow 3.0 install "
            "'universal-pathlib<0.3', as Airflow's constraints file for 3.0 does."
        ) from error


def object_uri(location: str) -> str:
    """The object a stored location names, without the Airflow connection that reached it.

    ``s3://aws_default@bucket/key`` is Airflow's way to pick the connection an ``ObjectStoragePath`` goes
    through; the object itself is ``s3://bucket/key``, which is what links and asset URIs name (a consumer
    DAG writes ``Asset("s3://bucket/key")``, and one object must be one asset whatever connection wrote
    it). The stored paths handed downstream (XCom ``files``) keep the ``conn_id@`` form, so they open
    through the same connection. Nothing else changes: the key is kept byte for byte.
    """
    scheme, separator, rest = location.partition("://")
    if not separator:
        return location
    authority, slash, path = rest.partition("/")
    return f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"


def result_extension(head: bytes) -> str | None:
    """The extension of an allowed result format shown by its first bytes, else ``None``."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "mov" if brand == b"qt  " else "mp4" if brand in MP4_BRANDS else None
    if head.startswith(b"\x1a\x45\xdf\xa3"):  # EBML: WebM only when its DocType says so (not Matroska)
        return "webm" if b"webm" in head[:HEAD_BYTES] else None
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def store_results(
    hook: EvolinkHook,
    task: dict[str, Any],
    output_path: str,
    deadline: float | None = None,
    max_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    known: Sequence[StoredFile] = (),
    on_stored: OnStored | None = None,
) -> list[str]:
    """Stream every result of ``task`` into ``output_path``; return the stored locations, in order.

    Locations are plain paths when ``output_path`` is one, URIs otherwise. A result already stored is not
    downloaded again: one that matches its ``known`` record (name and size), or, with no record of it, a
    regular file under its final name (only a completed download's rename makes one), which is logged. A
    file that contradicts its record is downloaded anew and replaced.

    :param deadline: epoch seconds by which every download must have ended (the operator's timeout).
    :param max_bytes: the most bytes stored per result.
    :param known: the files of this task an earlier try recorded.
    :param on_stored: told of every file this call stores, right after its rename.
    """
    if not is_task_id(task.get("id")):  # the id becomes a file name: only a safe one
        checked_task(task)  # raises, naming the rule the id breaks
    urls = result_urls(task)
    if len(urls) > MAX_RESULTS_PER_TASK + 1:  # + sora-character's profile picture
        raise EvolinkStorageError(
            f"EvoLink task {task['id']} lists {len(urls)} results; at most {MAX_RESULTS_PER_TASK} are stored"
        )
    if not urls:
        raise EvolinkStorageError(f"EvoLink task {task.get('id')} completed without any result to store")
    folder = _folder(output_path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a mount or bucket not answering, a file in the way
        raise EvolinkStorageUnavailableError(
            f"cannot create the output folder {output_path}: {error}"
        ) from error
    records = {item.index: item for item in known}
    stored = []
    for index, url in enumerate(urls):
        stem = f"{task['id']}-{index}"
        path = _already_stored(folder, str(task["id"]), index, records.get(index))
        if path is None:
            path, item = _store_one(hook, url, folder, stem, index, deadline, max_bytes)
            if on_stored is not None:
                on_stored(item, len(urls))
        stored.append(path)
    if "://" not in output_path:
        return [str(path) for path in stored]
    return [path.as_uri() if isinstance(path, Path) else str(path) for path in stored]


def verify_stored(
    task_id: str, output_path: str, files: Sequence[StoredFile], expected: int
) -> list[str] | None:
    """The locations of ``files`` when they are a complete set (indexes ``0..expected-1``) and each is
    still a regular file of its recorded size and stamp (or, with no stamp, its sha256); else None."""
    by_index = {item.index: item for item in files}
    if expected < 1 or sorted(by_index) != list(range(expected)):
        return None
    folder = _folder(output_path)
    found = []
    for index in range(expected):
        item = by_index[index]
        path = folder / item.name
        if not _is_result_name(item.name, task_id, index) or not _matches(path, item):
            return None
        found.append(path)
    if "://" not in output_path:
        return [str(path) for path in found]
    return [path.as_uri() if isinstance(path, Path) else str(path) for path in found]


def holds_any(task_id: str, output_path: str, files: Sequence[StoredFile]) -> bool:
    """Whether at least one of ``files`` is still in ``output_path`` as recorded. A folder this worker can
    never open (its filesystem package is not installed) holds nothing it can use; one that cannot be
    checked now (an outage) raises :class:`EvolinkStorageUnavailableError`: no verdict, so nothing paid."""
    try:
        folder = _folder(output_path)
        if not isinstance(folder, Path):
            folder.fs  # noqa: B018 - the filesystem is made on first use: its package may be missing here
    except (ImportError, ValueError):
        log.warning("The recorded folder %s cannot be opened on this worker; it is not used.", output_path)
        return False
    except Exception as error:  # fsspec's backends raise their own types (botocore's errors, ...)
        raise EvolinkStorageUnavailableError(
            f"cannot open the recorded folder {output_path}: {error}"
        ) from error
    return any(
        _is_result_name(item.name, task_id, item.index) and _matches(folder / item.name, item)
        for item in files
    )


def _folder(output_path: str) -> Path | ObjectStoragePath:
    # Local folders go through pathlib: same API, without fsspec's per-write overhead (~40 % throughput).
    try:
        remote = as_storage_path(output_path)
    except (OSError, RuntimeError) as error:  # resolving a local path: a symlink loop, a mount not answering
        raise EvolinkStorageUnavailableError(f"cannot open the folder {output_path}: {error}") from error
    return Path(remote.path) if remote.protocol in ("file", "local") else remote


def file_stamp(path: Path | ObjectStoragePath) -> str:
    """What identifies this version of a stored file without reading it: a local file's modification
    time (ns) and inode as of the rename; in object storage the ETag and last-modified time its
    filesystem's ``info`` gives, when it gives them (else nothing, and the sha256 decides)."""
    if isinstance(path, Path):
        st = path.stat()
        return f"{st.st_mtime_ns}:{st.st_ino}"
    info = path.fs.info(path.path)
    keys = ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated")
    return ";".join(f"{key}={info[key]}" for key in keys if isinstance(info, dict) and info.get(key))


def _matches(path: Path | ObjectStoragePath, item: StoredFile) -> bool:
    try:
        if isinstance(path, Path):
            if path.is_symlink() or not path.is_file() or path.stat().st_size != item.size:
                return False
        else:
            # fsspec's own exists() answers False on any error: info() tells "not there" (FileNotFoundError)
            # from a store that does not answer (anything else).
            info = path.fs.info(path.path)
            if info.get("type") != "file" or info.get("size") != item.size:
                return False
        if item.stamp and file_stamp(path) == item.stamp:
            return True
        if not item.sha256:  # a record from before sha256s were kept: its size and stamp are all there is
            return not item.stamp
        # Another version by its stamp (restored with cp -a, another worker's inode numbers on a shared
        # mount), or no stamp at all (a store whose info() gives no ETag or time, where the size alone
        # kept other bytes): the recorded sha256 decides, the file read once, rather than pay again.
        return _sha256_of(path) == item.sha256
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return False
    except Exception as error:  # EIO, a stale handle, a store not answering: cannot tell, so no verdict
        raise EvolinkStorageUnavailableError(f"cannot check the stored file {path}: {error}") from error


def _sha256_of(path: Path | ObjectStoragePath) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _already_stored(
    folder: Path | ObjectStoragePath, task_id: str, index: int, record: StoredFile | None
) -> Path | ObjectStoragePath | None:
    """The stored result ``index`` of ``task_id`` that a later try may keep without downloading it, or
    None."""
    if record is not None:
        path = folder / record.name
        if _is_result_name(record.name, task_id, index) and _matches(path, record):
            log.info("%s is stored as recorded (%d bytes); kept.", path, record.size)
            return path
        log.warning("%s does not match its record (%d bytes): downloading it again.", path, record.size)
        return None
    try:
        matches = [
            match
            for match in folder.glob(f"{task_id}-{index}.*")
            if _is_result_name(match.name, task_id, index)
            and not (isinstance(match, Path) and match.is_symlink())
        ]
    except OSError:
        return None
    if len(matches) != 1:
        return None
    log.info("%s is stored under its final name by an earlier try (no record of it): kept.", matches[0])
    return matches[0]


def _is_result_name(name: str, task_id: str, index: int) -> bool:
    """Whether ``name`` is result ``index`` of ``task_id`` (``a-0.5-0.mp4`` matches the glob ``a-0.*`` of
    task ``a`` but is result 0 of task ``a-0.5``)."""
    parts = STORED_NAME.fullmatch(name)
    return parts is not None and parts["id"] == task_id and parts["index"] == str(index)


def _store_one(
    hook: EvolinkHook,
    url: str,
    folder: Path | ObjectStoragePath,
    stem: str,
    index: int,
    deadline: float | None,
    max_bytes: int,
) -> tuple[Path | ObjectStoragePath, StoredFile]:
    with hook.open_result(url, deadline=deadline) as result:
        kind = result.content_type
        if not kind.startswith(ACCEPTED_TYPES):
            raise EvolinkServedContentError(
                f"result {stem} is {server_text(kind, 128) or 'untyped'}, not a video or image"
            )
        if result.content_length is not None and result.content_length > max_bytes:
            raise EvolinkStorageError(
                f"result {stem} announces {result.content_length} bytes, more than the {max_bytes} allowed"
            )
        chunks = iter(result.chunks)
        head = _head(chunks)
        suffix = result_extension(head)
        if suffix is None:
            raise EvolinkServedContentError(
                f"result {stem} (served as {server_text(kind, 128) or 'untyped'}) is not an MP4, MOV, WebM, "
                "PNG, JPEG or WebP file by its first bytes; nothing stored"
            )
        target = _target(folder, f"{stem}.{suffix}")
        _remove_stale_parts(folder, stem)
        partial = folder / f".{stem}.part-{secrets.token_hex(4)}"
        written = 0
        digest = hashlib.sha256()
        try:
            with _create_new(partial) as sink:
                for chunk in itertools.chain((head,), chunks):
                    written += len(chunk)
                    digest.update(chunk)
                    if written > max_bytes:
                        raise EvolinkStorageError(
                            f"result {stem} is larger than the {max_bytes} bytes allowed"
                        )
                    sink.write(chunk)
            if result.content_length is not None and written != result.content_length:
                raise EvolinkTransportError(
                    f"result {stem} ended after {written} of {result.content_length} announced bytes",
                    request_sent=True,
                )
            # Both are Path, or both ObjectStoragePath; a file in the way contradicted its record.
            cast(Any, partial).replace(target) if isinstance(partial, Path) else cast(Any, partial).rename(
                target
            )
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    log.info("Stored %s (%d bytes).", target, written)
    return target, StoredFile(index, target.name, written, digest.hexdigest(), file_stamp(target))


def _head(chunks: Iterator[bytes]) -> bytes:
    """At least :data:`HEAD_BYTES` of the body (fewer only if it is that short), however it trickles in."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= HEAD_BYTES:
            break
    return head


def _target(folder: Path | ObjectStoragePath, name: str) -> Path | ObjectStoragePath:
    """``folder / name``, refused unless it stays directly inside ``folder`` and is not a symlink."""
    if not STORED_NAME.fullmatch(name):
        raise EvolinkStorageError(f"refusing to store a result as {name!r}: not a name this provider builds")
    target = folder / name
    if isinstance(target, Path) and isinstance(folder, Path):
        if target.is_symlink():
            raise EvolinkStorageError(f"{target} is a symbolic link; it is never followed or replaced")
        if target.resolve().parent != folder.resolve():
            raise EvolinkStorageError(f"refusing to store {name!r} outside {folder}")
    return target


def _remove_stale_parts(folder: Path | ObjectStoragePath, stem: str) -> None:
    """Delete the temporary files a killed download of the same result left behind."""
    own = re.compile(rf"\.{re.escape(stem)}\.part-[0-9a-f]{{8}}")  # not another id's (``a-0.part-1``)
    try:
        for stale in folder.glob(f".{stem}.part-*"):
            if not own.fullmatch(stale.name):
                continue
            stale.unlink(missing_ok=True)
            log.info("Removed %s, left by an interrupted download.", stale)
    except OSError as error:
        log.warning("Could not clear stale partial downloads of %s: %s", stem, error)


def _create_new(partial: Path | ObjectStoragePath) -> IO[bytes]:
    """Open ``partial`` for writing; a local one only if nothing (not even a symlink) is in its place."""
    if isinstance(partial, Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        return os.fdopen(os.open(partial, flags, 0o644), "wb")
    return cast(IO[bytes], partial.open("wb"))
