"""The request rules of EvoLink's documented contract, written from the API document alone.

This is the server-side oracle: it plays the part of EvoLink's own checks. The provider's client-side
check is :mod:`evolink_provider.models`; this module was written independently from the API document
(``shared/evolink-api.md``) and shares no code, constant or counting rule with it, so that one mistake
cannot pass both. Where the two need the same number, each transcribes it from the document; where they
need an approximation (the token count), each has its own, and a test checks that they agree on the
documented boundary. Where the documents are silent the stricter reading is taken (and said).
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import unicodedata
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

# The documented values, transcribed from the document's field tables (defaults first).
_HAPPYHORSE_SEED_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4")  # the seed document's five
HAPPYHORSE_RATIOS = (*_HAPPYHORSE_SEED_RATIOS, "4:5", "5:4", "9:21", "21:9")  # and 2026-06's four
SEEDANCE_RATIOS = ("adaptive", "16:9", "9:16", "1:1", "4:3", "3:4", "21:9")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".webp")  # "JPEG/JPG/PNG/WEBP"
SORA_VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm")
EDIT_VIDEO_EXTENSIONS = (".mp4", ".mov")
REFERENCE_VIDEO_EXTENSIONS = (".mp4", ".mov")
REFERENCE_AUDIO_EXTENSIONS = (".wav", ".mp3")
MAX_SEED = 2**31 - 1  # "1-2147483647"
MAX_SEEDANCE_TOKENS = 10_000


class RequestRejected(Exception):
    """A request the real service answers with an HTTP error."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def bad(message: str, param: str | None = None) -> RequestRejected:
    return RequestRejected(400, "invalid_request", message, param)


def estimate_prompt_tokens(text: str) -> int:
    """The simulator's own stand-in for EvoLink's tokenizer, which the document does not name.

    Counted in quarter tokens: a character Unicode calls East Asian wide or fullwidth (Chinese, Japanese
    kana, Hangul, fullwidth forms) is a whole token, any other character a quarter, as English runs at
    about four characters a token. Wider than "Chinese" on purpose: the oracle must not be looser.
    """
    quarters = sum(4 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)
    return math.ceil(quarters / 4)


def has_cjk(text: str) -> bool:
    """Whether the prompt holds Chinese, which halves HappyHorse's prompt limit: any CJK ideograph."""
    return any(unicodedata.name(char, "").startswith("CJK ") for char in text)


@dataclass
class Accepted:
    """What the task store needs from an accepted request."""

    model: str
    body: dict[str, Any]
    media_urls: list[str] = field(default_factory=list)
    prompt_truncated: bool = False
    duration: int = 5
    quality: str = "720p"
    aspect_ratio: str = "16:9"
    audio: bool = False
    kind: str = "video"  # or "character"


