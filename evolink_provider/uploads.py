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

Each image is also held to its model's documented rules (:func:`evolink_provider.models.image_limits`:
pixel size, aspect ratio, bytes per image and per request), its width and height read from the header only
by the ``imagesize`` library (no second parser of hostile files here), because EvoLink checks them only
after the task was accepted and fails it mid-generation (``image_dimension_mismatch``). ``local_checks=
"warn"`` turns those refusals into warnings, for when EvoLink's limits move. http(s) URLs are not checked:
that would mean fetching them.
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

from evolink_provider.exceptions import EvolinkInputRefusedError, EvolinkValidationError
from evolink_provider.models import LOCAL_CHECKS, ImageLimits, image_limits, image_problems
from evolink_provider.storage import object_uri

if TYPE_CHECKING:
    from evolink_provider.field_rules import MediaRef
    from evolink_provider.hooks.evolink import EvolinkHook

log = logging.getLogger(__name__)

#: The largest image any model documents (Seedance: 30 MB); never read more. Each model's own limit is
#: checked after that (:func:`evolink_provider.models.image_limits`).
MAX_UPLOAD_BYTES = 30 * 1024 * 1024
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
            # The allow-list names objects: a ``conn_id@`` only picks the connection that reads them.
            prefix = object_uri(entry)
            prefixes.append(prefix if prefix.endswith("/") else prefix + "/")
        else:
            folders.append(Path(os.path.realpath(Path(entry).expanduser())))
    return AllowedLocations(tuple(folders), tuple(prefixes), source)


@dataclass
class CheckedInput:
    """An input that passed every check, open for streaming."""

    stream: CheckedStream
    name: str
    content_type: str
    size: int = 0
    width: int = -1
    height: int = -1


def sha256_of(checked: CheckedInput) -> str:
    """The sha256 of a checked input's bytes, read through its checks (and closed)."""
    digest = hashlib.sha256()
    try:
        while chunk := checked.stream.read(1 << 20):
            digest.update(chunk)
    finally:
        checked.stream.close()
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageRules:
    """The model rules an input is held to: ``limits`` (``None``: none documented), and whether breaking
    them refuses the input (``local_checks="refuse"``) or only warns (``"warn"``)."""

    model: str
    limits: ImageLimits | None
    local_checks: str = "refuse"

    @classmethod
    def of(cls, model: str | None, local_checks: str = "refuse") -> ImageRules:
        if local_checks not in LOCAL_CHECKS:
            raise EvolinkValidationError(str(model), "local_checks", local_checks, "'refuse' or 'warn'")
        return cls(model or "", image_limits(model) if model else None, local_checks)


def open_checked_input(
    ref: MediaRef,
    label: str,
    allowed: AllowedLocations,
    rules: ImageRules | None = None,
    warnings: list[str] | None = None,
) -> CheckedInput:
    """Open ``ref`` for upload, or raise :class:`EvolinkInputRefusedError` naming ``label``, the value and
    the rule it breaks. The caller closes ``stream``.

    :param rules: the model's image rules the image must follow (see :class:`ImageRules`).
    :param warnings: where broken rules go with ``local_checks="warn"``, and advice always.
    """

    def refuse(rule: str) -> EvolinkInputRefusedError:
        return EvolinkInputRefusedError(label, ref.value, rule)

    value = ref.value
    if value.startswith("file://"):
        parts = urlsplit(value)
        if parts.netloc not in ("", "localhost"):
            raise refuse("file:// URIs of this machine only")
        value = unquote(parts.path)
    if "://" in value:
        checked = _open_storage_uri(value, refuse, allowed)
    else:
        checked = _open_local_file(Path(value).expanduser(), refuse, allowed)
    try:
        _follow_model_rules(checked, rules, f"{label}={ref.value!r}", refuse, warnings)
    except BaseException:
        checked.stream.close()
        raise
    return checked


