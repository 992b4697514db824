"""EvoLink's real answers ("What EvoLink's own clients have seen" in the shared API facts).

Hook, storage and trigger tests speak real HTTP to the simulator (which answers in those shapes); the
operator tests run real DAGs with ``dag.test()``; parsing and classification of shapes the simulator
does not produce on its own are checked on the pure functions.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from evolink_provider.exceptions import (
    EvolinkAuthenticationError,
    EvolinkBadAnswerError,
    EvolinkBadRequestError,
    EvolinkConflictError,
    EvolinkInsufficientCreditsError,
    EvolinkRefusedError,
    EvolinkServerError,
    EvolinkSubmissionUnknownError,
    EvolinkTaskError,
    EvolinkTransportError,
    EvolinkValidationError,
    is_channel_code,
    task_error_is_retryable,
)
from evolink_provider.hooks.connection import ApiRequest
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.responses import parse_response
from evolink_provider.hooks.transport import aclose_async_clients
from evolink_provider.models import validate_request
from evolink_provider.polling import Outcome, decide_after_poll
from evolink_provider.results import result_urls
from evolink_provider.storage import store_results
from evolink_provider.triggers.evolink import EvolinkTaskTrigger, task_from_event
from tests.airflow_runs import run_dag
from tests.conftest import CONNECTION_EXTRA, TEST_API_KEY, SimulatorControl
from tests.test_trigger import run_trigger

SEEDANCE = {"model": "seedance-2.0-fast-text-to-video", "prompt": "a lighthouse at dawn", "duration": 4}
ATTEMPTS = CONNECTION_EXTRA["max_retries"] + 1
REQUEST = ApiRequest(
    "GET", "https://api.evolink.ai/v1/credits", "/v1/credits", {}, connection="EvoLink connection 'x' (u)"
)


@pytest.fixture
def hook() -> EvolinkHook:
    return EvolinkHook()


def seedance(prompt: str) -> dict[str, Any]:
    return {**SEEDANCE, "prompt": prompt}


def wait_for_end(hook: EvolinkHook, task_id: str) -> dict[str, Any]:
    for _ in range(150):
        task = hook.get_task(task_id)
        if task["status"] not in ("pending", "processing"):
            return task
        time.sleep(0.1)
    raise AssertionError(f"{task_id} did not end")


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "evolink", **fields}))


# -- error bodies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "code", "message", "request_id"),
    [
        (
            {"error": {"code": "invalid_request", "message": "m", "request_id": "req_in"}},
            {},
            "invalid_request",
            "m",
            "req_in",
        ),
        (
            {"error": {"code": "invalid_request", "message": "m"}, "request_id": "req_top"},
            {},
            "invalid_request",
            "m",
            "req_top",
        ),
        (
            {"error": {"code": "invalid_request", "message": "m"}},
            {"x-request-id": "req_hdr"},
            "invalid_request",
            "m",
            "req_hdr",
        ),
        (
            {"error": "invalid_token", "error_description": "token expired"},
            {},
            "invalid_token",
            "token expired",
            None,
        ),
        ({"error": {"code": 401, "message": "bad key"}}, {}, "401", "bad key", None),
        ({"code": 503, "message": "busy"}, {}, "503", "busy", None),
        ({"success": False, "code": 413, "msg": "too large"}, {}, "413", "too large", None),
    ],
    ids=[
        "id-in-error",
        "id-top-level",
        "id-in-header",
        "oauth",
        "credits-int-code",
        "top-level-code",
        "files-envelope",
    ],
)
def test_every_error_body_shape_is_read(
    body: dict[str, Any], headers: dict[str, str], code: str, message: str, request_id: str | None
) -> None:
    with pytest.raises(EvolinkAuthenticationError) as caught:
        parse_response(REQUEST, 401, headers, json.dumps(body).encode())
    assert (caught.value.code, caught.value.api_message, caught.value.request_id) == (
        code,
        message,
        request_id,
    )
    assert str(caught.value).count("EvoLink connection 'x'") == 1


def test_the_simulators_request_id_is_in_the_error_and_the_header(
    sim: SimulatorControl, hook: EvolinkHook
) -> None:
    answer = requests.post(
        f"{sim.base_url}/v1/videos/generations",
        json={**SEEDANCE, "duration": 99},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["request_id"] == answer.headers["X-Request-Id"]
    with pytest.raises(EvolinkBadRequestError) as caught:
        hook.create_video_task({**SEEDANCE, "duration": 99})
    assert caught.value.request_id and caught.value.request_id.startswith("req_")


def test_oauth_shaped_401_is_an_authentication_error_and_final(
    sim: SimulatorControl, hook: EvolinkHook
) -> None:
    with pytest.raises(EvolinkAuthenticationError) as caught:
        hook.create_video_task(seedance("who am I [sim:reject=invalid_token]"))
    assert caught.value.code == "invalid_token"
    assert "invalid_token" in caught.value.api_message
    assert not caught.value.retryable
    assert sim.posts() == 1


@pytest.mark.parametrize(
    ("fault", "error_type"),
    [
        ({"method": "GET", "path_prefix": "/v1/tasks/", "kind": "status", "status": 429}, "evo_api_error"),
        (
            {"method": "GET", "path_prefix": "/v1/tasks/", "kind": "status", "status": 503},
            "service_unavailable_error",
        ),
        (
            {"method": "GET", "path_prefix": "/v1/tasks/", "kind": "status", "status": 404},
            "invalid_request_error",
        ),
        (
            {"method": "GET", "path_prefix": "/v1/tasks/", "kind": "status", "status": 403},
            "invalid_request_error",
        ),
        (
            {"method": "POST", "path_prefix": "/v1/videos", "kind": "status", "status": 402},
            "insufficient_quota",
        ),
    ],
    ids=["429-task-read", "503", "404", "403", "402"],
)
def test_the_simulator_uses_the_documented_error_types(
    sim: SimulatorControl, fault: dict[str, Any], error_type: str
) -> None:
    sim.add_faults({**fault, "count": 1})
    path = (
        "/v1/tasks/task-unified-1700000000-abcdefgh" if fault["method"] == "GET" else "/v1/videos/generations"
    )
    answer = requests.request(
        fault["method"],
        f"{sim.base_url}{path}",
        json=SEEDANCE,
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        timeout=5,
    )
    assert answer.json()["error"]["type"] == error_type


def test_credits_errors_carry_an_integer_code(sim: SimulatorControl) -> None:
    answer = requests.get(
        f"{sim.base_url}/v1/credits", headers={"Authorization": "Bearer sk-wrong"}, timeout=5
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == 401


# -- codes EvoLink's clients retry ----------------------------------------------------------------


@pytest.mark.parametrize(
    "code", ["channel_selection_failed", "channel_unavailable", "channel:seedance-pool-3"]
)
def test_channel_codes_on_submission_are_retried_with_the_same_key(
    sim: SimulatorControl, hook: EvolinkHook, code: str
) -> None:
    key = "evl-test-channel-retry-000001"
    task = hook.create_video_task(seedance(f"busy [sim:reject={code}:1]"), idempotency_key=key)
    stats = sim.stats()
    assert stats["posts_by_idempotency_key"] == {key: 2}
    assert stats["tasks_by_idempotency_key"] == {key: [task["id"]]}


def test_channel_codes_are_classified_transient() -> None:
    assert all(map(is_channel_code, ["channel_selection_failed", "channel_x", "channel:openai"]))
    assert not is_channel_code("invalid_request") and not is_channel_code(None)
    assert task_error_is_retryable("channel:seedance-busy")
    assert EvolinkBadRequestError("m", status_code=400, code="channel:x").retryable


def test_daily_quota_is_left_to_a_later_airflow_retry(sim: SimulatorControl, hook: EvolinkHook) -> None:
    with pytest.raises(EvolinkInsufficientCreditsError) as caught:
        hook.create_video_task(seedance("quota [sim:reject=token_daily_quota_exceeded]"))
    assert caught.value.retryable and not caught.value.retry_now
    assert sim.posts() == 1  # seconds of backoff cannot reset a daily quota
    with pytest.raises(EvolinkInsufficientCreditsError) as final:
        hook.create_video_task(seedance("broke [sim:reject=insufficient_quota]"))
    assert not final.value.retryable


def test_paid_outcome_unknown_is_retried_with_the_same_key_and_finds_the_first_task(
    sim: SimulatorControl, hook: EvolinkHook
) -> None:
    key = "evl-test-paid-unknown-0000001"
    task = hook.create_video_task(seedance("unsure [sim:reject=paid_outcome_unknown:2]"), idempotency_key=key)
    stats = sim.stats()
    assert stats["posts_by_idempotency_key"] == {key: 3}
    assert stats["tasks_created"] == 1
    assert stats["tasks_by_idempotency_key"][key] == [task["id"]]


def test_paid_outcome_still_unknown_names_the_key_for_the_airflow_retry(
    sim: SimulatorControl, hook: EvolinkHook
) -> None:
    key = "evl-test-paid-unknown-0000002"
    with pytest.raises(EvolinkSubmissionUnknownError) as caught:
        hook.create_video_task(seedance("unsure [sim:reject=paid_outcome_unknown]"), idempotency_key=key)
    assert caught.value.idempotency_key == key and caught.value.retryable
    assert "paid_outcome_unknown" in str(caught.value)
    assert sim.stats()["posts_by_idempotency_key"] == {key: ATTEMPTS}


def test_idempotency_conflict_is_final(sim: SimulatorControl, hook: EvolinkHook) -> None:
    key = "evl-test-conflict-final-00001"
    hook.create_video_task(dict(SEEDANCE), idempotency_key=key)
    with pytest.raises(EvolinkConflictError) as caught:
        hook.create_video_task(seedance("another body"), idempotency_key=key)
    assert caught.value.code == "idempotency_conflict" and not caught.value.retryable
    assert sim.posts() == 2


# -- cancelled tasks and the codes EvoLink's clients disagree on ----------------------------------


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        ("cancelled", None, False),
        ("cancelled", "request_cancelled", False),
        ("cancelled", "service_error", False),
        ("failed", "request_cancelled", False),
        ("failed", "unknown_error", True),
        ("failed", "generation_failed_no_content", True),
        ("failed", None, True),
    ],
)
def test_cancelled_is_final_and_the_disputed_codes_are_retried(
    status: str, code: str | None, retryable: bool
) -> None:
    assert EvolinkTaskError("task-unified-1-abcdefgh", status, code, None).retryable is retryable


def test_trigger_reports_a_cancelled_task_as_final(sim: SimulatorControl, hook: EvolinkHook) -> None:
    task = hook.create_video_task(seedance("stop [sim:cancel=none]"))
    events = run_trigger(EvolinkTaskTrigger(task["id"], poll_interval=0.2, end_time=time.time() + 60))
    assert [event["status"] for event in events] == ["failed"]
    assert events[0]["task"]["status"] == "cancelled" and "error" not in events[0]["task"]
    with pytest.raises(EvolinkTaskError) as caught:
        task_from_event(events[0])
    assert caught.value.status == "cancelled" and not caught.value.retryable


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("marker", ["cancel_none", "cancel_request_cancelled", "fail_request_cancelled"])
def test_a_cancelled_task_fails_the_airflow_task_without_retries(sim: SimulatorControl, marker: str) -> None:
    state, tasks = run_dag(f"evolink_cancelled_{marker}")
    assert state == "failed"
    assert tasks["generate"] == ("failed", 1)  # AirflowFailException: retries=2 left unused
    assert sim.stats()["tasks_created"] == 1


@pytest.mark.usefixtures("airflow_db")
def test_a_failure_without_error_object_is_resubmitted(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_bare_failure_is_retried")
    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2)
    assert sim.stats()["tasks_created"] == 2


@pytest.mark.usefixtures("airflow_db")
def test_a_channel_task_code_is_resubmitted_by_the_retry(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_channel_busy")
    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2)


@pytest.mark.usefixtures("airflow_db")
def test_daily_quota_then_success_through_an_airflow_retry(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_daily_quota_then_success")
    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2)
    assert sim.stats()["tasks_created"] == 1


@pytest.mark.usefixtures("airflow_db")
def test_insufficient_quota_fails_at_once(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_insufficient_quota")
    assert state == "failed"
    assert tasks["generate"] == ("failed", 1)


@pytest.mark.usefixtures("airflow_db")
def test_paid_outcome_unknown_across_an_airflow_retry_bills_once(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_paid_outcome_unknown")
    assert state == "success", tasks
    assert tasks["generate"] == ("success", 2)
    stats = sim.stats()
    assert stats["tasks_created"] == 1
    ((_key, posts),) = stats["posts_by_idempotency_key"].items()  # one key over both tries
    assert posts == 7  # five 409s, the retry's sixth 409, then the replay
    assert stats["idempotent_replays"] == 1


# -- where results are ----------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["result_data_list", "result_data_object"])
def test_videos_in_result_data_are_collected_and_stored(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path, output: str
) -> None:
    task = wait_for_end(hook, hook.create_video_task(seedance(f"elsewhere [sim:output={output}]"))["id"])
    assert task["status"] == "completed" and task["results"] == []
    urls = result_urls(task)
    assert urls == [f"{sim.base_url}/media/{task['id']}/video.mp4"]
    assert decide_after_poll(task, now=1.0, started_at=0.0, deadline=None).outcome is Outcome.SUCCESS
    (stored,) = store_results(hook, task, str(tmp_path))
    assert Path(stored).read_bytes()[4:8] == b"ftyp"


def test_result_urls_collect_both_places_once() -> None:
    task = {
        "results": ["https://cdn.example.com/a.mp4"],
        "result_data": [
            {"video_url": "https://cdn.example.com/b.mp4"},
            {"video_url": "https://cdn.example.com/a.mp4"},
        ],
    }
    assert result_urls(task) == ["https://cdn.example.com/a.mp4", "https://cdn.example.com/b.mp4"]


def test_a_completed_task_without_any_output_is_an_error(sim: SimulatorControl, hook: EvolinkHook) -> None:
    task = wait_for_end(hook, hook.create_video_task(seedance("empty [sim:output=none]"))["id"])
    assert task["status"] == "completed"
    decision = decide_after_poll(task, now=1.0, started_at=0.0, deadline=None)
    assert decision.outcome is Outcome.FAILED


@pytest.mark.usefixtures("airflow_db")
@pytest.mark.parametrize("mode", ["sync", "deferrable"])
def test_operator_stores_a_video_listed_in_result_data(sim: SimulatorControl, mode: str) -> None:
    state, tasks = run_dag(f"evolink_result_data_video_{mode}")
    assert state == "success", tasks


@pytest.mark.usefixtures("airflow_db")
def test_operator_fails_a_completed_task_without_output(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_completed_without_output")
    assert state == "failed"
    assert tasks["generate"][0] == "failed"


# -- Files API and credits ------------------------------------------------------------------------


def test_upload_answer_has_the_documented_fields(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    png = tmp_path / "dot.png"
    png.write_bytes(_tiny_png())
    with png.open("rb") as stream:
        data = hook.upload_file(stream, "dot.png", "image/png")
    assert {
        "file_id",
        "file_url",
        "download_url",
        "file_size",
        "mime_type",
        "original_name",
        "upload_path",
    } <= set(data)
    assert data["original_name"] == "dot.png" and data["mime_type"] == "image/png"
    for stamp in ("upload_time", "expires_at"):
        assert isinstance(data[stamp], str) and time.strptime(data[stamp], "%Y-%m-%dT%H:%M:%SZ")
    quota = hook.get_files_quota()
    assert set(quota) == {
        "user_group",
        "used_files",
        "max_files",
        "remain_files",
        "is_custom",
        "quota_reason",
    }
    assert quota["used_files"] == 1


def test_a_video_upload_is_refused_and_not_retried(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path
) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    with clip.open("rb") as stream, pytest.raises(EvolinkRefusedError) as caught:
        hook.upload_file(stream, "clip.mp4", "video/mp4")
    assert caught.value.code == "400" and "images" in caught.value.api_message
    assert not caught.value.retryable
    assert sim.stats()["requests"]["POST /api/v1/files/upload/stream"] == 1


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_files_api_success_false_with_a_transient_code_is_retried(
    sim: SimulatorControl, hook: EvolinkHook, tmp_path: Path, status: int
) -> None:
    """The Files API's ``code`` is an HTTP status: 429 and 5xx are transient (EvoLink's CLI and MCP)."""
    sim.add_faults(
        {"path_prefix": "/api/v1/files/quota", "kind": "refused", "status": status, "count": 1},
        {"path_prefix": "/api/v1/files/upload", "kind": "refused", "status": status, "count": 1},
    )
    assert hook.get_files_quota()["max_files"] > 0
    image = tmp_path / "tiny.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with image.open("rb") as stream:
        transient = status in (429, 503)  # the upload row of the retry policy: what cannot have stored it
        if transient:
            assert hook.upload_file(stream, "tiny.png", "image/png")["file_url"]
        else:
            with pytest.raises(EvolinkServerError) as caught:
                hook.upload_file(stream, "tiny.png", "image/png")
            assert caught.value.retryable and caught.value.code == str(status)
    requests_made = sim.stats()["requests"]
    assert requests_made["GET /api/v1/files/quota"] == 2
    assert requests_made["POST /api/v1/files/upload/stream"] == (2 if transient else 1)


def test_a_files_api_success_false_with_another_code_is_final(
    sim: SimulatorControl, hook: EvolinkHook
) -> None:
    sim.add_faults({"path_prefix": "/api/v1/files/quota", "kind": "refused", "status": 403})
    with pytest.raises(EvolinkRefusedError) as caught:
        hook.get_files_quota()
    assert caught.value.code == "403" and not caught.value.retryable
    assert sim.stats()["requests"]["GET /api/v1/files/quota"] == 1


def test_credits_shape_and_a_success_false_refusal(sim: SimulatorControl, hook: EvolinkHook) -> None:
    answer = hook.get_credits()
    assert set(answer) == {"data", "message"}
    assert set(answer["data"]["user"]) == {"remaining_credits", "used_credits"}
    assert set(answer["data"]["token"]) == {"remaining_credits", "used_credits", "unlimited_credits"}
    sim.add_faults({"method": "GET", "path_prefix": "/v1/credits", "kind": "refused", "status": 503})
    with pytest.raises(EvolinkRefusedError) as caught:
        EvolinkHook().get_credits()
    assert caught.value.code == "503" and not caught.value.retryable
    ok, message = EvolinkHook().test_connection()
    assert not ok and "503" in message
    assert sim.stats()["requests"]["GET /v1/credits"] == 3  # one each: a refusal is not retried


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        ("seedance-2.0-reference-to-video", {"prompt": "@video1", "video_urls": ["/tmp/clip.mp4"]}),
        (
            "seedance-2.0-reference-to-video",
            {
                "prompt": "@image1 @audio1",
                "image_urls": ["https://x/a.png"],
                "audio_urls": ["s3://bucket/voice.wav"],
            },
        ),
        ("happyhorse-1.0-video-edit", {"prompt": "edit", "video_urls": ["/tmp/clip.mov"]}),
        ("happyhorse-1.0-video-edit", {"prompt": "edit", "video": "file:///tmp/clip.mp4"}),
        ("sora-character", {"video_url": "/tmp/clip.mp4"}),
    ],
    ids=["seedance-video", "seedance-audio", "edit-video_urls", "edit-video", "sora"],
)
def test_local_video_or_audio_references_fail_before_any_request(model: str, fields: dict[str, Any]) -> None:
    with pytest.raises(EvolinkValidationError, match=r"Files API takes images only.*cannot be uploaded"):
        validate_request(model, fields, allow_local_media=True)


def test_a_local_non_image_in_image_urls_is_refused() -> None:
    with pytest.raises(EvolinkValidationError, match="a local image ending in"):
        validate_request(
            "happyhorse-1.0-reference-to-video",
            {"prompt": "character1", "image_urls": ["/tmp/x.mp4"]},
            allow_local_media=True,
        )


@pytest.mark.usefixtures("airflow_db")
def test_operator_with_a_local_video_fails_without_any_request(sim: SimulatorControl) -> None:
    state, tasks = run_dag("evolink_local_video_reference")
    assert state == "failed"
    assert tasks["generate"] == ("failed", 1)
    assert sum(sim.stats()["requests"].values()) == 0


# -- request limits the schemas missed: the client and the simulator agree ------------------------

LIMIT_CASES = [
    ("seedance-2.0-text-to-video", {"prompt": "p", "model_params": {"web_search": True}}, True),
    ("seedance-2.0-fast-text-to-video", {"prompt": "p", "model_params": {"web_search": True}}, True),
    ("seedance-2.0-mini-text-to-video", {"prompt": "p", "model_params": {"web_search": True}}, False),
    (
        "seedance-2.0-image-to-video",
        {"prompt": "p", "image_urls": ["https://x/a.png"], "model_params": {}},
        False,
    ),
    ("seedance-2.0-reference-to-video", {"prompt": "@video1", "video_urls": ["https://x/v.mov"]}, True),
    ("seedance-2.0-reference-to-video", {"prompt": "@video1", "video_urls": ["https://x/v.webm"]}, False),
    (
        "seedance-2.0-reference-to-video",
        {"prompt": "@image1 @audio1", "image_urls": ["https://x/a.png"], "audio_urls": ["https://x/a.mp3"]},
        True,
    ),
    (
        "seedance-2.0-reference-to-video",
        {"prompt": "@image1 @audio1", "image_urls": ["https://x/a.png"], "audio_urls": ["https://x/a.ogg"]},
        False,
    ),
    (
        "seedance-2.0-reference-to-video",
        {"prompt": "@image1", "image_urls": ["https://x/a.png"], "model_params": {}},
        False,
    ),
    ("happyhorse-1.0-video-edit", {"prompt": "p", "video_url": "https://x/v.mp4"}, True),
    ("happyhorse-1.0-video-edit", {"prompt": "p", "video": "https://x/v.mov"}, True),
    ("happyhorse-1.0-video-edit", {"prompt": "p", "video": "https://x/v.webm"}, False),
    (
        "happyhorse-1.0-video-edit",
        {"prompt": "p", "video_url": "https://x/v.mp4", "video_urls": ["https://x/v.mp4"]},
        False,
    ),
    ("happyhorse-1.0-video-edit", {"prompt": "p"}, False),
]


@pytest.mark.parametrize(("model", "fields", "accepted"), LIMIT_CASES)
def test_request_limits_agree_with_the_simulator(
    sim: SimulatorControl, model: str, fields: dict[str, Any], accepted: bool
) -> None:
    try:
        validate_request(model, fields)
        client_accepts = True
    except EvolinkValidationError:
        client_accepts = False
    answer = requests.post(
        f"{sim.base_url}/v1/videos/generations",
        json={"model": model, **fields},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        timeout=5,
    )
    assert (client_accepts, answer.status_code == 200) == (accepted, accepted), answer.text


# -- task_info.estimated_time: total or time left, the schedule works under both -------------------


def _poll_until_done(run_time: float, estimate_at: Any) -> tuple[int, float]:
    now, polls = 0.0, 0
    while True:
        if now >= run_time:
            body = {"id": "t", "status": "completed", "results": ["u"]}
        else:
            body = {
                "id": "t",
                "status": "pending",
                "progress": 0,
                "task_info": {"estimated_time": estimate_at(now)},
            }
        decision = decide_after_poll(body, now=now, started_at=0.0, deadline=None)
        if decision.outcome is not Outcome.WAIT:
            return polls, now - run_time
        now += decision.delay
        polls += 1


@pytest.mark.parametrize("run_time", [60.0, 600.0, 2400.0])
@pytest.mark.parametrize("reading", ["total", "time_left"])
def test_estimated_time_schedule_works_under_either_reading(run_time: float, reading: str) -> None:
    def estimate_at(now: float) -> float:
        return run_time if reading == "total" else max(1.0, run_time - now)

    polls, lateness = _poll_until_done(run_time, estimate_at)
    assert lateness <= max(5.0, 0.05 * run_time) * 1.0001  # never late beyond the tolerance
    assert polls <= 30  # and far fewer polls than a fixed 5 s interval


# -- error messages name the connection, once ------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_host_reads_once_with_the_connection_id(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    set_connection(
        monkeypatch,
        "evolink_unreachable",
        password="sk-unreachable-secret-1",
        host=f"http://127.0.0.1:{port}",
        extra={"max_retries": 1, "backoff_base": 0.01, "backoff_max": 0.02},
    )
    hook = EvolinkHook("evolink_unreachable")
    with pytest.raises(EvolinkTransportError) as caught:
        hook.create_video_task(dict(SEEDANCE), idempotency_key="evl-test-unreachable-01")
    expected = (
        f"EvoLink connection 'evolink_unreachable' (http://127.0.0.1:{port}): "
        "POST /v1/videos/generations: connection refused"
    )
    assert str(caught.value) == expected

    async def read() -> None:
        try:
            await EvolinkHook("evolink_unreachable").aget_task("task-unified-1700000000-abcdefgh")
        finally:
            await aclose_async_clients()

    with pytest.raises(EvolinkTransportError) as async_caught:
        asyncio.run(read())
    assert str(async_caught.value) == expected.replace(
        "POST /v1/videos/generations", "GET /v1/tasks/task-unified-1700000000-abcdefgh"
    )
    assert "sk-unreachable-secret-1" not in str(caught.value) + str(async_caught.value)


def test_api_errors_name_the_connection_once(sim: SimulatorControl, hook: EvolinkHook) -> None:
    with pytest.raises(EvolinkBadRequestError) as caught:
        hook.create_video_task({**SEEDANCE, "duration": 99})
    message = str(caught.value)
    where = f"EvoLink connection 'evolink_default' ({sim.base_url})"
    assert message.startswith(f"{where}: POST /v1/videos/generations answered HTTP 400")
    assert message.count("EvoLink") == 1


def _tiny_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )


def _credits(user: dict[str, Any], token: dict[str, Any] | None) -> dict[str, Any]:
    data: dict[str, Any] = {"user": user}
    if token is not None:
        data["token"] = token
    return {"data": data, "message": "success"}


@pytest.mark.parametrize(
    ("answer", "spendable"),
    [
        (_credits({"remaining_credits": 80}, {"remaining_credits": 0, "unlimited_credits": True}), 80),
        (_credits({"remaining_credits": 80}, {"remaining_credits": 5, "unlimited_credits": False}), 5),
        (_credits({"remaining_credits": 3}, {"remaining_credits": 50, "unlimited_credits": False}), 3),
        (_credits({"remaining_credits": 0}, {"remaining_credits": 9, "unlimited_credits": True}), 0),
        # The reading corrected on 2026-12-03: unlimited_credits under user says nothing about the key.
        (_credits({"remaining_credits": 7, "unlimited_credits": True}, {"remaining_credits": 2}), 2),
    ],
    ids=["key-unlimited", "key-quota-binds", "account-binds", "no-account-balance", "user-flag-ignored"],
)
def test_what_a_key_can_spend_is_the_account_and_the_keys_quota(
    answer: dict[str, Any], spendable: float
) -> None:
    from evolink_provider.answers import read_credits

    assert read_credits(answer).spendable == spendable


@pytest.mark.parametrize(
    "answer",
    [
        _credits({"remaining_credits": 80}, None),
        _credits({"remaining_credits": 80}, {"unlimited_credits": False}),
        _credits({"unlimited_credits": True}, {"unlimited_credits": True}),
    ],
    ids=["no-token", "limited-key-without-remaining", "no-account-balance"],
)
def test_a_credits_answer_that_does_not_say_what_the_key_can_spend_is_a_bad_answer(
    answer: dict[str, Any],
) -> None:
    from evolink_provider.answers import read_credits

    with pytest.raises(EvolinkBadAnswerError, match="credits answer"):
        read_credits(answer)
