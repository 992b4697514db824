"""Request schemas of EvoLink's video models: every documented field, default and limit, in one place.

This is the provider's client-side check. The server-side oracle it is tested against,
:mod:`evolink_provider.simulator.validation`, is written independently from the API document and shares
no code with this module, so that a mistake made here is not repeated there and caught by neither.

Each model's fields are declared once, here: the schema names them and checks them, :data:`FIELD_DOCS`
documents them, and the dedicated operators derive their templated fields, payload and parameter
documentation from the two (:class:`evolink_provider.operators.evolink.EvolinkModelOperator`).

Operators call :func:`validate_request` after template rendering and before any HTTP call, so a bad value
costs nothing. Rendered templates are strings, so values are coerced *exactly*: ``"5"`` is 5 and
``"true"`` is true, but ``"5.5"``, ``"yes"`` or ``"1"`` for a boolean are refused rather than guessed.
Fields left as ``None`` are omitted from the payload, so EvoLink applies its own (documented) defaults.

Plain Python specs rather than pydantic models: each field needs an error that names the field, the value
and the allowed values, and the coercion rules above differ from pydantic's lax mode ("yes" is true there).
"""

from __future__ import annotations

import ast
import fnmatch
import ipaddress
import json
import math
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from evolink_provider.exceptions import EvolinkValidationError

