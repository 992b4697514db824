"""Which local inputs may be uploaded to EvoLink's Files API, checked before any HTTP call.

Trust boundary: ``image_urls`` and the other media fields are templated, so whoever can trigger a run with
``conf`` chooses them. A path there makes the worker read a file and publish it on EvoLink's public Files
API, so only what the deployment allows goes: a regular file (no ``/proc``, ``/dev``, ``/sys``, FIFO,
socket, device or directory), inside the folders of the connection extra ``upload_allowed_dirs`` (default:
Airflow's DAGs folder; a symlink counts where it points), of a type the Files API documents (JPEG, PNG, WEBP,
GIF) by extension *and* by its first bytes, and at most :data:`MAX_UPLOAD_BYTES`. Storage URIs (``s3://``,
``gs://``, ...) go only when a listed entry is a prefix of them. The file is then streamed with its checked
size: one that grows or shrinks meanwhile is refused rather than sent.

The path is checked before it is opened, and the *opened file* again after (:func:`_opened_location`):
whoever can write into a folder on the path could swap a parent folder for a symlink between the check
and the open (``O_NOFOLLOW`` guards the last component only), and the file read would be another one.
A hard link inside an allowed folder is accepted: it *is* the file, by a name inside the folder, and
whoever can make one there could as well copy the file there.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import os
import stat
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

from evolink_provider.exceptions import EvolinkInputRefusedError

if TYPE_CHECKING:
    from evolink_provider.field_rules import MediaRef
    from evolink_provider.hooks.evolink import EvolinkHook

log = logging.getLogger(__name__)

#: EvoLink's documented limit for a reference image.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Extensions of the image types the Files API documents, and the type their first bytes must show.
IMAGE_EXTENSIONS = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
}
#: Pseudo-filesystems: never uploaded, whatever the allowed folders say.
SYSTEM_ROOTS = (Path("/proc"), Path("/dev"), Path("/sys"))
#: Linux names the file behind each open descriptor here (see :func:`_opened_location`).
PROC_FD = Path("/proc/self/fd")


def image_type(head: bytes) -> str | None:
    """The image type the first bytes show, for the types the Files API documents."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True)
class AllowedLocations:
    """Where uploads may come from: resolved local folders and storage-URI prefixes."""

    folders: tuple[Path, ...]
    uri_prefixes: tuple[str, ...]
    #: Who set them, for the refusal message: "connection 'evolink_default'".
    source: str = "the connection"

    @property
    def rule(self) -> str:
        listed = ", ".join([str(folder) for folder in self.folders] + list(self.uri_prefixes)) or "nothing"
        return (
            f"files inside the folders of the extra upload_allowed_dirs of {self.source} "
            f"(default: the DAGs folder); allowed now: {listed}"
        )


def allowed_locations(configured: tuple[str, ...], source: str = "the connection") -> AllowedLocations:
    """The connection's ``upload_allowed_dirs``, or Airflow's DAGs folder when it lists none."""
    entries = list(configured)
    if not entries:
        from evolink_provider.compat import conf

        entries = [conf.get("core", "dags_folder")]
    folders, prefixes = [], []
    for entry in entries:
        if entry.startswith("file://"):
            entry = unquote(urlsplit(entry).path)
        if "://" in entry:
            prefixes.append(entry if entry.endswith("/") else entry + "/")
        else:
            folders.append(Path(os.path.realpath(Path(entry).expanduser())))
    return AllowedLocations(tuple(folders), tuple(prefixes), source)


@dataclass
class CheckedInput:
    """An input that passed every check, open for streaming."""

    stream: CheckedStream
    name: str
    content_type: str


def open_checked_input(ref: MediaRef, label: str, allowed: AllowedLocations) -> CheckedInput:
    """Open ``ref`` for upload, or raise :class:`EvolinkInputRefusedError` naming ``label``, the value and
    the rule it breaks. The caller closes ``stream``."""

    def refuse(rule: str) -> EvolinkInputRefusedError:
        return EvolinkInputRefusedError(label, ref.value, rule)

    value = ref.value
    if value.startswith("file://"):
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost"):
            raise refuse("file:// URIs of this machine only")
        value = unquote(parts.path)
    if "://" in value:
        return _open_storage_uri(value, refuse, allowed)
    return _open_local_file(Path(value).expanduser(), refuse, allowed)


