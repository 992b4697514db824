"""The rules one request field follows, as coercers the model schemas in :mod:`evolink_provider.models`
are built from: exact coercion of rendered template strings, public URLs, local inputs to upload, the
callback URL's public host.

Each coercer takes ``(ctx, name, value)`` and returns the value to send, or raises the
:class:`~evolink_provider.exceptions.EvolinkValidationError` that names the field, the value and the
allowed values. Digits are ASCII only (``"٣"`` is not 3: the API would refuse it after a paid round trip).
"""

from __future__ import annotations

import ast
import ipaddress
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from evolink_provider.exceptions import EvolinkValidationError

#: What EvoLink's Files API stores: images only, so only image fields may name local files.
FILES_API_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
MAX_CALLBACK_URL = 2048
STORAGE_SCHEMES = frozenset(
    {"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "webhdfs"}
)
IMAGE_FIELDS = frozenset({"image_urls"})
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class MediaRef(NamedTuple):
    """A media input that is a local path or storage URI: uploaded first, then replaced by its URL."""

    field: str
    position: int
    value: str


@dataclass
class FieldContext:
    """What one validation collects besides the payload: warnings and the local inputs to upload."""

    model: str
    allow_local_media: bool
    #: ``warn`` or ``refuse`` a prompt longer than EvoLink advises.
    prompt_policy: str = "warn"
    warnings: list[str] = field(default_factory=list)
    local_media: list[MediaRef] = field(default_factory=list)

    def error(self, name: str, value: Any, allowed: str) -> EvolinkValidationError:
        return EvolinkValidationError(self.model, name, value, allowed)


Coercer = Callable[[FieldContext, str, Any], Any]


def integer(low: int, high: int) -> Coercer:
    def coerce(ctx: FieldContext, name: str, value: Any) -> int:
        allowed = f"an integer from {low} to {high}"
        if isinstance(value, bool):
            raise ctx.error(name, value, allowed)
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if not isinstance(value, int):
            raise ctx.error(name, value, allowed)
        if not low <= value <= high:
            raise ctx.error(name, value, allowed)
        return value

    return coerce


def boolean(ctx: FieldContext, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ctx.error(name, value, 'true or false (or the strings "true"/"false")')


def choice(*allowed: str) -> Coercer:
    def coerce(ctx: FieldContext, name: str, value: Any) -> str:
        if value not in allowed:
            raise ctx.error(name, value, "one of " + ", ".join(allowed))
        return str(value)

    return coerce


def text(ctx: FieldContext, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(name, value, "a non-empty string")
    return value


def _as_list(ctx: FieldContext, name: str, value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return parsed
    raise ctx.error(name, value, "a list of URLs (a single string is not guessed to be a one-item list)")


def _public_url(ctx: FieldContext, name: str, value: Any, extensions: tuple[str, ...] | None) -> str:
    if not isinstance(value, str):
        raise ctx.error(name, value, "an http(s) URL")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ctx.error(name, value, "a public http(s) URL (operators upload local files and storage URIs)")
    if parts.username or parts.password:
        raise ctx.error(name, "<URL with credentials>", "a URL without user:password (it would leak)")
    if extensions:
        last = parts.path.lower().rsplit("/", 1)[-1]
        if "." in last and not last.endswith(extensions):
            raise ctx.error(name, value, "a file ending in " + ", ".join(extensions))
    return value.strip()


def _local_reference(value: Any) -> bool:
    """A local path or an object-storage URI the operators can upload (never javascript:, data:, ftp:)."""
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        return False
    scheme = urlsplit(value).scheme.lower()
    return scheme in STORAGE_SCHEMES or (scheme == "" and not value.startswith("//"))


def media(low: int, high: int, extensions: tuple[str, ...] | None = None) -> Coercer:
    def coerce(ctx: FieldContext, name: str, value: Any) -> list[str]:
        items = _as_list(ctx, name, value)
        if not low <= len(items) <= high:
            count = f"exactly {low}" if low == high else f"{low} to {high}"
            raise ctx.error(name, value, f"{count} item(s), got {len(items)}")
        return [_media_item(ctx, name, index, item, extensions) for index, item in enumerate(items)]

    return coerce


def _media_item(
    ctx: FieldContext, name: str, index: int, item: Any, extensions: tuple[str, ...] | None
) -> str:
    if _local_reference(item):
        if name not in IMAGE_FIELDS:
            raise ctx.error(
                name,
                item,
                "a public http(s) URL: EvoLink's Files API takes images only (JPEG, PNG, GIF, WEBP), so "
                "a local video or audio file cannot be uploaded; put it where EvoLink can fetch it",
            )
        if ctx.allow_local_media:
            image_types = tuple(
                ext for ext in FILES_API_EXTENSIONS if ext in (extensions or FILES_API_EXTENSIONS)
            )
            last = urlsplit(str(item)).path.lower().rsplit("/", 1)[-1]
            if "." in last and not last.endswith(image_types):
                raise ctx.error(name, item, "a local image ending in " + ", ".join(image_types))
            ctx.local_media.append(MediaRef(name, index, str(item)))
            return str(item)
    return _public_url(ctx, name, item, extensions)


def single_media(extensions: tuple[str, ...], required_extension: bool) -> Coercer:
    def coerce(ctx: FieldContext, name: str, value: Any) -> str:
        url = _media_item(ctx, name, 0, value, None)
        path = urlsplit(url).path.lower()
        if (required_extension or "." in path.rsplit("/", 1)[-1]) and not path.endswith(extensions):
            raise ctx.error(name, value, "a video ending in " + ", ".join(extensions))
        return url

    return coerce


def callback_url(ctx: FieldContext, name: str, value: Any) -> str:
    allowed = f"an https URL to a public host, at most {MAX_CALLBACK_URL} characters"
    if not isinstance(value, str) or len(value) > MAX_CALLBACK_URL:
        raise ctx.error(name, value, allowed)
    if any(char.isspace() or not char.isprintable() for char in value):
        # urlsplit silently drops tabs and line breaks, so the value checked would not be the one sent.
        raise ctx.error(name, value, allowed + " (no spaces, line breaks or control characters)")
    parts = urlsplit(value)
    # What a URL parser makes of the host (percent-decoding, IDNA/UTS 46): "127.0.0.1%2e", or fullwidth
    # digits with ideographic full stops (U+3002), are 127.0.0.1 and are checked as such.
    host = unicodedata.normalize("NFKC", unquote(parts.hostname or "")).replace("\u3002", ".")
    host = host.lower().rstrip(".")
    if parts.scheme != "https" or not host or host == "localhost" or host.endswith(".localhost"):
        raise ctx.error(name, value, allowed)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            # No top-level domain is a number: "127.1", "2130706433", "0x7f.1" are addresses in shorthand.
            raise ctx.error(name, value, allowed + " (write an address in full, a.b.c.d)") from None
        return value
    address = getattr(address, "ipv4_mapped", None) or address
    if not address.is_global or address.is_multicast:
        raise ctx.error(name, value, allowed + " (private, loopback and link-local addresses are refused)")
    return value


def model_params(ctx: FieldContext, name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ctx.error(name, value, 'an object such as {"web_search": true}') from None
    if not isinstance(value, dict):
        raise ctx.error(name, value, 'an object such as {"web_search": true}')
    unknown = set(value) - {"web_search"}
    if unknown:
        raise ctx.error(name, value, "the documented key web_search only")
    return {key: boolean(ctx, f"{name}.{key}", item) for key, item in value.items()}


_TIMESTAMPS = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*,\s*([0-9]+(?:\.[0-9]+)?)\s*")


def timestamps(ctx: FieldContext, name: str, value: Any) -> str:
    allowed = '"start,end" in seconds with 0 <= start < end and end - start <= 2'
    if isinstance(value, (list, tuple)) and len(value) == 2:
        value = ",".join(str(part) for part in value)
    match = _TIMESTAMPS.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise ctx.error(name, value, allowed)
    start, end = float(match.group(1)), float(match.group(2))
    if not (0 <= start < end and end - start <= 2):
        raise ctx.error(name, value, allowed)
    return f"{match.group(1)},{match.group(2)}"