def _follow_model_rules(
    checked: CheckedInput,
    rules: ImageRules | None,
    where: str,
    refuse: Any,
    warnings: list[str] | None,
) -> None:
    """Hold the image to its model's documented rules (pixels, ratio, bytes): refuse, or warn."""
    if rules is None or rules.limits is None:
        return
    broken, advice = image_problems(rules.limits, checked.width, checked.height, checked.size)
    facts = f"this file is {checked.width}x{checked.height} px, {checked.size} bytes"
    if broken and rules.local_checks == "refuse":
        raise refuse(f"{rules.limits.role} ({rules.model}): {'; '.join(broken)}; {facts}")
    notes = [f"breaks the rules of {rules.limits.role} ({'; '.join(broken)}); sent (local_checks='warn')"]
    notes = (notes if broken else []) + advice
    if warnings is not None:
        warnings += [f"{where}: {note}; {facts}" for note in notes]


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
    size = info.st_size
    if size > MAX_UPLOAD_BYTES:
        raise refuse(f"at most {MAX_UPLOAD_BYTES} bytes (the largest image EvoLink documents); it has {size}")
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
    named = object_uri(uri)
    if ".." in segments or "." in segments or not any(named.startswith(p) for p in allowed.uri_prefixes):
        listed = ", ".join(allowed.uri_prefixes) or "none"
        raise refuse(
            f"storage URIs under a prefix listed in the extra upload_allowed_dirs of {allowed.source} "
            f"(compared without any conn_id@; listed now: {listed})"
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
        raise refuse(f"at most {MAX_UPLOAD_BYTES} bytes (the largest image EvoLink documents); it has {size}")
    return _checked(source.open("rb"), size, source.name, content_type, refuse)


def _checked(raw: IO[bytes], size: int, name: str, content_type: str, refuse: Any) -> CheckedInput:
    import imagesize

    head = raw.read(16)
    if image_type(head) != content_type:
        raw.close()
        raise refuse(f"files whose content is the {content_type} their name says (its first bytes differ)")
    raw.seek(0)
    width, height = imagesize.get(cast(Any, raw))  # the header only; (-1, -1) when it cannot tell
    raw.seek(0)
    return CheckedInput(CheckedStream(raw, size, refuse), name, content_type, size, width, height)


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


def local_media_digests(
    hook: EvolinkHook,
    fields: dict[str, Any],
    refs: list[MediaRef],
    rules: ImageRules | None = None,
    warnings: list[str] | None = None,
) -> dict[str, str]:
    """sha256 of each local input's bytes, by source: the identity of a request with local inputs.

    Read through the same checks as an upload (``rules`` included), so an input that may not be uploaded
    is not even read.
    """
    allowed = allowed_locations(hook.settings.upload_allowed_dirs, f"connection {hook.evolink_conn_id!r}")
    digests: dict[str, str] = {}
    sizes: list[int] = []
    for ref in refs:
        checked = open_checked_input(ref, _field_label(fields, ref), allowed, rules, warnings)
        digests[ref.value] = sha256_of(checked)
        sizes.append(checked.size)
    _check_request_total(rules, sum(sizes), warnings)
    return digests


def _check_request_total(rules: ImageRules | None, total: int, warnings: list[str] | None) -> None:
    """The documented cap on a whole request's media (Seedance: 64 MB), for the inputs the provider reads
    (an http(s) URL's size is not known without fetching it)."""
    limit = rules.limits.max_request_bytes if rules and rules.limits else None
    if rules is None or limit is None or total <= limit:
        return
    rule = f"at most {limit // (1024 * 1024)} MB of media in one request ({rules.model}); these images "
    rule += f"have {total} bytes"
    if rules.local_checks == "refuse":
        raise EvolinkInputRefusedError("image_urls", "<all images>", rule)
    if warnings is not None:
        warnings.append(f"image_urls: breaks the rule {rule}, sent anyway (local_checks='warn')")


def upload_local_media(
    hook: EvolinkHook,
    fields: dict[str, Any],
    refs: list[MediaRef],
    uploads: dict[str, dict[str, Any]] | None = None,
    rules: ImageRules | None = None,
) -> dict[str, Any]:
    """Upload local paths / storage URIs through EvoLink's Files API; their URLs take their place.

    Every input to upload is checked before the first one is sent, so a refused input means no HTTP call.

    :param uploads: by source (``ref.value``), uploads of an earlier try that are still valid: their
        ``file_url`` is used instead of uploading again. Each new upload's ``data`` is added to it, so
        that the caller can record it with the submission.
    :param rules: the model's image rules (checked again: a file can change between two reads).
    """
    known = dict(uploads or {})
    allowed = allowed_locations(hook.settings.upload_allowed_dirs, f"connection {hook.evolink_conn_id!r}")
    with ExitStack() as stack:
        pending = []
        for ref in refs:
            if ref.value not in known:
                checked = open_checked_input(ref, _field_label(fields, ref), allowed, rules)
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


def upload_once(
    hook: EvolinkHook,
    sources: list[str],
    rules: ImageRules | None = None,
    earlier: list[dict[str, Any]] | None = None,
    warnings: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Upload each reference image once for a whole run, and say what downstream tasks need of each.

    Every source is read through the same checks as an operator's own upload (allowed folders, type,
    bytes, the model's image rules) and hashed; an ``earlier`` upload of the same bytes (an earlier run's
    XCom) is reused while it has more than the reuse margin (6 h) of its 72 h left. The Files API quota
    (``GET /api/v1/files/quota``) is read once, before the first upload: a run that needs more files than
    remain fails then, naming the numbers, instead of failing halfway after its earlier tasks paid. On a
    shared account another run can take the last files in between, so this is best effort.

    :returns: per source, in order: ``source``, ``file_url``, ``sha256``, ``expires_at`` (epoch seconds)
        and ``reused``.
    """
    import time

    from evolink_provider.field_rules import MediaRef
    from evolink_provider.records import UPLOAD_REUSE_MARGIN, expiry_epoch

    allowed = allowed_locations(hook.settings.upload_allowed_dirs, f"connection {hook.evolink_conn_id!r}")
    now = time.time()
    by_digest = {
        str(entry.get("sha256")): entry
        for entry in earlier or []
        if isinstance(entry, dict)
        and isinstance(entry.get("file_url"), str)
        and isinstance(entry.get("expires_at"), (int, float))
        and entry["expires_at"] - UPLOAD_REUSE_MARGIN > now
    }
    results: list[dict[str, Any]] = []
    needed: dict[str, tuple[MediaRef, str]] = {}
    for index, source in enumerate(sources):
        ref = MediaRef("image_urls", index, source)
        checked = open_checked_input(ref, f"images[{index}]", allowed, rules, warnings)
        sha256 = sha256_of(checked)
        reused = by_digest.get(sha256)
        if reused is None:
            needed.setdefault(sha256, (ref, f"images[{index}]"))
        results.append({"source": source, "sha256": sha256, "reused": reused is not None, **(reused or {})})
    if needed:
        _check_quota(hook, len(needed))
    uploaded: dict[str, dict[str, Any]] = {}
    for sha256, (ref, label) in needed.items():
        checked = open_checked_input(ref, label, allowed, rules)
        try:
            data = hook.upload_file(cast(Any, checked.stream), checked.name, checked.content_type)
        finally:
            checked.stream.close()
        uploaded[sha256] = {
            "file_url": str(data["file_url"]),
            "expires_at": expiry_epoch(data.get("expires_at"), now),
        }
        log.info("Uploaded %s to EvoLink's Files API (expires %s).", ref.value, data.get("expires_at"))
    return [
        {
            "source": entry["source"],
            "file_url": (uploaded.get(entry["sha256"]) or entry)["file_url"],
            "sha256": entry["sha256"],
            "expires_at": (uploaded.get(entry["sha256"]) or entry)["expires_at"],
            "reused": entry["reused"],
        }
        for entry in results
    ]


def _check_quota(hook: EvolinkHook, needed: int) -> None:
    """Fail before the first upload when the Files API quota has fewer files left than the run needs."""
    quota = hook.get_files_quota()
    remain = quota.get("remain_files")
    if isinstance(remain, int) and not isinstance(remain, bool) and remain < needed:
        raise EvolinkInputRefusedError(
            "images",
            f"<{needed} new files>",
            f"at most the {remain} files left of the Files API quota (used {quota.get('used_files')} of "
            f"{quota.get('max_files')}, group {quota.get('user_group')!r}); nothing was uploaded. Files "
            "expire 72 h after their upload, or ask EvoLink for a larger quota",
        )
    log.info("EvoLink Files API quota: %s files left; this run uploads %d.", remain, needed)


def uploaded_image_urls(model: str, fields: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Take :func:`upload_once`'s entries given as ``image_urls`` items: each becomes its ``file_url``.

    The upload step hands out a new URL whenever it runs again (a clear of it), for the same bytes; a
    generation task that only saw the URL would take a cleared run for another request and pay again.
    Given the entries (``upload.output["images"]``), it knows each image's sha256, and the request's
    identity names that digest instead of the URL (:func:`evolink_provider.records.request_fingerprint`).

    :returns: the fields with plain URLs, and ``{file_url: sha256}`` of the entries (empty when none).
    """
    images = fields.get("image_urls")
    if not isinstance(images, list) or not any(isinstance(image, dict) for image in images):
        return fields, {}
    urls: list[Any] = []
    digests: dict[str, str] = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            urls.append(image)
            continue
        url, sha256 = image.get("file_url"), image.get("sha256")
        if (
            not isinstance(url, str)
            or not isinstance(sha256, str)
            or len(sha256) != 64
            or any(char not in "0123456789abcdef" for char in sha256)
            or digests.get(url, sha256) != sha256
        ):
            raise EvolinkValidationError(
                model,
                f"image_urls[{index}]",
                image,
                "a URL, a local path or storage URI, or an entry of EvolinkUploadImagesOperator's "
                '"images" ({"file_url": str, "sha256": 64 lowercase hex digits, ...}; one digest per URL)',
            )
        urls.append(url)
        digests[url] = sha256
    return {**fields, "image_urls": urls}, digests