def _check_location(real: Path, refuse: Any, allowed: AllowedLocations) -> None:
    if any(real == root or real.is_relative_to(root) for root in SYSTEM_ROOTS):
        raise refuse("regular image files; /proc, /dev and /sys are never uploaded")
    if not any(real.is_relative_to(folder) for folder in allowed.folders):
        raise refuse(allowed.rule)


def _opened_location(descriptor: int, path: Path) -> Path | None:
    """Where the file open as ``descriptor`` is. On Linux the kernel says (``/proc/self/fd/N`` names the
    file that was opened, whatever was swapped since); elsewhere ``path`` resolved again, trusted only
    when it still leads to the very file opened (same device and inode). ``None``: it cannot be told."""
    try:
        return Path(os.readlink(PROC_FD / str(descriptor)))
    except OSError:
        pass
    again = Path(os.path.realpath(path))
    try:
        now, opened = os.stat(again), os.fstat(descriptor)
    except OSError:
        return None
    return again if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino) else None


def _open_local_file(path: Path, refuse: Any, allowed: AllowedLocations) -> CheckedInput:
    real = Path(os.path.realpath(path))  # symlinks count where they point
    _check_location(real, refuse, allowed)
    content_type = IMAGE_EXTENSIONS.get(real.suffix.lower())
    if content_type is None:
        raise refuse(f"images named {', '.join(IMAGE_EXTENSIONS)} (the Files API takes images only)")
    try:
        info = os.stat(real)
    except OSError:
        raise refuse("an existing, readable file") from None
    if not stat.S_ISREG(info.st_mode):
        raise refuse("regular files, not a directory, FIFO, socket or device")
    if info.st_size > MAX_UPLOAD_BYTES:
        raise refuse(f"at most {MAX_UPLOAD_BYTES} bytes (EvoLink's 10 MB limit); it has {info.st_size}")
    # O_NONBLOCK: should a FIFO replace the file after the check, opening it cannot hang.
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(real, flags)
    except OSError:
        raise refuse("an existing, readable regular file") from None
    raw = os.fdopen(descriptor, "rb")
    opened = os.fstat(descriptor)
    location = _opened_location(descriptor, path)
    if (
        not stat.S_ISREG(opened.st_mode)
        or (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino)
        or location is None
    ):
        raw.close()
        raise refuse("a file that stays the same while it is checked")
    try:
        _check_location(location, refuse, allowed)  # the file opened, not the path checked
    except EvolinkInputRefusedError:
        raw.close()
        raise
    return _checked(raw, opened.st_size, real.name, content_type, refuse)


def _open_storage_uri(uri: str, refuse: Any, allowed: AllowedLocations) -> CheckedInput:
    from evolink_provider.storage import as_storage_path

    segments = urlsplit(uri).path.split("/")
    if ".." in segments or "." in segments or not any(uri.startswith(p) for p in allowed.uri_prefixes):
        raise refuse(
            f"storage URIs under a prefix listed in the extra upload_allowed_dirs of {allowed.source}"
        )
    source = as_storage_path(uri)
    content_type = IMAGE_EXTENSIONS.get(Path(source.name).suffix.lower())
    if content_type is None:
        raise refuse(f"images named {', '.join(IMAGE_EXTENSIONS)} (the Files API takes images only)")
    try:
        size = source.stat().st_size
    except (OSError, AttributeError, KeyError):
        raise refuse("an existing object whose size the storage reports") from None
    if not isinstance(size, int) or size > MAX_UPLOAD_BYTES:
        raise refuse(f"at most {MAX_UPLOAD_BYTES} bytes (EvoLink's 10 MB limit); it has {size}")
    return _checked(source.open("rb"), size, source.name, content_type, refuse)