def _check_url(value: Any, param: str, extensions: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise bad(f"{param} must be a URL string", param)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad(f"{param} must be a public http(s) URL", param)
    if parts.username or parts.password:
        raise bad(f"{param} must not carry credentials", param)
    if extensions is not None:
        path = parts.path.lower()
        last = path.rsplit("/", 1)[-1]
        if "." in last and not path.endswith(extensions):
            raise bad(f"{param} must be one of {', '.join(extensions)}", param)
    return value


def _url_list(
    body: dict[str, Any], name: str, low: int, high: int, extensions: tuple[str, ...] | None
) -> list[str]:
    value = body.get(name, [] if low == 0 else None)
    if value is None:
        raise bad(f"{name} is required", name)
    if not isinstance(value, list):
        raise bad(f"{name} must be an array of URLs", name)
    if not low <= len(value) <= high:
        raise bad(f"{name} must hold {low}-{high} URLs, got {len(value)}", name)
    return [_check_url(item, name, extensions) for item in value]


def _int(body: dict[str, Any], name: str, low: int, high: int, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):  # JSON "5" or 5.0 is a type error
        raise bad(f"{name} must be an integer", name)
    if not low <= value <= high:
        raise bad(f"{name} must be between {low} and {high}", name)
    return value


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise bad(f"{name} must be a boolean", name)
    return value


def _enum(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name, default)
    if value not in allowed:
        raise bad(f"{name} must be one of {', '.join(allowed)}", name)
    return str(value)


def _prompt(body: dict[str, Any], required: bool = True) -> str:
    value = body.get("prompt")
    if value is None:
        if required:
            raise bad("prompt is required", "prompt")
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise bad("prompt must be a non-empty string", "prompt")
    return value


_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: no public host


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host names when it is one, read the way resolvers read it: ``inet_aton`` also takes
    the shorthand forms ("127.1", "2130706433", "0x7f.0.0.1") that reach the same machine."""
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        pass
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        return None
    return address.ipv4_mapped or address


def check_callback_url(body: dict[str, Any]) -> None:
    """The document: HTTPS only, at most 2048 characters, private and loopback targets refused."""
    value = body.get("callback_url")
    if value is None:
        return
    if not isinstance(value, str) or len(value) > 2048:
        raise bad("callback_url must be a string of at most 2048 characters", "callback_url")
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise bad("callback_url must be an https URL", "callback_url")
    host = parts.hostname.lower().rstrip(".")
    address = _literal_address(host)
    private = host == "localhost" or host.endswith(".localhost")
    if address is not None:
        private = (
            address.is_private
            or address.is_loopback
            or address.is_link_local
            or address.is_multicast
            or address.is_reserved
            or address.is_unspecified
            or address in _SHARED_ADDRESS_SPACE
        )
    if private:
        raise bad("callback_url must not target a private address", "callback_url")


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed and name != "model":
            # Strict: an unknown field is refused rather than silently ignored.
            raise bad(f"unknown field {name}; allowed: {', '.join(sorted(allowed))}", name)


def _references(prompt: str, pattern: str, counts: dict[str, int]) -> None:
    for kind, number in re.findall(pattern, prompt, flags=re.IGNORECASE):
        kind = kind.lower()
        if int(number) < 1 or int(number) > counts.get(kind, 0):
            raise bad(
                f"prompt names {kind}{number} but only {counts.get(kind, 0)} {kind} input(s) given", "prompt"
            )


def _happyhorse(model: str, body: dict[str, Any]) -> Accepted:
    kind = model.split("-", 2)[2]  # text-to-video, image-to-video, reference-to-video, video-edit
    common = {"prompt", "quality", "seed", "callback_url"}
    allowed = {
        "text-to-video": common | {"aspect_ratio", "duration"},
        "image-to-video": common | {"image_urls", "duration"},
        "reference-to-video": common | {"image_urls", "aspect_ratio", "duration"},
        # The edit's one video may come as video_urls, video_url or video (the docs' compatible fields).
        "video-edit": common | {"video_urls", "video_url", "video", "image_urls", "keep_original_sound"},
    }.get(kind)
    if allowed is None or (kind == "video-edit" and not model.startswith("happyhorse-1.0")):
        raise RequestRejected(400, "invalid_request", f"unknown model {model}", "model")
    _only(body, allowed)
    prompt = _prompt(body, required=kind != "image-to-video")
    quality = _enum(body, "quality", ("720p", "1080p"), "720p")
    aspect = _enum(body, "aspect_ratio", HAPPYHORSE_RATIOS, "16:9") if "aspect_ratio" in allowed else "16:9"
    duration = _int(body, "duration", 3, 15, 5) if "duration" in allowed else 5
    _int(body, "seed", 1, MAX_SEED)
    check_callback_url(body)
    media: list[str] = []
    if kind == "image-to-video":
        media = _url_list(body, "image_urls", 1, 1, IMAGE_EXTENSIONS)
    elif kind == "reference-to-video":
        media = _url_list(body, "image_urls", 1, 9, IMAGE_EXTENSIONS)
        _references(prompt, r"\b(character)(\d+)\b", {"character": len(media)})
    elif kind == "video-edit":
        sources = [name for name in ("video_urls", "video_url", "video") if name in body]
        if len(sources) != 1:
            raise bad("give the video as exactly one of video_urls, video_url or video", "video_urls")
        if sources[0] == "video_urls":
            media = _url_list(body, "video_urls", 1, 1, EDIT_VIDEO_EXTENSIONS)
        else:
            media = [_check_url(body[sources[0]], sources[0], EDIT_VIDEO_EXTENSIONS)]
        media += _url_list(body, "image_urls", 0, 5, IMAGE_EXTENSIONS)
        _bool(body, "keep_original_sound", True)
    limit = 2500 if has_cjk(prompt) else 5000
    truncated = len(prompt) > limit  # documented: the API cuts the excess silently
    return Accepted(model, body, media, truncated, duration or 5, quality, aspect, audio=True)


def _seedance(model: str, body: dict[str, Any]) -> Accepted:
    match = re.fullmatch(r"seedance-2\.0-(fast-|mini-)?(text|image|reference)-to-video", model)
    if not match:
        raise RequestRejected(400, "invalid_request", f"unknown model {model}", "model")
    tier, kind = match.group(1) or "", match.group(2)
    allowed = {
        "prompt",
        "duration",
        "quality",
        "aspect_ratio",
        "generate_audio",
        "content_filter",
        "callback_url",
    }
    if kind == "text" and tier in ("", "fast-"):
        allowed |= {"model_params"}  # web search: standard and fast text-to-video only
    if kind == "text":
        for name in ("image_urls", "video_urls", "audio_urls"):
            if name in body:
                raise bad(f"{model} is text only: {name} is not accepted", name)
    elif kind == "image":
        allowed |= {"image_urls"}
    else:
        allowed |= {"image_urls", "video_urls", "audio_urls"}
    _only(body, allowed)
    prompt = _prompt(body)
    if estimate_prompt_tokens(prompt) > MAX_SEEDANCE_TOKENS:
        raise bad(f"prompt exceeds {MAX_SEEDANCE_TOKENS} tokens", "prompt")
    duration = _int(body, "duration", 4, 15, 5) or 5
    qualities = ("480p", "720p", "1080p", "4k") if tier == "" else ("480p", "720p")
    quality = _enum(body, "quality", qualities, "720p")
    aspect = _enum(body, "aspect_ratio", SEEDANCE_RATIOS, "adaptive")
    audio = _bool(body, "generate_audio", True)
    _bool(body, "content_filter", True)
    params = body.get("model_params", {})
    if not isinstance(params, dict):
        raise bad("model_params must be an object", "model_params")
    for name, value in params.items():
        if name != "web_search" or not isinstance(value, bool):
            raise bad("model_params accepts web_search (boolean) only", "model_params")
    check_callback_url(body)
    media: list[str] = []
    if kind == "image":
        media = _url_list(body, "image_urls", 1, 2, IMAGE_EXTENSIONS)
    elif kind == "reference":
        images = _url_list(body, "image_urls", 0, 9, IMAGE_EXTENSIONS)
        videos = _url_list(body, "video_urls", 0, 3, REFERENCE_VIDEO_EXTENSIONS)
        audios = _url_list(body, "audio_urls", 0, 3, REFERENCE_AUDIO_EXTENSIONS)
        if not images and not videos:
            raise bad("reference-to-video needs at least one image or video", "image_urls")
        _references(
            prompt,
            r"@(image|video|audio)(\d+)",
            {"image": len(images), "video": len(videos), "audio": len(audios)},
        )
        media = images + videos + audios
    return Accepted(model, body, media, False, duration, quality, aspect, audio)


_MEGABYTE = 1 << 20


def image_failure(model: str, width: int, height: int, size: int) -> str | None:
    """The task error code EvoLink fails a task with after fetching one input image (None: it fits).

    Transcribed from the document's input-media lines: HappyHorse reference images need a short side of
    400 px and at most 10 MB; HappyHorse image-to-video (and the edit's images) width and height of 300 px
    each, width:height between 1:2.5 and 2.5:1, at most 10 MB; the Seedance family 300 to 6000 px on both
    sides, width/height 0.4 to 2.5, 30 MB. The recommended reference ratio is advice, not a failure. Pixel
    rules fail as ``image_dimension_mismatch``; the document names no code for bytes, so
    ``invalid_parameters`` ("sizes") stands in.
    """
    if model.startswith("happyhorse-"):
        if model.endswith("reference-to-video"):
            pixels_ok = min(width, height) >= 400
        else:
            pixels_ok = width >= 300 and height >= 300 and 2 * width <= 5 * height and 2 * height <= 5 * width
        max_megabytes = 10
    elif model.startswith("seedance-2.0-"):
        in_range = all(300 <= side <= 6000 for side in (width, height))
        pixels_ok = in_range and 2 * height <= 5 * width and 2 * width <= 5 * height
        max_megabytes = 30
    else:
        return None
    if not pixels_ok:
        return "image_dimension_mismatch"
    if size > max_megabytes * _MEGABYTE:
        return "invalid_parameters"
    return None


def request_media_failure(model: str, total_bytes: int) -> str | None:
    """The Seedance family's cap on a whole request's media: 64 MB (other families state none)."""
    if model.startswith("seedance-2.0-") and total_bytes > 64 * _MEGABYTE:
        return "invalid_parameters"
    return None


_BAD_TIMESTAMPS = 'timestamps must be "start,end" in seconds'


def _seconds(text: str) -> float:
    """A plain decimal number of seconds ("1", "1.5"); signs, exponents, "nan" and non-ASCII digits are
    refused, as the document's "comma-separated seconds" does not cover them."""
    whole, dot, fraction = text.strip().partition(".")
    if not (whole + fraction).isascii() or not whole.isdigit() or (dot and not fraction.isdigit()):
        raise bad(_BAD_TIMESTAMPS, "timestamps")
    return float(text)


def _sora_character(body: dict[str, Any]) -> Accepted:
    # The withdrawn page listed no callback_url for this model: refused, the strict reading.
    _only(body, {"video_url", "timestamps"})
    if "video_url" not in body:
        raise bad("video_url is required", "video_url")
    url = _check_url(body["video_url"], "video_url")
    if not urlsplit(url).path.lower().endswith(SORA_VIDEO_EXTENSIONS):
        raise bad("video_url must be an .mp4, .mov or .webm file", "video_url")
    stamps = body.get("timestamps", "0,2")
    parts = stamps.split(",") if isinstance(stamps, str) else []
    if len(parts) != 2:
        raise bad(_BAD_TIMESTAMPS, "timestamps")
    start, end = _seconds(parts[0]), _seconds(parts[1])
    if not (0 <= start < end and end - start <= 2):
        raise bad("timestamps must satisfy 0 <= start < end and end - start <= 2", "timestamps")
    return Accepted("sora-character", body, [url], kind="character")


def validate_generation(body: Any) -> Accepted:
    """Check a ``POST /v1/videos/generations`` body; raise :class:`RequestRejected` as EvoLink would."""
    if not isinstance(body, dict):
        raise bad("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required", "model")
    if model.startswith("happyhorse-1.0-") or model.startswith("happyhorse-1.1-"):
        return _happyhorse(model, body)
    if model.startswith("seedance-2.0-"):
        return _seedance(model, body)
    if model == "sora-character":
        return _sora_character(body)
    # Models outside the documented families pass, with the rules common to all generation models.
    if "prompt" in body and not isinstance(body["prompt"], str):
        raise bad("prompt must be a string", "prompt")
    check_callback_url(body)
    duration = body.get("duration")
    seconds = (
        duration
        if isinstance(duration, int) and not isinstance(duration, bool) and 1 <= duration <= 60
        else 5
    )
    return Accepted(model, body, [], duration=seconds)
