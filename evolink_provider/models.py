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

Media the provider can read (local paths and storage URIs, which it uploads) are also held to each model's
documented image rules (:func:`image_limits`, :func:`image_problems`): pixel size, aspect ratio and file size,
read from the image header by :mod:`evolink_provider.uploads` before any HTTP call. An http(s) URL is sent as
given: checking it would mean fetching it, so EvoLink checks it (a failed task, ``image_dimension_mismatch``).

Plain Python specs rather than pydantic models: each field needs an error that names the field, the value
and the allowed values, and the coercion rules above differ from pydantic's lax mode ("yes" is true there).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from evolink_provider.exceptions import EvolinkValidationError
from evolink_provider.field_rules import (
    Coercer,
    FieldContext,
    MediaRef,
    boolean,
    callback_url,
    choice,
    integer,
    media,
    model_params,
    single_media,
    text,
    timestamps,
)

HAPPYHORSE_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "4:5", "5:4", "9:21", "21:9")
SEEDANCE_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9", "adaptive")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
EDIT_VIDEO_EXTENSIONS = (".mp4", ".mov")
REFERENCE_VIDEO_EXTENSIONS = (".mp4", ".mov")
REFERENCE_AUDIO_EXTENSIONS = (".wav", ".mp3")
MAX_SEED = 2147483647
MAX_SEEDANCE_TOKENS = 10000
HAPPYHORSE_PROMPT_CHARS = 5000
HAPPYHORSE_CJK_PROMPT_CHARS = 2500
#: Seedance's advised prompt length (longer prompts are accepted up to 10,000 tokens).
SEEDANCE_ADVISED_CJK_CHARS = 500
SEEDANCE_ADVISED_WORDS = 1000
PROMPT_POLICIES = ("warn", "refuse")
LOCAL_CHECKS = ("refuse", "warn")
MB = 1024 * 1024
MEDIA_FIELDS = frozenset({"image_urls", "video_urls", "audio_urls", "video_url", "video"})
#: Fields some models refuse, and where they exist (for an error that says so).
FIELD_SCOPES = {
    "model_params": "seedance-2.0-text-to-video and seedance-2.0-fast-text-to-video only (web search)",
}
VIDEO_EDIT_SOURCES = ("video_urls", "video_url", "video")
_CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


@dataclass(frozen=True)
class ImageLimits:
    """The documented rules of one model's input images (one role: references, a first frame, ...).

    Sizes are in pixels, ``ratio`` bounds width / height, ``max_bytes`` is per image and
    ``max_request_bytes`` for all of a request's media; ``advised_min_ratio`` (short side / long side) is a
    recommendation, so breaking it only warns.
    """

    role: str
    max_bytes: int
    min_short_side: int = 0
    min_side: int = 0
    max_side: int | None = None
    ratio: tuple[float, float] | None = None
    advised_min_ratio: float | None = None
    max_request_bytes: int | None = None


#: happyhorse-*-reference-to-video: "short side >= 400 px; <= 10 MB"; a short/long ratio >= 0.4 advised.
HAPPYHORSE_REFERENCE_IMAGES = ImageLimits(
    "HappyHorse reference images", 10 * MB, min_short_side=400, advised_min_ratio=0.4
)
#: happyhorse-*-image-to-video (and the video edit's images): "width and height >= 300 px, ratio
#: 1:2.5-2.5:1, <= 10 MB".
HAPPYHORSE_FRAME_IMAGES = ImageLimits(
    "HappyHorse image-to-video images", 10 * MB, min_side=300, ratio=(1 / 2.5, 2.5)
)
#: The Seedance 2.0 family: "300-6000 px, width/height 0.4-2.5, <= 30 MB each, the whole request <= 64 MB".
SEEDANCE_IMAGES = ImageLimits(
    "Seedance 2.0 images",
    30 * MB,
    min_side=300,
    max_side=6000,
    ratio=(0.4, 2.5),
    max_request_bytes=64 * MB,
)


def image_limits(model: str) -> ImageLimits | None:
    """The documented rules of ``model``'s ``image_urls``; ``None`` for a model without documented ones."""
    if model.startswith("happyhorse-") and model.endswith("-reference-to-video"):
        return HAPPYHORSE_REFERENCE_IMAGES
    if model.startswith("happyhorse-") and model.endswith(("-image-to-video", "-video-edit")):
        return HAPPYHORSE_FRAME_IMAGES
    if model.startswith("seedance-2.0-") and model in _SCHEMAS:
        return SEEDANCE_IMAGES
    return None


