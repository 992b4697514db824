"""Every documented limit of the request schemas: an accepted and a refused value on each side."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evolink_provider.exceptions import EvolinkValidationError
from evolink_provider.models import (
    KNOWN_MODELS,
    MAX_SEED,
    MediaRef,
    estimate_prompt_tokens,
    schema_for,
    validate_request,
)

HH = "happyhorse-1.0-reference-to-video"
SD = "seedance-2.0-fast-text-to-video"
SORA = "sora-character"
IMG = "https://cdn.example.com/a.png"
BASE = {
    HH: {"prompt": "character1 walks", "image_urls": [IMG]},
    SD: {"prompt": "a calm sea"},
    SORA: {"video_url": "https://cdn.example.com/clip.mp4"},
}


def ok(model: str, **fields: Any) -> dict[str, Any]:
    return validate_request(model, {**BASE[model], **fields}).payload


def refused(model: str, **fields: Any) -> EvolinkValidationError:
    with pytest.raises(EvolinkValidationError) as caught:
        validate_request(model, {**BASE[model], **fields})
    return caught.value


LIMITS = [
    # model, field, accepted values, refused values
    (HH, "duration", [3, 15, "7"], [2, 16, "5.5", 5.0, True]),
    (HH, "seed", [1, MAX_SEED], [0, MAX_SEED + 1, "x"]),
    (HH, "quality", ["720p", "1080p"], ["480p", "4k", "1080P"]),
    (
        HH,
        "aspect_ratio",
        ["16:9", "9:16", "1:1", "4:3", "3:4", "4:5", "5:4", "9:21", "21:9"],
        ["adaptive", "2:1"],
    ),
    (HH, "image_urls", [[IMG], [IMG] * 9], [[], [IMG] * 10, IMG, ["ftp://x/a.png"], ["https://x/a.gif"]]),
    (SD, "duration", [4, 15, " 10 "], [3, 16, "yes"]),
    (SD, "quality", ["480p", "720p"], ["1080p", "4k"]),
    (SD, "aspect_ratio", ["16:9", "9:16", "1:1", "4:3", "3:4", "21:9", "adaptive"], ["4:5", "9:21"]),
    (SD, "generate_audio", [True, False, "true", "FALSE"], ["yes", "1", 1, "yes please"]),
    (SD, "content_filter", [True, "false"], ["no"]),
    (
        SD,
        "model_params",
        [{"web_search": True}, '{"web_search": false}'],
        [{"other": 1}, "nope", {"web_search": "maybe"}],
    ),
    (SORA, "timestamps", ["0,2", "1,3", "1.5,3.5", [0, 1]], ["2,2", "3,1", "0,2.5", "-1,1", "a,b", "1"]),
    (
        SORA,
        "video_url",
        ["https://x/v.mov", "https://x/v.WEBM?sig=1"],
        ["https://x/v.avi", "https://x/video", "ftp://x/v.mp4"],
    ),
]


@pytest.mark.parametrize(("model", "name", "good", "bad"), LIMITS, ids=[f"{m}-{n}" for m, n, _, _ in LIMITS])
def test_each_documented_limit(model: str, name: str, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        assert name in ok(model, **{name: value})
    for value in bad:
        error = refused(model, **{name: value})
        assert error.field.startswith(name)
        assert name in str(error) and "allowed" in str(error)


def test_template_strings_are_coerced_to_json_types() -> None:
    payload = ok(SD, duration="6", generate_audio="false", quality="480p")
    assert payload["duration"] == 6 and payload["generate_audio"] is False


def test_unset_fields_are_omitted_so_the_api_defaults_apply() -> None:
    assert ok(SD, duration=None, quality=None) == {"model": SD, "prompt": "a calm sea"}


def test_required_fields() -> None:
    assert refused(SD, prompt=None).field == "prompt"
    assert refused(HH, image_urls=None).field == "image_urls"
    with pytest.raises(EvolinkValidationError, match="video_url"):
        validate_request(SORA, {})


def test_text_only_model_refuses_media() -> None:
    for name in ("image_urls", "video_urls", "audio_urls"):
        assert "text only" in str(refused(SD, **{name: [IMG]}))


def test_unknown_field_is_refused_naming_the_allowed_ones() -> None:
    error = refused(SD, aspect_ration="1:1")
    assert "aspect_ratio" in error.allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "https://127.0.0.1/hook",
        "https://10.0.0.5/hook",
        "https://172.16.3.4/hook",
        "https://192.168.1.1/hook",
        "https://169.254.169.254/latest",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
        "https://" + "a" * 2040 + ".com/",
        # Spellings a URL parser turns into loopback (percent-decoding, IDNA/UTS 46 mapping).
        "https://\uff11\uff12\uff17.\uff10.\uff10.\uff11/hook",
        "https://127\u30020\u30020\u30021/hook",
        "https://127.0.0.1%2e/hook",
        "https://\u24db\u24de\u24d2\u24d0\u24db\u24d7\u24de\u24e2\u24e3/hook",
        # urlsplit drops line breaks, so the checked URL would not be the one sent.
        "https://hooks.example.com/a\r\nb",
    ],
)
def test_callback_url_refuses_unsafe_targets(url: str) -> None:
    assert refused(SD, callback_url=url).field == "callback_url"


def test_callback_url_accepts_a_public_https_url() -> None:
    assert ok(SD, callback_url="https://hooks.example.com/evolink")["callback_url"]
    assert ok(SD, callback_url="https://m\u00fcnchen.example/evolink")["callback_url"]


def test_sora_character_has_no_callback_url() -> None:
    assert refused(SORA, callback_url="https://hooks.example.com/x").field == "callback_url"


def test_character_references() -> None:
    assert refused(HH, prompt="character2 dances").field == "prompt"
    assert refused(HH, prompt="character0 dances").field == "prompt"
    result = validate_request(HH, {"prompt": "character1 waves", "image_urls": [IMG, IMG]})
    assert any("character2" in warning for warning in result.warnings)


def test_seedance_reference_names() -> None:
    model = "seedance-2.0-reference-to-video"
    with pytest.raises(EvolinkValidationError, match="@video1"):
        validate_request(model, {"prompt": "@image1 meets @video1", "image_urls": [IMG]})
    with pytest.raises(EvolinkValidationError):
        validate_request(model, {"prompt": "sound only", "audio_urls": ["https://x/a.mp3"]})
    assert validate_request(
        model, {"prompt": "@image1 and @video1", "image_urls": [IMG], "video_urls": ["https://x/v.mp4"]}
    )


@pytest.mark.parametrize(
    ("prompt", "warned"), [("长" * 2500, False), ("长" * 2501, True), ("a" * 5000, False), ("a" * 5001, True)]
)
def test_happyhorse_prompt_cut_is_warned_not_refused(prompt: str, warned: bool) -> None:
    result = validate_request(HH, {"prompt": "character1 " + prompt[11:], "image_urls": [IMG]})
    assert any("CUT" in warning for warning in result.warnings) is warned


def test_seedance_token_limit() -> None:
    assert estimate_prompt_tokens("长" * 10000) == 10000
    assert ok(SD, prompt="长" * 10000)
    assert refused(SD, prompt="长" * 10001).field == "prompt"
    assert ok(SD, prompt="a" * 40000)
    assert refused(SD, prompt="a" * 40001).field == "prompt"


def test_urls_with_credentials_are_refused_without_echoing_them() -> None:
    error = refused(HH, image_urls=["https://user:secret@cdn.example.com/a.png"])
    assert "secret" not in str(error)


def test_local_media_is_refused_unless_the_operator_uploads_it() -> None:
    assert "upload" in str(refused(HH, image_urls=["file:///data/a.png"]))
    result = validate_request(
        HH,
        {
            "prompt": "character1 character2 character3",
            "image_urls": [IMG, "/data/b.png", "s3://bucket/c.png"],
        },
        allow_local_media=True,
    )
    assert result.local_media == [
        MediaRef("image_urls", 1, "/data/b.png"),
        MediaRef("image_urls", 2, "s3://bucket/c.png"),
    ]
    with pytest.raises(EvolinkValidationError):
        validate_request(
            HH, {"prompt": "character1", "image_urls": ["javascript:alert(1)"]}, allow_local_media=True
        )


def test_list_fields_accept_rendered_lists_but_not_a_bare_string() -> None:
    assert ok(HH, image_urls=str([IMG]))["image_urls"] == [IMG]
    assert refused(HH, image_urls=IMG).field == "image_urls"


def test_unknown_models_pass_through() -> None:
    payload = validate_request("evolink-future-video-2", {"prompt": "x", "style": "noir"}).payload
    assert payload == {"model": "evolink-future-video-2", "prompt": "x", "style": "noir"}
    with pytest.raises(EvolinkValidationError):
        validate_request("evolink-future-video-2", {"prompt": 5})


def test_the_families_are_known() -> None:
    assert {HH, SD, SORA, "happyhorse-1.1-text-to-video", "seedance-2.0-mini-image-to-video"} <= KNOWN_MODELS
    assert schema_for("happyhorse-1.0-video-edit") is not None
    assert schema_for("evolink-future-video-2") is None
    assert "4k" not in str(refused(SD, quality="4k").allowed) and ok(SD, quality="720p")
    assert validate_request("seedance-2.0-text-to-video", {"prompt": "x", "quality": "4k"})


@given(st.integers(min_value=-5, max_value=25))
def test_durations_are_accepted_exactly_inside_the_range(duration: int) -> None:
    try:
        validate_request(SD, {"prompt": "x", "duration": duration})
        accepted = True
    except EvolinkValidationError:
        accepted = False
    assert accepted is (4 <= duration <= 15)
