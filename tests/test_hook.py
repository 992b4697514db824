"""EvolinkHook against the simulator over loopback: real HTTP, real retries, real error bodies."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import requests

from evolink_provider.exceptions import (
    EvolinkAuthenticationError,
    EvolinkBadRequestError,
    EvolinkConfigurationError,
    EvolinkConflictError,
    EvolinkInsufficientCreditsError,
    EvolinkNotFoundError,
    EvolinkPermissionError,
    EvolinkRateLimitError,
    EvolinkServerError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
)
from evolink_provider.hooks.connection import DEFAULT_BASE_URL, USER_AGENT, resolve_base_url
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.retry import parse_retry_after
from evolink_provider.hooks.transport import aclose_async_clients
from tests.conftest import CONNECTION_EXTRA, SIMULATOR_PORT, SIMULATOR_URL, TEST_API_KEY, SimulatorControl

SEEDANCE = {"model": "seedance-2.0-fast-text-to-video", "prompt": "a lighthouse at dawn", "duration": 4}
TASKS = "/v1/tasks/"
CREATE = "/v1/videos/generations"


def wait_until_done(hook: EvolinkHook, task_id: str, limit: float = 30) -> dict[str, Any]:
    deadline = time.time() + limit
    while time.time() < deadline:
        task = hook.get_task(task_id)
        if task["status"] in ("completed", "failed", "cancelled"):
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish")


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "evolink", **fields}))


@pytest.fixture
def hook() -> EvolinkHook:
    return EvolinkHook()


def test_submit_poll_and_download_a_real_video(sim: SimulatorControl, hook: EvolinkHook) -> None:
    created = hook.create_video_task(dict(SEEDANCE), idempotency_key="evl-test-roundtrip-000001")
    assert created["id"].startswith("task-unified-")
    assert created["status"] == "pending"
    assert created["usage"]["credits_reserved"] > 0

    task = wait_until_done(hook, created["id"])

    assert task["status"] == "completed", task
    video = requests.get(task["results"][0], timeout=10)
    assert video.status_code == 200
    assert video.headers["Content-Type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"  # an ISO media file, not a placeholder


def test_credits_and_test_connection(sim: SimulatorControl, hook: EvolinkHook) -> None:
    remaining = hook.get_credits()["data"]["user"]["remaining_credits"]
    ok, message = hook.test_connection()
    assert ok
    assert message.endswith(
        f"remaining credits: {remaining:g} (account balance {remaining:g}, the key has no quota of its own)"
    )


def test_test_connection_reports_a_bad_key(sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch) -> None:
    set_connection(monkeypatch, "evolink_badkey", password="sk-wrong-key-123456", host=sim.base_url)
    ok, message = EvolinkHook("evolink_badkey").test_connection()
    assert not ok
    assert "401" in message
    assert "sk-wrong-key-123456" not in message


def test_missing_key_fails_before_any_http_call(
    sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_nokey", host=sim.base_url)
    with pytest.raises(EvolinkConfigurationError, match="no EvoLink API key"):
        EvolinkHook("evolink_nokey").create_video_task(dict(SEEDANCE))
    assert sum(sim.stats()["requests"].values()) == 0


@pytest.mark.parametrize(
    "uri",
    [
        f"evolink://:{TEST_API_KEY}@127.0.0.1:{SIMULATOR_PORT}/http",
        f"evolink://:{TEST_API_KEY}@http%3A%2F%2F127.0.0.1%3A{SIMULATOR_PORT}",
    ],
    ids=["scheme-in-path", "url-encoded-host"],
)
def test_connection_from_uri_env_var(
    sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch, uri: str
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_EVOLINK_URI", uri)
    hook = EvolinkHook("evolink_uri")
    assert hook.settings.base_url == sim.base_url
    # The simulator's own balance, as it reports it to its test controls: the hook read that account.
    expected = sim.stats()["credits"]["remaining"]
    assert hook.get_credits()["data"]["user"]["remaining_credits"] == expected


def test_base_url_resolution() -> None:
    assert resolve_base_url(None) == DEFAULT_BASE_URL
    assert resolve_base_url("") == DEFAULT_BASE_URL
    assert resolve_base_url("api.evolink.ai") == "https://api.evolink.ai"
    assert resolve_base_url("http://127.0.0.1:8099/") == "http://127.0.0.1:8099"
    assert resolve_base_url("127.0.0.1", "http", 8099) == "http://127.0.0.1:8099"
    with pytest.raises(EvolinkConfigurationError):
        resolve_base_url("ftp://example.com")


def test_bad_request_is_typed_and_not_retried(sim: SimulatorControl, hook: EvolinkHook) -> None:
    with pytest.raises(EvolinkBadRequestError) as caught:
        hook.create_video_task({**SEEDANCE, "duration": 99})
    error = caught.value
    assert error.status_code == 400
    assert error.code == "invalid_request"
    assert not error.retryable
    assert error.request_id and error.request_id in str(error)
    assert sim.posts() == 1


def test_wrong_key_is_an_authentication_error(sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch) -> None:
    set_connection(monkeypatch, "evolink_wrong", password="sk-not-the-key-0000", host=sim.base_url)
    with pytest.raises(EvolinkAuthenticationError) as caught:
        EvolinkHook("evolink_wrong").get_task("task-unified-1700000000-abcdefgh")
    assert caught.value.code == "unauthorized"
    assert "sk-not-the-key-0000" not in str(caught.value)
    with pytest.raises(EvolinkAuthenticationError) as caught:
        EvolinkHook("evolink_wrong").get_credits()
    assert caught.value.code == "401"  # GET /v1/credits errors carry an integer code
    assert "sk-not-the-key-0000" not in str(caught.value)


def test_unknown_task_is_not_found(sim: SimulatorControl, hook: EvolinkHook) -> None:
    with pytest.raises(EvolinkNotFoundError) as caught:
        hook.get_task("task-unified-1700000000-abcdefgh")
    assert caught.value.code == "task_not_found"
    assert sim.stats()["requests"].get("GET /v1/tasks", 0) == 1  # a 404 is final


def test_malformed_task_id_is_refused_locally(sim: SimulatorControl, hook: EvolinkHook) -> None:
    with pytest.raises(EvolinkConfigurationError):
        hook.get_task("../v1/credits")
    assert sum(sim.stats()["requests"].values()) == 0


def test_other_keys_task_is_forbidden_and_no_credits_is_402(monkeypatch: pytest.MonkeyPatch) -> None:
    from evolink_provider.simulator import EvolinkSimulator

    with EvolinkSimulator(
        api_key="sk-sim-owner-000000", extra_api_keys=["sk-sim-other-000000"], credits=0
    ) as own:
        set_connection(monkeypatch, "evolink_owner", password="sk-sim-owner-000000", host=own.base_url)
        with pytest.raises(EvolinkInsufficientCreditsError) as caught:
            EvolinkHook("evolink_owner").create_video_task(dict(SEEDANCE))
        assert caught.value.status_code == 402
        assert not caught.value.retryable


def test_task_of_another_key_is_permission_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    from evolink_provider.simulator import EvolinkSimulator

    with EvolinkSimulator(api_key="sk-sim-owner-000000", extra_api_keys=["sk-sim-other-000000"]) as own:
        set_connection(monkeypatch, "evolink_owner", password="sk-sim-owner-000000", host=own.base_url)
        set_connection(monkeypatch, "evolink_other", password="sk-sim-other-000000", host=own.base_url)
        task = EvolinkHook("evolink_owner").create_video_task(dict(SEEDANCE))
        with pytest.raises(EvolinkPermissionError):
            EvolinkHook("evolink_other").get_task(task["id"])


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 429, "retry_after": "0.1"},
        {"kind": "status", "status": 429},
        {"kind": "status", "status": 500},
        {"kind": "status", "status": 502},
        {"kind": "status", "status": 503},
        {"kind": "status", "status": 504},
        {"kind": "reset"},
        {"kind": "garbled"},
        {"kind": "truncated"},
        {"kind": "timeout", "delay": 3},
    ],
    ids=lambda f: f"{f['kind']}-{f.get('status', '')}{'-retry-after' if 'retry_after' in f else ''}",
)
def test_get_is_retried_through_transient_faults(
    sim: SimulatorControl, hook: EvolinkHook, fault: dict[str, Any]
) -> None:
    task = hook.create_video_task(dict(SEEDANCE))
    sim.add_faults({"method": "GET", "path_prefix": TASKS, "count": 2, **fault})

    assert hook.get_task(task["id"])["id"] == task["id"]

    assert sim.stats()["requests"]["GET /v1/tasks"] == 3


def test_retry_after_is_honoured(sim: SimulatorControl, hook: EvolinkHook) -> None:
    task = hook.create_video_task(dict(SEEDANCE))
    sim.add_faults(
        {
            "method": "GET",
            "path_prefix": TASKS,
            "kind": "status",
            "status": 429,
            "retry_after": "1",
            "count": 1,
        }
    )
    started = time.monotonic()
    hook.get_task(task["id"])
    assert time.monotonic() - started >= 1.0


def test_permanent_fault_ends_after_bounded_attempts(sim: SimulatorControl, hook: EvolinkHook) -> None:
    task = hook.create_video_task(dict(SEEDANCE))
    sim.add_faults({"method": "GET", "path_prefix": TASKS, "kind": "status", "status": 503})
    with pytest.raises(EvolinkServerError) as caught:
        hook.get_task(task["id"])
    assert caught.value.status_code == 503
    assert sim.stats()["requests"]["GET /v1/tasks"] == CONNECTION_EXTRA["max_retries"] + 1


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "status", "status": 429, "retry_after": "0.1"},
        {"kind": "status", "status": 503},
        {"kind": "reset"},
        {"kind": "reset", "after_processing": True},
        {"kind": "timeout", "delay": 3, "after_processing": True},
    ],
    ids=lambda f: (
        f"{f['kind']}-{f.get('status', '')}{'-after-processing' if f.get('after_processing') else ''}"
    ),
)
def test_post_is_retried_with_the_same_key_and_creates_one_task(
    sim: SimulatorControl, hook: EvolinkHook, fault: dict[str, Any]
) -> None:
    sim.add_faults({"method": "POST", "path_prefix": CREATE, "count": 1, **fault})
    key = "evl-test-post-retry-0000001"

    task = hook.create_video_task(dict(SEEDANCE), idempotency_key=key)

    stats = sim.stats()
    assert stats["tasks_created"] == 1
    assert stats["posts_by_idempotency_key"] == {key: 2}
    assert stats["tasks_by_idempotency_key"][key] == [task["id"]]


def test_post_with_unknown_outcome_names_the_key(
    sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every attempt's answer comes after its 0.5 s read timeout, and after the task was created.
    extra = {**CONNECTION_EXTRA, "read_timeout": 0.5}
    set_connection(
        monkeypatch, "evolink_slow_answers", password=TEST_API_KEY, host=SIMULATOR_URL, extra=extra
    )
    sim.add_faults(
        {"method": "POST", "path_prefix": CREATE, "kind": "timeout", "delay": 1, "after_processing": True}
    )
    key = "evl-test-post-unknown-0000001"
    with pytest.raises(EvolinkSubmissionUnknownError) as caught:
        EvolinkHook("evolink_slow_answers").create_video_task(dict(SEEDANCE), idempotency_key=key)
    assert key in str(caught.value)
    stats = sim.stats()
    assert stats["tasks_created"] == 1  # every retry replayed the one task
    assert set(stats["posts_by_idempotency_key"]) == {key}


def test_same_key_different_body_is_refused(sim: SimulatorControl, hook: EvolinkHook) -> None:
    key = "evl-test-conflict-00000001"
    hook.create_video_task(dict(SEEDANCE), idempotency_key=key)
    with pytest.raises(EvolinkConflictError) as caught:
        hook.create_video_task({**SEEDANCE, "prompt": "something else"}, idempotency_key=key)
    assert caught.value.code == "idempotency_conflict"
    assert caught.value.retryable is False
    stats = sim.stats()
    assert stats["posts_by_idempotency_key"] == {key: 2}  # the conflict was not retried either
    assert stats["tasks_created"] == 1


def test_async_polls_share_one_connection_pool(sim: SimulatorControl, hook: EvolinkHook) -> None:
    tasks = [hook.create_video_task(dict(SEEDANCE)) for _ in range(5)]
    before = sim.stats()["connections_opened"]

    async def poll_all() -> list[dict[str, Any]]:
        try:
            results = []
            for _ in range(4):  # several rounds of concurrent polls
                results = await asyncio.gather(*(EvolinkHook().aget_task(t["id"]) for t in tasks))
            return results
        finally:
            await aclose_async_clients()

    answers = asyncio.run(poll_all())

    assert [a["id"] for a in answers] == [t["id"] for t in tasks]
    opened = sim.stats()["connections_opened"] - before - 1  # the stats request's own connection
    assert opened <= len(tasks), f"{opened} connections for 20 polls: the pool is not reused"


def test_async_get_retries_transient_faults(sim: SimulatorControl, hook: EvolinkHook) -> None:
    task = hook.create_video_task(dict(SEEDANCE))
    sim.add_faults({"method": "GET", "path_prefix": TASKS, "kind": "status", "status": 502, "count": 2})

    async def poll() -> dict[str, Any]:
        try:
            return await EvolinkHook().aget_task(task["id"])
        finally:
            await aclose_async_clients()

    assert asyncio.run(poll())["id"] == task["id"]
    assert sim.stats()["requests"]["GET /v1/tasks"] == 3


def test_key_never_shows_in_reprs_or_errors(sim: SimulatorControl, hook: EvolinkHook) -> None:
    settings = hook.settings
    assert TEST_API_KEY not in repr(hook)
    assert TEST_API_KEY not in repr(settings)
    assert TEST_API_KEY not in str(settings.api_key)
    sim.add_faults({"method": "GET", "path_prefix": "/v1/credits", "kind": "status", "status": 500})
    with pytest.raises(EvolinkServerError) as caught:
        hook.get_credits()
    assert TEST_API_KEY not in str(caught.value)
    assert TEST_API_KEY not in repr(caught.value)


def test_secrets_masker_redacts_the_key_once_the_hook_has_read_it(hook: EvolinkHook) -> None:
    from airflow.sdk.log import redact

    hook.settings  # noqa: B018 - reading the connection registers the key with the masker
    assert TEST_API_KEY not in str(redact(f"Authorization: Bearer {TEST_API_KEY}"))


def test_rate_limit_error_carries_retry_after(sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch) -> None:
    set_connection(
        monkeypatch, "evolink_noretry", password=TEST_API_KEY, host=sim.base_url, extra={"max_retries": 0}
    )
    sim.add_faults(
        {"method": "GET", "path_prefix": "/v1/credits", "kind": "status", "status": 429, "retry_after": "7"}
    )
    with pytest.raises(EvolinkRateLimitError) as caught:
        EvolinkHook("evolink_noretry").get_credits()
    assert caught.value.retry_after == pytest.approx(7)
    assert sim.stats()["requests"]["GET /v1/credits"] == 1


def test_retry_after_parsing() -> None:
    now = time.time()
    http_date = format_datetime(
        datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=30), usegmt=True
    )
    assert parse_retry_after("12") == 12
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(http_date, now=now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


class _HeaderRecorder(BaseHTTPRequestHandler):
    seen: dict[str, str] = {}

    def do_GET(self) -> None:
        _HeaderRecorder.seen = dict(self.headers)
        body = b'{"data": {"user": {"remaining_credits": 1}}}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_requests_carry_user_agent_and_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    server = HTTPServer(("127.0.0.1", 0), _HeaderRecorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        set_connection(
            monkeypatch,
            "evolink_headers",
            password="sk-header-check-1",
            host=f"http://127.0.0.1:{server.server_port}",
        )
        EvolinkHook("evolink_headers").get_credits()
    finally:
        server.shutdown()
    assert _HeaderRecorder.seen["User-Agent"] == USER_AGENT
    assert _HeaderRecorder.seen["Authorization"] == "Bearer sk-header-check-1"


def test_refused_connection_is_retried_and_reported_as_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens on the port: every attempt is refused, so no task can exist and the key is not named
    as "look this up" (that is only for outcomes that may have created a task)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    set_connection(
        monkeypatch,
        "evolink_refused",
        password=TEST_API_KEY,
        host=f"http://127.0.0.1:{closed_port}",
        extra={"max_retries": 2, "backoff_base": 0.01, "backoff_max": 0.02},
    )
    with pytest.raises(EvolinkTransportError) as caught:
        EvolinkHook("evolink_refused").create_video_task(
            dict(SEEDANCE), idempotency_key="evl-test-refused-000001"
        )
    assert not caught.value.request_sent
    assert not isinstance(caught.value, EvolinkSubmissionUnknownError)


def test_https_simulator_and_certificate_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulator's HTTPS mode (used to measure connection reuse as real clients pay for it): the hook
    verifies certificates, so it fails until told to trust the simulator's, then works."""
    from evolink_provider.simulator import EvolinkSimulator

    with EvolinkSimulator(api_key=TEST_API_KEY, tls=True) as tls_sim:
        assert tls_sim.base_url.startswith("https://127.0.0.1:")
        assert tls_sim.certificate is not None
        set_connection(
            monkeypatch,
            "evolink_tls",
            password=TEST_API_KEY,
            host=tls_sim.base_url,
            extra={"max_retries": 0},
        )
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        with pytest.raises(EvolinkTransportError, match="CERTIFICATE_VERIFY_FAILED"):
            EvolinkHook("evolink_tls").get_credits()

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_sim.certificate))
        hook = EvolinkHook("evolink_tls")
        task = hook.create_video_task(dict(SEEDANCE))
        assert hook.get_task(task["id"])["id"] == task["id"]
        hook.close()
        assert tls_sim.stats()["connections_opened"] == 2  # the refused handshake, then one kept-alive