def image_problems(limits: ImageLimits, width: int, height: int, size: int) -> tuple[list[str], list[str]]:
    """What an image of ``width`` x ``height`` px and ``size`` bytes breaks: ``(rules, advice)``, each
    said as the rule (the caller names the file, its size and the model)."""
    if width <= 0 or height <= 0:
        return ["an image whose header gives its width and height"], []
    rules: list[str] = []
    advice: list[str] = []
    short, long = min(width, height), max(width, height)
    if size > limits.max_bytes:
        rules.append(f"at most {limits.max_bytes // MB} MB ({limits.max_bytes} bytes)")
    if short < limits.min_short_side:
        rules.append(f"a short side of at least {limits.min_short_side} px")
    if short < limits.min_side:
        rules.append(f"width and height of at least {limits.min_side} px")
    if limits.max_side is not None and long > limits.max_side:
        rules.append(f"width and height of at most {limits.max_side} px")
    if limits.ratio is not None and not limits.ratio[0] <= width / height <= limits.ratio[1]:
        low, high = limits.ratio
        rules.append(f"a width/height ratio from {low:g} to {high:g} (it is {width / height:.3g})")
    if limits.advised_min_ratio is not None and short / long < limits.advised_min_ratio:
        advice.append(
            f"EvoLink advises a short/long side ratio of at least {limits.advised_min_ratio:g} "
            f"(it is {short / long:.3g})"
        )
    return rules, advice


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


@dataclass(frozen=True)
class ModelSchema:
    """The fields of one model: ``fields`` maps each name to its coercer; ``required`` must be present."""

    name: str
    fields: dict[str, Coercer]
    required: frozenset[str]
    check: Callable[[FieldContext, dict[str, Any]], None] = lambda ctx, payload: None