def _checked(raw: IO[bytes], size: int, name: str, content_type: str, refuse: Any) -> CheckedInput:
    head = raw.read(16)
    if image_type(head) != content_type:
        raw.close()
        raise refuse(f"files whose content is the {content_type} their name says (its first bytes differ)")
    raw.seek(0)
    return CheckedInput(CheckedStream(raw, size, refuse), name, content_type)


class CheckedStream:
    """The file as checked: exactly ``size`` bytes (its ``seek(0, 2)`` says so, for Content-Length), and
    refused mid-stream if the file turns out longer or shorter, so a file that grows after the check (or
    a sparse giant) is never sent beyond its checked size."""

    def __init__(self, raw: IO[bytes], size: int, refuse: Any) -> None:
        self._raw = raw
        self._size = size
        self._refuse = refuse
        self._position = 0

    def read(self, limit: int | None = -1) -> bytes:
        left = self._size - self._position
        if left <= 0:
            if self._raw.read(1):
                raise self._refuse("a file that does not grow while it is uploaded")
            return b""
        chunk = self._raw.read(left if limit is None or limit < 0 else min(limit, left))
        if not chunk:
            raise self._refuse("a file that does not shrink while it is uploaded")
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._size}[whence]
        self._position = max(0, min(base + offset, self._size))
        self._raw.seek(self._position)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._raw.close()


def local_media_digests(hook: EvolinkHook, fields: dict[str, Any], refs: list[MediaRef]) -> dict[str, str]:
    """sha256 of each local input's bytes, by source: the identity of a request with local inputs.

    Read through the same checks as an upload, so an input that may not be uploaded is not even read.
    """
    allowed = allowed_locations(hook.settings.upload_allowed_dirs, f"connection {hook.evolink_conn_id!r}")
    digests: dict[str, str] = {}
    for ref in refs:
        checked = open_checked_input(ref, _field_label(fields, ref), allowed)
        digest = hashlib.sha256()
        try:
            while chunk := checked.stream.read(1 << 20):
                digest.update(chunk)
        finally:
            checked.stream.close()
        digests[ref.value] = digest.hexdigest()
    return digests


def upload_local_media(
    hook: EvolinkHook,
    fields: dict[str, Any],
    refs: list[MediaRef],
    uploads: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Upload local paths / storage URIs through EvoLink's Files API; their URLs take their place.

    Every input to upload is checked before the first one is sent, so a refused input means no HTTP call.

    :param uploads: by source (``ref.value``), uploads of an earlier try that are still valid: their
        ``file_url`` is used instead of uploading again. Each new upload's ``data`` is added to it, so
        that the caller can record it with the submission.
    """
    known = dict(uploads or {})
    allowed = allowed_locations(hook.settings.upload_allowed_dirs, f"connection {hook.evolink_conn_id!r}")
    with ExitStack() as stack:
        pending = []
        for ref in refs:
            if ref.value not in known:
                checked = open_checked_input(ref, _field_label(fields, ref), allowed)
                stack.callback(checked.stream.close)
                pending.append((ref, checked))
        for ref, checked in pending:
            data = hook.upload_file(cast(Any, checked.stream), checked.name, checked.content_type)
            log.info(
                "Uploaded %s to EvoLink's Files API (%s bytes; the URL expires %s).",
                ref.value,
                data.get("file_size"),
                data.get("expires_at"),
            )
            known[ref.value] = data
            if uploads is not None:
                uploads[ref.value] = data
    updated = dict(fields)
    for ref in refs:
        current = updated[ref.field]
        if isinstance(current, str) and current.strip().startswith("["):
            current = ast.literal_eval(current)  # a rendered list, already checked by validate_request
        if isinstance(current, (list, tuple)):
            items = list(current)
            items[ref.position] = known[ref.value]["file_url"]
            updated[ref.field] = items
        else:
            updated[ref.field] = known[ref.value]["file_url"]
    return updated


def _field_label(fields: dict[str, Any], ref: MediaRef) -> str:
    """``image_urls[1]`` for an item of a list field, else the field's name."""
    current = fields.get(ref.field)
    listed = isinstance(current, (list, tuple)) or (
        isinstance(current, str) and current.strip().startswith("[")
    )
    return f"{ref.field}[{ref.position}]" if listed else ref.field
