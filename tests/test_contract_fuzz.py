"""Property-based cross-check of the local schemas against the strict simulator (issue: bad input, fuzzed).

For random values around every documented limit: whatever the schema accepts, the simulator accepts (no
server-side 400 the schema could have caught), and whatever the schema refuses, the simulator refuses too
when sent as is (no local refusal of a documented-valid value). The two are independent implementations
of the API document, so agreement means something.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolink_provider.exceptions import EvolinkValidationError
from evolink_provider.models import estimate_prompt_tokens, validate_request
from evolink_provider.simulator import validation as oracle
from tests.conftest import SIMULATOR_URL, TEST_API_KEY, SimulatorControl

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IMAGE = "https://cdn.example.com/ref.png"


def mostly(valid: list[Any], invalid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid (or omitted) four times in five, so that whole requests are often valid, and near misses."""
    good = st.sampled_from([None, *valid])
    return st.one_of(good, good, good, good, st.sampled_from(invalid))


def around(low: int, high: int) -> st.SearchStrategy[Any]:
    return mostly(
        [low, low + 1, high - 1, high, str(low), f" {high} "],
        [low - 1, high + 1, str(high + 1), "5.5", "", "five", 5.0, True, 0, -1],
    )


def near(values: list[str]) -> st.SearchStrategy[Any]:
    return mostly(
        values, [v.upper() for v in values] + [v + " " for v in values] + ["", "auto", "2:1", "1440p"]
    )


booleans = mostly([True, False, "true", "false", "TRUE"], ["yes", "1", 1, "yes please"])
GOOD_URLS = [
    IMAGE,
    "https://cdn.example.com/a.jpg",
    "http://cdn.example.com/a.webp",
    "https://cdn.example.com/img",
]
BAD_URLS = [
    "https://cdn.example.com/a.gif",
    "ftp://cdn.example.com/a.png",
    "https://user:pw@cdn.example.com/a.png",
    "file:///tmp/a.png",
    "not a url",
]
urls = st.one_of(*(4 * [st.sampled_from(GOOD_URLS)]), st.sampled_from(BAD_URLS))
prompts = st.one_of(
    st.sampled_from(["a quiet harbour", "character1 runs", "雨中的灯塔", "长" * 2501, "a" * 5001]),
    st.sampled_from(["", " ", "character2 runs", "character0 waits"]),
    st.text(min_size=1, max_size=40),
)
callbacks = mostly(
    ["https://hooks.example.com/x"],
    [
        "http://hooks.example.com/x",
        "https://127.0.0.1/x",
        "https://10.1.2.3/x",
        "https://[::1]/x",
        "https://localhost/x",
        "https://localhost./x",
        "https://127.1/x",
        "https://2130706433/x",
        "https://0x7f000001/x",
        "https://" + "a" * 2050 + ".com",
    ],
)

MODELS = {
    "happyhorse-1.0-reference-to-video": st.fixed_dictionaries(
        {
            "prompt": prompts,
            "image_urls": st.one_of(
                *(3 * [st.lists(urls, min_size=1, max_size=9)]), st.lists(urls, min_size=0, max_size=10)
            ),
            "quality": near(["720p", "1080p"]),
            "aspect_ratio": near(["16:9", "9:16", "1:1", "4:3", "3:4", "4:5", "5:4", "9:21", "21:9"]),
            "duration": around(3, 15),
            "seed": around(1, 2147483647),
            "callback_url": callbacks,
        }
    ),
    "seedance-2.0-fast-text-to-video": st.fixed_dictionaries(
        {
            "prompt": prompts,
            "duration": around(4, 15),
            "quality": near(["480p", "720p"]),
            "aspect_ratio": near(["16:9", "9:16", "1:1", "4:3", "3:4", "21:9", "adaptive"]),
            "generate_audio": booleans,
            "content_filter": booleans,
            "model_params": mostly([{"web_search": True}, {}], [{"web_search": "no"}, {"x": 1}, "nope"]),
            "callback_url": callbacks,
        },
        optional={"image_urls": st.lists(urls, max_size=2)},
    ),
    "sora-character": st.fixed_dictionaries(
        {
            "video_url": st.sampled_from(
                [
                    "https://cdn.example.com/v.mp4",
                    "https://cdn.example.com/v.MOV",
                    "https://cdn.example.com/v.avi",
                    "https://cdn.example.com/v",
                    "ftp://cdn.example.com/v.mp4",
                ]
            ),
            "timestamps": st.sampled_from(
                [None, "0,2", "1,3", "1.5,3.5", "2,2", "3,1", "0,2.01", "-1,1", "x"]
            ),
        }
    ),
}


def simulator_accepts(payload: dict[str, Any]) -> bool:
    response = requests.post(
        f"{SIMULATOR_URL}/v1/videos/generations",
        json=payload,
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        timeout=10,
    )
    assert response.status_code in (200, 400), response.text
    return response.status_code == 200


@pytest.mark.parametrize("model", sorted(MODELS))
def test_schema_and_simulator_agree(sim: SimulatorControl, model: str) -> None:
    verdicts = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(fields=MODELS[model])
    def check(fields: dict[str, Any]) -> None:
        try:
            payload = validate_request(model, fields).payload
        except EvolinkValidationError as error:
            assert error.field and error.allowed  # names the field and what is allowed
            verdicts["refused"] += 1
            raw = {"model": model, **{k: v for k, v in fields.items() if v is not None}}
            assert not simulator_accepts(raw), f"refused locally but valid for the API: {error}"
            return
        verdicts["accepted"] += 1
        assert simulator_accepts(payload), f"accepted locally, refused by the API: {payload}"

    check()
    assert verdicts["accepted"] and verdicts["refused"], verdicts  # both sides were exercised


#: The documented prompt limit of Seedance (10,000 tokens), at the boundary in Chinese, in English and mixed.
TOKEN_BOUNDARY = [
    ("长" * 10000, True),
    ("长" * 10001, False),
    ("a" * 40000, True),
    ("a" * 40001, False),
    ("长" * 5000 + "a" * 20000, True),
    ("长" * 5000 + "a" * 20001, False),
]


@pytest.mark.parametrize(
    ("prompt", "within"), TOKEN_BOUNDARY, ids=[f"{len(p)}-chars-{w}" for p, w in TOKEN_BOUNDARY]
)
def test_client_and_oracle_count_tokens_their_own_way_but_agree_on_the_documented_boundary(
    prompt: str, within: bool
) -> None:
    body = {"model": "seedance-2.0-fast-text-to-video", "prompt": prompt}
    assert (estimate_prompt_tokens(prompt) <= 10000) is within
    assert (oracle.estimate_prompt_tokens(prompt) <= 10000) is within
    try:
        oracle.validate_generation(body)
        accepted = True
    except oracle.RequestRejected as rejection:
        assert rejection.param == "prompt"
        accepted = False
    assert accepted is within
    try:
        validate_request(body["model"], {"prompt": prompt})
        assert within
    except EvolinkValidationError as error:
        assert not within and error.field == "prompt"


def test_the_oracle_shares_no_code_with_the_client() -> None:
    """The simulator imports nothing of the provider outside itself, so no mistake can pass both."""
    imported: set[str] = set()
    for source in Path(oracle.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    provider = {name for name in imported if name.startswith("evolink_provider")}
    assert provider and all(name.startswith("evolink_provider.simulator") for name in provider), provider