def _named_references(
    ctx: FieldContext, prompt: str, pattern: str, counts: dict[str, int], label: Callable[[str], str]
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


def _over_advised_length(ctx: FieldContext, prompt: str, advice: str) -> None:
    """A prompt longer than EvoLink advises: a warning, or a refusal with ``prompt_policy="refuse"``."""
    if ctx.prompt_policy == "refuse":
        raise ctx.error("prompt", f"<{len(prompt)} characters>", f"{advice} (prompt_policy='refuse')")
    ctx.warnings.append(f"the prompt is longer than EvoLink advises: {advice}")


def _happyhorse_prompt(ctx: FieldContext, payload: dict[str, Any]) -> None:
    prompt = payload.get("prompt") or ""
    limit = HAPPYHORSE_CJK_PROMPT_CHARS if _CJK.search(prompt) else HAPPYHORSE_PROMPT_CHARS
    if len(prompt) > limit:
        _over_advised_length(
            ctx,
            prompt,
            f"at most {limit} characters; PROMPT WILL BE CUT: it has {len(prompt)}, EvoLink keeps the "
            f"first {limit} and silently drops the last {len(prompt) - limit}",
        )


def _happyhorse_references(ctx: FieldContext, payload: dict[str, Any]) -> None:
    _happyhorse_prompt(ctx, payload)
    _named_references(
        ctx,
        payload.get("prompt") or "",
        r"\b(character)(\d+)\b",
        {"character": len(payload.get("image_urls", []))},
        lambda kind: kind,
    )


def _seedance_prompt(ctx: FieldContext, payload: dict[str, Any]) -> None:
    prompt = payload.get("prompt") or ""
    tokens = estimate_prompt_tokens(prompt)
    if tokens > MAX_SEEDANCE_TOKENS:
        raise ctx.error("prompt", f"<{len(prompt)} characters, ~{tokens} tokens>", "at most 10000 tokens")
    cjk = len(_CJK.findall(prompt))
    if cjk > SEEDANCE_ADVISED_CJK_CHARS or len(prompt.split()) > SEEDANCE_ADVISED_WORDS:
        _over_advised_length(
            ctx,
            prompt,
            f"at most {SEEDANCE_ADVISED_CJK_CHARS} Chinese characters or {SEEDANCE_ADVISED_WORDS} words "
            "(EvoLink does not say what it does with the rest)",
        )
    if payload.get("content_filter") is False:
        ctx.warnings.append("content_filter=false relaxes moderation and costs x1.1")


def _seedance_references(ctx: FieldContext, payload: dict[str, Any]) -> None:
    _seedance_prompt(ctx, payload)
    counts = {kind: len(payload.get(f"{kind}_urls", [])) for kind in ("image", "video", "audio")}
    if not counts["image"] and not counts["video"]:
        raise ctx.error("image_urls", payload.get("image_urls"), "at least one image or video input")
    _named_references(
        ctx, payload.get("prompt") or "", r"@(image|video|audio)(\d+)", counts, lambda k: f"@{k}"
    )


def _video_edit(ctx: FieldContext, payload: dict[str, Any]) -> None:
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
        "warning is logged (``prompt_policy='refuse'`` fails the task instead).",
        "quality": "``720p`` (default) or ``1080p``.",
        "aspect_ratio": "``16:9`` (default), ``9:16``, ``1:1``, ``4:3``, ``3:4``, ``4:5``, ``5:4``, "
        "``9:21``, ``21:9``.",
        "duration": "seconds, 3-15 (default 5).",
        "seed": "1-2147483647 for reproducible output (default random).",
    },
    "happyhorse-*-image-to-video": {
        "prompt": "optional; up to 5,000 characters (2,500 with Chinese), longer prompts are cut (warned, "
        "or refused with ``prompt_policy='refuse'``).",
        "image_urls": "exactly 1 image (public http(s) URL, local path or storage URI): JPEG/PNG/WEBP, width "
        "and height at least 300 px, aspect ratio between 1:2.5 and 2.5:1, at most 10 MB.",
    },
    "happyhorse-*-reference-to-video": {
        "image_urls": "1-9 images (public http(s) URLs, local paths or storage URIs): JPEG/PNG/WEBP, short "
        "side at least 400 px, at most 10 MB each (a short/long ratio of at least 0.4 is advised).",
    },
    "happyhorse-1.0-video-edit": {
        "video_urls": "exactly 1 public http(s) URL of an MP4/MOV video, 3-60 s, at most 100 MB.",
        "video_url": "one source video URL in place of ``video_urls`` (give exactly one of the three).",
        "video": "one source video URL in place of ``video_urls`` (give exactly one of the three).",
        "image_urls": "0-5 reference images (URLs, local paths or storage URIs) with the image-to-video "
        "rules: JPEG/PNG/WEBP, width and height at least 300 px, ratio 1:2.5 to 2.5:1, at most 10 MB.",
        "keep_original_sound": "keep the sound of the source video.",
    },
    "seedance-2.0-*": {
        "prompt": "up to 10,000 tokens (EvoLink advises at most 500 Chinese characters or 1,000 words; "
        "longer is warned, or refused with ``prompt_policy='refuse'``).",
        "duration": "seconds, 4-15 (default 5).",
        "quality": "``480p`` or ``720p`` (default); the standard tier also ``1080p`` and ``4k``.",
        "aspect_ratio": "``adaptive`` (default since 2026-08), ``16:9``, ``9:16``, ``1:1``, ``4:3``, "
        "``3:4``, ``21:9``.",
        "generate_audio": "synchronised sound at no extra cost (default true).",
        "content_filter": "false relaxes moderation and costs x1.1 (default true).",
        "model_params": 'e.g. ``{"web_search": true}`` (billed only when used).',
    },
    "seedance-2.0-*image-to-video": {
        "image_urls": "1-2 images (URLs, local paths or storage URIs): the first frame, then the last; "
        "JPEG/PNG/WEBP, 300-6000 px, width/height 0.4-2.5, at most 30 MB each, 64 MB per request.",
    },
    "seedance-2.0-*reference-to-video": {
        "image_urls": "0-9 images (URLs, local paths or storage URIs), ``@image1``... in the prompt (at "
        "least one image or video in all); JPEG/PNG/WEBP, 300-6000 px, width/height 0.4-2.5, at most "
        "30 MB each, 64 MB per request.",
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
    model: str, fields: Mapping[str, Any], *, allow_local_media: bool = False, prompt_policy: str = "warn"
) -> ValidatedRequest:
    """Check and coerce a model's fields into the JSON body to POST, or raise EvolinkValidationError.

    :param allow_local_media: accept local paths and storage URIs in media fields, listing them in
        ``local_media`` for the operator to upload (then call again without the flag).
    :param prompt_policy: ``warn`` (default) or ``refuse`` a prompt longer than EvoLink advises.
    """
    if not isinstance(model, str) or not model.strip():
        raise EvolinkValidationError(str(model), "model", model, "an EvoLink model name")
    if prompt_policy not in PROMPT_POLICIES:
        raise EvolinkValidationError(model, "prompt_policy", prompt_policy, "'warn' or 'refuse'")
    ctx = FieldContext(model, allow_local_media, prompt_policy)
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


def _passthrough(ctx: FieldContext, given: dict[str, Any]) -> dict[str, Any]:
    """Unknown models: the rules every generation model shares, the rest passed as given."""
    if "prompt" in given and not isinstance(given["prompt"], str):
        raise ctx.error("prompt", given["prompt"], "a string")
    if "callback_url" in given:
        callback_url(ctx, "callback_url", given["callback_url"])
    return given