@pytest.mark.parametrize("name", ["localhost", "sim.example"])
def test_result_downloads_go_to_the_checked_address_and_verify_the_host_name(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """A result is fetched from the address its check returned, and TLS verifies the URL's host name there
    (not the address): the simulator's certificate names localhost and 127.0.0.1, not sim.example."""
    import socket

    from evolink_provider.simulator import EvolinkSimulator

    real_getaddrinfo = socket.getaddrinfo

    def resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host in ("localhost", "sim.example"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", args[0] if args else 0))]
        return real_getaddrinfo(host, *args, **kwargs)

    with EvolinkSimulator(api_key=TEST_API_KEY, tls=True, task_seconds=0.2) as tls_sim:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_sim.certificate))
        set_connection(monkeypatch, "evolink_tls", password=TEST_API_KEY, host=tls_sim.base_url)
        task = EvolinkHook("evolink_tls").create_video_task(dict(SEEDANCE))
        while task["status"] != "completed":
            time.sleep(0.1)
            task = EvolinkHook("evolink_tls").get_task(task["id"])
        # The connection's own host may be private: the simulator by that name.
        named = tls_sim.base_url.replace("127.0.0.1", name)
        # Small backoffs: the refused handshake is retried as a transport error.
        set_connection(
            monkeypatch, "evolink_named", password=TEST_API_KEY, host=named, extra=CONNECTION_EXTRA
        )
        hook = EvolinkHook("evolink_named")
        monkeypatch.setattr(socket, "getaddrinfo", resolve)
        url = task["results"][0].replace("127.0.0.1", name)
        if name == "localhost":
            with hook.open_result(url) as result:
                assert b"ftyp" in b"".join(result.chunks)[:64]
        else:
            with pytest.raises(EvolinkTransportError, match="SSLError"), hook.open_result(url):
                pass


def test_an_upload_retries_within_a_bounded_time(
    sim: SimulatorControl, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """An upload without a caller's deadline gets one read timeout per attempt: a Retry-After that would
    wait past it ends the upload with its error instead of sleeping (it once retried with no deadline)."""
    extra = {"read_timeout": 1, "max_retries": 2, "retry_after_max": 10}
    set_connection(monkeypatch, "evolink_upload", password=TEST_API_KEY, host=sim.base_url, extra=extra)
    upload_path = "/api/v1/files/upload/stream"
    sim.add_faults(
        {"method": "POST", "path_prefix": upload_path, "kind": "status", "status": 503, "retry_after": "10"}
    )
    picture = tmp_path / "dot.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    started = time.monotonic()
    with picture.open("rb") as stream, pytest.raises(EvolinkServerError):
        EvolinkHook("evolink_upload").upload_file(stream, "dot.png", "image/png")
    assert time.monotonic() - started < 3
    assert sim.stats()["requests"][f"POST {upload_path}"] == 1
