"""Files in and out of EvoLink: results streamed into storage, local inputs uploaded through the Files API.

Result URLs expire after 24 h and editing steps need files, so the operators copy results into a local folder
or any ``ObjectStoragePath`` (``file://``, ``s3://``, ``gs://``, ...). Copies stream chunk by chunk (constant
memory), land under a temporary name first and are renamed only once complete and the size matches
``Content-Length``, so no half-written file ever carries the final name. HTTP stays in the hook.
"""

from __future__ import annotations

import ast
import logging
import mimetypes
import secrets
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from evolink_provider.exceptions import EvolinkError, EvolinkTransportError

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.models import MediaRef

log = logging.getLogger(__name__)

ACCEPTED_TYPES = ("video/", "image/")
EXTENSIONS = {
    "video/mp4": "mp4",
    "video/quicktime": "mov",
    "video/webm": "webm",
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/webp": "webp",
}
MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"\x1a\x45\xdf\xa3", "video/webm"),
]


class EvolinkStorageError(EvolinkError):
    """A result could not be stored as promised (wrong type, wrong size, a different file in the way)."""


def as_storage_path(location: str) -> ObjectStoragePath:
    """A local path or a storage URI as one ``ObjectStoragePath`` (plain paths become ``file://``)."""
    from airflow.sdk import ObjectStoragePath

    if "://" not in location:
        location = Path(location).expanduser().resolve().as_uri()
    return ObjectStoragePath(location)


def result_urls(task: dict[str, Any]) -> list[str]:
    """Every file a completed task hands over: ``results`` and sora-character's profile picture."""
    urls = [url for url in task.get("results") or [] if isinstance(url, str)]
    data = task.get("result_data")
    if isinstance(data, dict) and isinstance(data.get("profile_picture_url"), str):
        urls.append(data["profile_picture_url"])
    return urls


def store_results(hook: EvolinkHook, task: dict[str, Any], output_path: str) -> list[str]:
    """Stream every result of ``task`` into ``output_path``; return the stored locations, in order.

    Locations are plain paths when ``output_path`` is one, URIs otherwise.
    """
    urls = result_urls(task)
    if not urls:
        raise EvolinkStorageError(f"EvoLink task {task.get('id')} completed without any result to store")
    remote = as_storage_path(output_path)
    # Local folders go through pathlib: same API, without fsspec's per-write overhead (~40 % throughput).
    folder: Path | ObjectStoragePath = Path(remote.path) if remote.protocol in ("file", "local") else remote
    folder.mkdir(parents=True, exist_ok=True)
    stored = [_store_one(hook, url, folder, f"{task['id']}-{index}") for index, url in enumerate(urls)]
    if "://" not in output_path:
        return [str(path) for path in stored]
    return [path.as_uri() if isinstance(path, Path) else str(path) for path in stored]


def _store_one(
    hook: EvolinkHook, url: str, folder: Path | ObjectStoragePath, stem: str
) -> Path | ObjectStoragePath:
    with hook.open_result(url) as result:
        kind = result.content_type
        if not kind.startswith(ACCEPTED_TYPES) and kind != "application/octet-stream":
            raise EvolinkStorageError(f"result {stem} is {kind or 'untyped'}, not a video or image")
        suffix = EXTENSIONS.get(kind) or PurePosixPath(urlsplit(url).path).suffix.lstrip(".") or "bin"
        target = folder / f"{stem}.{suffix}"
        if target.exists():
            if result.content_length is not None and target.stat().st_size == result.content_length:
                log.info("%s is already stored from an earlier try; kept.", target)
                return target
            raise EvolinkStorageError(f"{target} exists and is not this result; refusing to overwrite it")
        partial = folder / f".{stem}.part-{secrets.token_hex(4)}"
        written = 0
        try:
            with partial.open("wb") as sink:
                for chunk in result.chunks:
                    written += len(chunk)
                    sink.write(chunk)
            if result.content_length is not None and written != result.content_length:
                raise EvolinkTransportError(
                    f"result {stem} ended after {written} of {result.content_length} announced bytes",
                    request_sent=True,
                )
            cast(Any, partial).rename(target)  # both are Path, or both ObjectStoragePath
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    log.info("Stored %s (%d bytes).", target, written)
    return target


def sniff_content_type(head: bytes, name: str) -> str:
    """The upload's MIME type from its first bytes, else from its name."""
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:10] == b"qt" else "video/mp4"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def upload_local_media(
    hook: EvolinkHook,
    fields: dict[str, Any],
    refs: list[MediaRef],
    uploads: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Upload local paths / storage URIs through EvoLink's Files API; their URLs take their place.

    :param uploads: by source (``ref.value``), uploads of an earlier try that are still valid: their
        ``file_url`` is used instead of uploading again. Each new upload's ``data`` is added to it, so
        that the caller can record it.
    """
    updated = dict(fields)
    for ref in refs:
        data = (uploads or {}).get(ref.value)
        if data is None:
            source = as_storage_path(ref.value)
            with source.open("rb") as stream:
                head = stream.read(16)
                stream.seek(0)
                data = hook.upload_file(stream, source.name, sniff_content_type(head, source.name))
            log.info(
                "Uploaded %s to EvoLink's Files API (%s bytes; the URL expires %s).",
                ref.value,
                data.get("file_size"),
                data.get("expires_at"),
            )
            if uploads is not None:
                uploads[ref.value] = data
        current = updated[ref.field]
        if isinstance(current, str) and current.strip().startswith("["):
            current = ast.literal_eval(current)  # a rendered list, already checked by validate_request
        if isinstance(current, (list, tuple)):
            items = list(current)
            items[ref.position] = data["file_url"]
            updated[ref.field] = items
        else:
            updated[ref.field] = data["file_url"]
    return updated


def stored_results(task_id: str, output_path: str, expected: int | None = None) -> list[str] | None:
    """The results of ``task_id`` an earlier try stored under ``output_path``, or None unless complete.

    A result only ever carries its final name (``<task id>-<n>.<ext>``) once fully written, so a file with
    that name is complete; ``expected`` results must all be there (at least one when it is unknown).
    """
    remote = as_storage_path(output_path)
    folder: Path | ObjectStoragePath = Path(remote.path) if remote.protocol in ("file", "local") else remote
    if not folder.exists():
        return None
    found: list[Path | ObjectStoragePath] = []
    while expected is None or len(found) < expected:
        matches = sorted(folder.glob(f"{task_id}-{len(found)}.*"), key=str)
        if len(matches) != 1:
            break
        found.append(cast("Path | ObjectStoragePath", matches[0]))
    if not found or (expected is not None and len(found) != expected):
        return None
    if "://" not in output_path:
        return [str(path) for path in found]
    return [path.as_uri() if isinstance(path, Path) else str(path) for path in found]