HAPPYHORSE_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "4:5", "5:4", "9:21", "21:9")
SEEDANCE_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9", "adaptive")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
#: What EvoLink's Files API stores: images only, so only image fields may name local files.
FILES_API_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp")
EDIT_VIDEO_EXTENSIONS = (".mp4", ".mov")
REFERENCE_VIDEO_EXTENSIONS = (".mp4", ".mov")
REFERENCE_AUDIO_EXTENSIONS = (".wav", ".mp3")
MAX_SEED = 2147483647
MAX_CALLBACK_URL = 2048
MAX_SEEDANCE_TOKENS = 10000
HAPPYHORSE_PROMPT_CHARS = 5000
HAPPYHORSE_CJK_PROMPT_CHARS = 2500
STORAGE_SCHEMES = frozenset(
    {"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "hdfs", "webhdfs"}
)
MEDIA_FIELDS = frozenset({"image_urls", "video_urls", "audio_urls", "video_url", "video"})
IMAGE_FIELDS = frozenset({"image_urls"})
#: Fields some models refuse, and where they exist (for an error that says so).
FIELD_SCOPES = {
    "model_params": "seedance-2.0-text-to-video and seedance-2.0-fast-text-to-video only (web search)",
}
VIDEO_EDIT_SOURCES = ("video_urls", "video_url", "video")
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class MediaRef(NamedTuple):
    """A media input that is a local path or storage URI: uploaded first, then replaced by its URL."""

    field: str
    position: int
    value: str


class ValidatedRequest(NamedTuple):
    payload: dict[str, Any]
    warnings: list[str]
    local_media: list[MediaRef]


def estimate_prompt_tokens(text: str) -> int:
    """Seedance's 10,000-token limit without its tokenizer: CJK characters + other characters / 4.

    Approximate by nature. The simulator counts in its own way; a test checks that the two agree on the
    documented boundary (10,000 Chinese characters, 40,000 Latin ones).
    """
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


@dataclass
class _Context:
    model: str
    allow_local_media: bool
    warnings: list[str] = field(default_factory=list)
    local_media: list[MediaRef] = field(default_factory=list)

    def error(self, name: str, value: Any, allowed: str) -> EvolinkValidationError:
        return EvolinkValidationError(self.model, name, value, allowed)


Coercer = Callable[[_Context, str, Any], Any]


def integer(low: int, high: int) -> Coercer:
    def coerce(ctx: _Context, name: str, value: Any) -> int:
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


def boolean(ctx: _Context, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ctx.error(name, value, 'true or false (or the strings "true"/"false")')


def choice(*allowed: str) -> Coercer:
    def coerce(ctx: _Context, name: str, value: Any) -> str:
        if value not in allowed:
            raise ctx.error(name, value, "one of " + ", ".join(allowed))
        return str(value)

    return coerce


def text(ctx: _Context, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(name, value, "a non-empty string")
    return value


def _as_list(ctx: _Context, name: str, value: Any) -> list[Any]:
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


def _public_url(ctx: _Context, name: str, value: Any, extensions: tuple[str, ...] | None) -> str:
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
    def coerce(ctx: _Context, name: str, value: Any) -> list[str]:
        items = _as_list(ctx, name, value)
        if not low <= len(items) <= high:
            count = f"exactly {low}" if low == high else f"{low} to {high}"
            raise ctx.error(name, value, f"{count} item(s), got {len(items)}")
        return [_media_item(ctx, name, index, item, extensions) for index, item in enumerate(items)]

    return coerce


def _media_item(ctx: _Context, name: str, index: int, item: Any, extensions: tuple[str, ...] | None) -> str:
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
    def coerce(ctx: _Context, name: str, value: Any) -> str:
        url = _media_item(ctx, name, 0, value, None)
        path = urlsplit(url).path.lower()
        if (required_extension or "." in path.rsplit("/", 1)[-1]) and not path.endswith(extensions):
            raise ctx.error(name, value, "a video ending in " + ", ".join(extensions))
        return url

    return coerce


def callback_url(ctx: _Context, name: str, value: Any) -> str:
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


def model_params(ctx: _Context, name: str, value: Any) -> dict[str, Any]:
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


_TIMESTAMPS = re.compile(r"\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*")


def timestamps(ctx: _Context, name: str, value: Any) -> str:
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


@dataclass(frozen=True)
class ModelSchema:
    """The fields of one model: ``fields`` maps each name to its coercer; ``required`` must be present."""

    name: str
    fields: dict[str, Coercer]
    required: frozenset[str]
    check: Callable[[_Context, dict[str, Any]], None] = lambda ctx, payload: None


def _named_references(
    ctx: _Context, prompt: str, pattern: str, counts: dict[str, int], label: Callable[[str], str]
) -> None:
    """Prompt references (``character2``, ``@video1``) must exist; media never referenced earn a warning."""
    named: dict[str, set[int]] = {kind: set() for kind in counts}
    for kind, number in re.findall(pattern, prompt, flags=re.IGNORECASE):
        kind, index = kind.lower(), int(number)
        if not 1 <= index <= counts.get(kind, 0):
            raise ctx.error(
                "prompt", f"{label(kind)}{index}", f"{label(kind)}1..{label(kind)}{counts.get(kind, 0)}"
            )
        named[kind].add(index)
    for kind, count in counts.items():
        unnamed = [f"{label(kind)}{i}" for i in range(1, count + 1) if i not in named[kind]]
        if unnamed and count:
            ctx.warnings.append(f"the prompt never names {', '.join(unnamed)}; the model may ignore them")


def _happyhorse_prompt(ctx: _Context, payload: dict[str, Any]) -> None:
    prompt = payload.get("prompt") or ""
    limit = HAPPYHORSE_CJK_PROMPT_CHARS if _CJK.search(prompt) else HAPPYHORSE_PROMPT_CHARS
    if len(prompt) > limit:
        ctx.warnings.append(
            f"PROMPT WILL BE CUT: {len(prompt)} characters, EvoLink keeps the first {limit} "
            f"and silently drops the last {len(prompt) - limit}"
        )


def _happyhorse_references(ctx: _Context, payload: dict[str, Any]) -> None:
    _happyhorse_prompt(ctx, payload)
    _named_references(
        ctx,
        payload.get("prompt") or "",
        r"\b(character)(\d+)\b",
        {"character": len(payload.get("image_urls", []))},
        lambda kind: kind,
    )


def _seedance_prompt(ctx: _Context, payload: dict[str, Any]) -> None:
    prompt = payload.get("prompt") or ""
    tokens = estimate_prompt_tokens(prompt)
    if tokens > MAX_SEEDANCE_TOKENS:
        raise ctx.error("prompt", f"<{len(prompt)} characters, ~{tokens} tokens>", "at most 10000 tokens")
    cjk = len(_CJK.findall(prompt))
    if cjk > 500 or len(prompt.split()) > 1000:
        ctx.warnings.append("the prompt is longer than EvoLink advises (500 CJK characters or 1000 words)")
    if payload.get("content_filter") is False:
        ctx.warnings.append("content_filter=false relaxes moderation and costs x1.1")


def _seedance_references(ctx: _Context, payload: dict[str, Any]) -> None:
    _seedance_prompt(ctx, payload)
    counts = {kind: len(payload.get(f"{kind}_urls", [])) for kind in ("image", "video", "audio")}
    if not counts["image"] and not counts["video"]:
        raise ctx.error("image_urls", payload.get("image_urls"), "at least one image or video input")
    _named_references(
        ctx, payload.get("prompt") or "", r"@(image|video|audio)(\d+)", counts, lambda k: f"@{k}"
    )


def _video_edit(ctx: _Context, payload: dict[str, Any]) -> None:
    """happyhorse-1.0-video-edit takes its one video as ``video_urls``, ``video_url`` or ``video``."""
    _happyhorse_prompt(ctx, payload)
    given = [name for name in VIDEO_EDIT_SOURCES if name in payload]
    if len(given) != 1:
        raise ctx.error(
            "video_urls",
            {name: payload[name] for name in given} or None,
            "exactly one of video_urls (one URL), video_url or video",
        )


def _happyhorse(version: str) -> list[ModelSchema]:
    common: dict[str, Coercer] = {
        "prompt": text,
        "quality": choice("720p", "1080p"),
        "seed": integer(1, MAX_SEED),
        "callback_url": callback_url,
    }
    schemas = [
        ModelSchema(
            f"happyhorse-{version}-text-to-video",
            {**common, "aspect_ratio": choice(*HAPPYHORSE_ASPECT_RATIOS), "duration": integer(3, 15)},
            frozenset({"prompt"}),
            _happyhorse_prompt,
        ),
        ModelSchema(
            f"happyhorse-{version}-image-to-video",
            {**common, "image_urls": media(1, 1, IMAGE_EXTENSIONS), "duration": integer(3, 15)},
            frozenset({"image_urls"}),  # the prompt is optional here
            _happyhorse_prompt,
        ),
        ModelSchema(
            f"happyhorse-{version}-reference-to-video",
            {
                **common,
                "image_urls": media(1, 9, IMAGE_EXTENSIONS),
                "aspect_ratio": choice(*HAPPYHORSE_ASPECT_RATIOS),
                "duration": integer(3, 15),
            },
            frozenset({"prompt", "image_urls"}),
            _happyhorse_references,
        ),
    ]
    if version == "1.0":
        schemas.append(
            ModelSchema(
                "happyhorse-1.0-video-edit",
                {
                    **common,
                    "video_urls": media(1, 1, EDIT_VIDEO_EXTENSIONS),
                    "video_url": single_media(EDIT_VIDEO_EXTENSIONS, False),
                    "video": single_media(EDIT_VIDEO_EXTENSIONS, False),
                    "image_urls": media(0, 5, IMAGE_EXTENSIONS),
                    "keep_original_sound": boolean,
                },
                frozenset({"prompt"}),
                _video_edit,
            )
        )
    return schemas


def _seedance(tier: str) -> list[ModelSchema]:
    qualities = ("480p", "720p", "1080p", "4k") if tier == "" else ("480p", "720p")
    common: dict[str, Coercer] = {
        "prompt": text,
        "duration": integer(4, 15),
        "quality": choice(*qualities),
        "aspect_ratio": choice(*SEEDANCE_ASPECT_RATIOS),
        "generate_audio": boolean,
        "content_filter": boolean,
        "callback_url": callback_url,
    }
    # Web search (model_params) exists on the standard and fast text models only.
    text_fields = {**common, "model_params": model_params} if tier in ("", "fast-") else common
    prefix = f"seedance-2.0-{tier}"
    return [
        ModelSchema(f"{prefix}text-to-video", text_fields, frozenset({"prompt"}), _seedance_prompt),
        # The image page is silent on whether a prompt is required; the family requires one, so do we.
        ModelSchema(
            f"{prefix}image-to-video",
            {**common, "image_urls": media(1, 2, IMAGE_EXTENSIONS)},
            frozenset({"prompt", "image_urls"}),
            _seedance_prompt,
        ),
        ModelSchema(
            f"{prefix}reference-to-video",
            {
                **common,
                "image_urls": media(0, 9, IMAGE_EXTENSIONS),
                "video_urls": media(0, 3, REFERENCE_VIDEO_EXTENSIONS),
                "audio_urls": media(0, 3, REFERENCE_AUDIO_EXTENSIONS),
            },
            frozenset({"prompt"}),
            _seedance_references,
        ),
    ]


SORA_CHARACTER = ModelSchema(
    "sora-character",
    # The withdrawn page documented no callback_url for this model, so it is refused.
    {"video_url": single_media((".mp4", ".mov", ".webm"), True), "timestamps": timestamps},
    frozenset({"video_url"}),
)

_SCHEMAS: dict[str, ModelSchema] = {
    schema.name: schema
    for schema in [
        *_happyhorse("1.0"),
        *_happyhorse("1.1"),
        *_seedance(""),
        *_seedance("fast-"),
        *_seedance("mini-"),
        SORA_CHARACTER,
    ]
}
KNOWN_MODELS: frozenset[str] = frozenset(_SCHEMAS)
TEXT_ONLY_MEDIA = ("image_urls", "video_urls", "audio_urls")


def schema_for(model: str) -> ModelSchema | None:
    """The schema of a known model; None for models outside the documented families."""
    return _SCHEMAS.get(model)


#: What each field means, with its limits and the API's default: the ``:param:`` lines of the dedicated
#: operators. Keys are model-name patterns (:func:`fnmatch.fnmatchcase`); a later match overrides an earlier.
FIELD_DOCS: dict[str, dict[str, str]] = {
    "*": {"callback_url": "https URL EvoLink calls when the task ends (public hosts only)."},
    "happyhorse-*": {
        "prompt": "up to 5,000 characters (2,500 with Chinese); EvoLink silently cuts longer prompts, so a "
        "warning is logged.",
        "quality": "``720p`` (default) or ``1080p``.",
        "aspect_ratio": "``16:9`` (default), ``9:16``, ``1:1``, ``4:3``, ``3:4``, ``4:5``, ``5:4``, "
        "``9:21``, ``21:9``.",
        "duration": "seconds, 3-15 (default 5).",
        "seed": "1-2147483647 for reproducible output (default random).",
    },
    "happyhorse-*-image-to-video": {
        "prompt": "optional; up to 5,000 characters (2,500 with Chinese), longer prompts are cut (warned).",
        "image_urls": "exactly 1 public http(s) URL of a JPEG/PNG/WEBP image, short side at least 300 px, "
        "aspect ratio between 1:2.5 and 2.5:1.",
    },
    "happyhorse-*-reference-to-video": {
        "image_urls": "1-9 public http(s) URLs of JPEG/PNG/WEBP images, short side at least 400 px.",
    },
    "happyhorse-1.0-video-edit": {
        "video_urls": "exactly 1 public http(s) URL of an MP4/MOV video, 3-60 s, at most 100 MB.",
        "video_url": "one source video URL in place of ``video_urls`` (give exactly one of the three).",
        "video": "one source video URL in place of ``video_urls`` (give exactly one of the three).",
        "image_urls": "0-5 public http(s) URLs of JPEG/PNG/WEBP reference images.",
        "keep_original_sound": "keep the sound of the source video.",
    },
    "seedance-2.0-*": {
        "prompt": "up to 10,000 tokens (EvoLink advises at most 500 Chinese characters or 1,000 words).",
        "duration": "seconds, 4-15 (default 5).",
        "quality": "``480p`` or ``720p`` (default); the standard tier also ``1080p`` and ``4k``.",
        "aspect_ratio": "``adaptive`` (default since 2026-08), ``16:9``, ``9:16``, ``1:1``, ``4:3``, "
        "``3:4``, ``21:9``.",
        "generate_audio": "synchronised sound at no extra cost (default true).",
        "content_filter": "false relaxes moderation and costs x1.1 (default true).",
        "model_params": 'e.g. ``{"web_search": true}`` (billed only when used).',
    },
    "seedance-2.0-*image-to-video": {
        "image_urls": "1-2 public http(s) URLs of JPEG/PNG/WEBP images: the first frame, then the last.",
    },
    "seedance-2.0-*reference-to-video": {
        "image_urls": "0-9 public http(s) URLs of JPEG/PNG/WEBP images, ``@image1``... in the prompt "
        "(at least one image or video in all).",
        "video_urls": "0-3 public http(s) URLs of MP4/MOV videos, ``@video1``... in the prompt.",
        "audio_urls": "0-3 public http(s) URLs of WAV/MP3 audio, ``@audio1``... in the prompt.",
    },
    "sora-character": {
        "video_url": "public http(s) URL of an ``.mp4``, ``.mov`` or ``.webm`` video.",
        "timestamps": '``"a,b"`` seconds, at most 2 s apart (default ``"0,2"``).',
    },
}


def field_docs(model: str) -> dict[str, str]:
    """The documentation of each field of a known model, in the schema's order."""
    docs: dict[str, str] = {}
    for pattern, table in FIELD_DOCS.items():
        if fnmatch.fnmatchcase(model, pattern):
            docs.update(table)
    fields = _SCHEMAS[model].fields
    missing = [name for name in fields if name not in docs]
    if missing:
        raise LookupError(f"{model}: FIELD_DOCS documents no {', '.join(missing)}")
    return {name: docs[name] for name in fields}


def validate_request(
    model: str, fields: Mapping[str, Any], *, allow_local_media: bool = False
) -> ValidatedRequest:
    """Check and coerce a model's fields into the JSON body to POST, or raise EvolinkValidationError.

    :param allow_local_media: accept local paths and storage URIs in media fields, listing them in
        ``local_media`` for the operator to upload (then call again without the flag).
    """
    if not isinstance(model, str) or not model.strip():
        raise EvolinkValidationError(str(model), "model", model, "an EvoLink model name")
    ctx = _Context(model, allow_local_media)
    given = {name: value for name, value in fields.items() if value is not None and name != "model"}
    schema = _SCHEMAS.get(model)
    if schema is None:
        return ValidatedRequest({"model": model, **_passthrough(ctx, given)}, ctx.warnings, ctx.local_media)
    if model.endswith("-text-to-video") and model.startswith("seedance"):
        for name in TEXT_ONLY_MEDIA:
            if name in given:
                raise ctx.error(
                    name,
                    given[name],
                    f"nothing: {model} is text only (seedance-2.0-*-reference-to-video takes media)",
                )
    payload: dict[str, Any] = {"model": model}
    for name, value in given.items():
        coercer = schema.fields.get(name)
        if coercer is None and name in FIELD_SCOPES:
            raise ctx.error(name, value, f"nothing: {model} has no {name}; it exists on {FIELD_SCOPES[name]}")
        if coercer is None:
            raise ctx.error(name, value, "one of the fields " + ", ".join(sorted(schema.fields)))
        payload[name] = coercer(ctx, name, value)
    for name in sorted(schema.required - set(payload)):
        raise ctx.error(name, None, "a value (this field is required)")
    schema.check(ctx, payload)
    return ValidatedRequest(payload, ctx.warnings, ctx.local_media)


def _passthrough(ctx: _Context, given: dict[str, Any]) -> dict[str, Any]:
    """Unknown models: the rules every generation model shares, the rest passed as given."""
    if "prompt" in given and not isinstance(given["prompt"], str):
        raise ctx.error("prompt", given["prompt"], "a string")
    if "callback_url" in given:
        callback_url(ctx, "callback_url", given["callback_url"])
    return given
