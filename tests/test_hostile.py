"""The trust boundaries (issue 10) against a hostile HTTP server on loopback.

The server below answers whatever each test sets; the connection ``evolink_hostile`` points at it, so
the provider treats it exactly as it would treat EvoLink. Every test asserts the safe outcome: the right
``EvolinkError``, no file outside the output folder, no HTTP call for a refused input.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evolink_provider.answers import (
    JSON_GROWTH_PER_BYTE,
    MAX_ANSWER_BYTES,
    MAX_TASK_BYTES,
    checked_task,
    created_at,
    loads_strict,
)
from evolink_provider.exceptions import (
    EvolinkBadAnswerError,
    EvolinkConfigurationError,
    EvolinkError,
    EvolinkInputRefusedError,
    EvolinkRateLimitError,
    EvolinkSubmissionUnknownError,
    EvolinkWaitTimeoutError,
)
from evolink_provider.field_rules import MediaRef
from evolink_provider.hooks.downloads import check_download_url
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import aclose_async_clients
from evolink_provider.storage import EvolinkStorageError, store_results
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from evolink_provider.uploads import CheckedStream, upload_local_media

TASK_ID = "task-unified-1767225600-abcd1234"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00\x00\x01\x90" * 2 + b"\x08\x02\x00\x00\x00"
MP4 = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 4000
HTML = b"<!doctype html><html><body>Sign in to continue</body></html>" * 10

Respond = Callable[[BaseHTTPRequestHandler], None]


class HostileServer:
    """A stdlib HTTP server on 127.0.0.1: each path prefix answers what the test set; every request is
    recorded as ``(method, path)``."""

    def __init__(self) -> None:
        self.routes: dict[str, Respond] = {}
        self.requests: list[tuple[str, str]] = []
        self.bodies: list[bytes] = []
        #: The headers of each request, in order.
        self.headers: list[dict[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server.bodies.append(self.rfile.read(length) if length else b"")
                server.requests.append((self.command, self.path))
                server.headers.append(dict(self.headers.items()))
                matches = [prefix for prefix in server.routes if self.path.startswith(prefix)]
                if not matches:
                    send(self, 404, b'{"error": {"code": "not_found", "message": "nothing here"}}')
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server.routes[max(matches, key=len)](self)

            do_GET = do_POST = _dispatch

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def json(self, prefix: str, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.routes[prefix] = lambda handler: send(handler, status, raw, headers=headers)

    def file(self, prefix: str, body: bytes, content_type: str, announce_length: bool = True) -> None:
        self.routes[prefix] = lambda handler: send(
            handler, 200, body, content_type=content_type, announce_length=announce_length
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
    announce_length: bool = True,
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    if announce_length:
        handler.send_header("Content-Length", str(len(body)))
    else:
        handler.send_header("Connection", "close")
        handler.close_connection = True
    handler.end_headers()
    handler.wfile.write(body)


def task(**fields: Any) -> dict[str, Any]:
    return {
        "id": TASK_ID,
        "object": "video.generation.task",
        "status": "processing",
        "progress": 40,
        "created": 1767225600,
        "model": "seedance-2.0-fast-text-to-video",
        **fields,
    }


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, host: str, **extra: Any) -> None:
    extra = {
        "connect_timeout": 2,
        "read_timeout": 2,
        "max_retries": 1,
        "backoff_base": 0.01,
        "backoff_max": 0.02,
        **extra,
    }
    connection = {
        "conn_type": "evolink",
        "password": "sk-hostile-test-key-0123",
        "host": host,
        "extra": extra,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection))


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileServer]:
    server = HostileServer()
    set_connection(monkeypatch, "evolink_hostile", server.url)
    yield server
    server.close()


@pytest.fixture
def hook(hostile: HostileServer) -> EvolinkHook:
    return EvolinkHook("evolink_hostile")


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# -- task ids and answers ---------------------------------------------------------------------------------

ESCAPING_ID = "/" + "../" * 12 + "tmp/x/escaped"


def test_an_escaping_id_in_the_submission_answer_never_becomes_a_task(
    hostile: HostileServer, hook: EvolinkHook
) -> None:
    hostile.json("/v1/videos/generations", task(id=ESCAPING_ID))
    with pytest.raises(EvolinkSubmissionUnknownError, match="Idempotency-Key"):
        hook.create_video_task({"model": "m", "prompt": "p"}, idempotency_key="evl-trust-test-key-0001")
    # Retried with the same key (the answer was not usable), never accepted.
    assert hostile.requests == [("POST", "/v1/videos/generations")] * 2


def test_a_poll_answer_for_another_task_is_a_bad_answer(hostile: HostileServer, hook: EvolinkHook) -> None:
    hostile.json("/v1/tasks/", task(id="task-unified-1767225600-zzzz9999"))
    with pytest.raises(EvolinkBadAnswerError, match="not the task asked for"):
        hook.get_task(TASK_ID)


@pytest.mark.parametrize(
    "task_id",
    [
        f"{TASK_ID}?x=1",
        "task-unified-1-abc%2F..%2Fv1",
        f"{TASK_ID}\r\nX-Evil: 1",
        "task-unified-1/../../v1",
        "..",
        ".task-unified-1-abc",
        f"{TASK_ID}\n",
    ],
)
def test_ids_we_send_are_checked_before_any_http(
    hostile: HostileServer, hook: EvolinkHook, task_id: str
) -> None:
    with pytest.raises(EvolinkConfigurationError):
        hook.get_task(task_id)
    with pytest.raises(EvolinkConfigurationError):
        asyncio.run(hook.aget_task(task_id))
    assert hostile.requests == []


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (task(created="yesterday"), "created"),
        (task(status=None), "status"),
        (task(progress="50%"), "progress"),
        (task(results=[f"https://x.example/{i}.mp4" for i in range(10_000)]), "results"),
        (task(results=[{"url": "x"}]), "results"),
        (task(result_data="x"), "result_data"),
        (task(result_data=[{"video_url": f"https://x.example/{i}.mp4"} for i in range(1500)]), "result_data"),
        (task(result_data={"profile_picture_url": ["https://x.example/p.png"]}), "result_data"),
        (b'{"id": "' + TASK_ID.encode() + b'", "status": "processing", "progress": NaN}', "NaN"),
        (b'{"id": "x", "a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
        (b"[" * 50 + b"]" * 50, "nested"),
        (b'{"id": "' + TASK_ID.encode() + b'", "pad": "' + b"x" * (2 * MAX_ANSWER_BYTES) + b'"}', "bytes"),
        (b"<html>gateway</html>", "not JSON"),
        (b'["not", "an", "object"]', "list"),
    ],
    ids=[
        "created",
        "status",
        "progress",
        "10k-results",
        "results-type",
        "result_data",
        "1500-result_data",
        "result_data-url",
        "nan",
        "deep",
        "nested-33",
        "2MiB",
        "html",
        "list",
    ],
)
def test_malformed_poll_answers_are_bad_answers_sync_and_async(
    hostile: HostileServer, hook: EvolinkHook, body: Any, match: str
) -> None:
    hostile.json("/v1/tasks/", body)
    with pytest.raises(EvolinkBadAnswerError, match=match) as sync_error:
        hook.get_task(TASK_ID)

    async def poll() -> None:
        try:
            await EvolinkHook("evolink_hostile").aget_task(TASK_ID)
        finally:
            await aclose_async_clients()

    with pytest.raises(EvolinkBadAnswerError, match=match) as async_error:
        asyncio.run(poll())
    assert sync_error.value.retryable and async_error.value.retryable  # a failed poll, counted


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_an_error_never_followed_nor_read_as_the_task_sync_and_async(
    hostile: HostileServer, hook: EvolinkHook, status: int
) -> None:
    # The redirect carries a valid task body and points back at the same server: following it or reading
    # the body would both end in a task.
    body = json.dumps(task()).encode()
    location = f"{hostile.url}/v1/tasks/{TASK_ID}?moved"
    hostile.routes["/v1/tasks/"] = lambda handler: send(handler, status, body, headers={"Location": location})
    errors = _both_modes(hook)
    for error in errors:
        assert isinstance(error, EvolinkConfigurationError), error
        assert f"HTTP {status}" in str(error) and "redirects are not followed" in str(error)
        assert not error.retryable
    assert len(hostile.requests) == 2  # one each: neither followed nor retried


def _gzip_of_spaces(megabytes: int) -> bytes:
    """``{`` + that many MB of spaces + ``}``, gzipped without ever holding it uncompressed."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(b"{")]
    spaces = b" " * (1 << 20)
    parts += [packer.compress(spaces) for _ in range(megabytes)]
    parts += [packer.compress(b"}"), packer.flush()]
    return b"".join(parts)


def _peak_rss_growth_mb(run: Callable[[], object]) -> float:
    """How far the process's peak RSS rose while ``run`` ran (the peak is reset first)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS:")
    with contextlib.suppress(EvolinkError):
        run()
    return (_status_kb("VmHWM:") - before) / 1024


def _status_kb(field: str) -> int:
    line = next(row for row in Path("/proc/self/status").read_text().splitlines() if row.startswith(field))
    return int(line.split()[1])


def _both_modes(hook: EvolinkHook, deadline: float | None = None) -> tuple[BaseException, BaseException]:
    """The error a sync read and an async read of TASK_ID end with."""
    with pytest.raises(EvolinkError) as sync_error:
        hook.get_task(TASK_ID, deadline=deadline)

    async def poll() -> None:
        try:
            await EvolinkHook("evolink_hostile").aget_task(TASK_ID, deadline=deadline)
        finally:
            await aclose_async_clients()

    with pytest.raises(EvolinkError) as async_error:
        asyncio.run(poll())
    return sync_error.value, async_error.value


def test_a_gzipped_answer_is_read_and_a_gzip_bomb_is_refused_in_bounded_memory(
    hostile: HostileServer, hook: EvolinkHook
) -> None:
    hostile.json(
        "/v1/tasks/", gzip.compress(json.dumps(task()).encode()), headers={"Content-Encoding": "gzip"}
    )
    assert hook.get_task(TASK_ID)["id"] == TASK_ID  # an honest compressed answer is fine

    bomb = _gzip_of_spaces(512)  # 512 MB of JSON in ~500 KB
    hostile.json("/v1/tasks/", bomb, headers={"Content-Encoding": "gzip"})
    for error in _both_modes(hook):
        assert isinstance(error, EvolinkBadAnswerError) and "more than" in str(error), error
    growth = _peak_rss_growth_mb(lambda: asyncio.run(EvolinkHook("evolink_hostile").aget_task(TASK_ID)))
    assert growth < 64, f"peak RSS grew {growth:.0f} MB unpacking a 512 MB bomb"

    nested = gzip.compress(_gzip_of_spaces(64))
    hostile.json("/v1/tasks/", nested, headers={"Content-Encoding": "gzip, gzip"})
    for error in _both_modes(hook):
        assert isinstance(error, EvolinkBadAnswerError) and "Content-Encoding" in str(error), error


def test_a_trickled_answer_is_cut_off_by_the_deadline_in_both_modes(
    hostile: HostileServer, hook: EvolinkHook
) -> None:
    stop = threading.Event()
    body = json.dumps(task()).encode()

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        for byte in body:  # a byte every 0.2 s: each read well inside the 2 s read timeout
            if stop.wait(0.2):
                return
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()

    hostile.routes["/v1/tasks/"] = trickle
    started = time.monotonic()
    try:
        errors = _both_modes(hook, deadline=time.time() + 1)
    finally:
        stop.set()
    for error in errors:
        assert "time ran out" in str(error) or isinstance(error, EvolinkWaitTimeoutError), error
    # The whole body would take ~60 s per read; both reads ended near their deadline instead.
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"model": "m" * 900_000}, "model="),
        ({"status": "failed", "error": {"code": ["a"], "message": "x"}}, "error.code="),
        ({"status": "failed", "error": {"code": 123}}, "error.code="),
        ({"usage": {"note": "x" * 100_000}}, "bytes of JSON"),
    ],
)
def test_answers_too_large_for_xcom_or_with_odd_error_codes_are_bad(
    fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(EvolinkBadAnswerError, match=match):
        checked_task(task(**fields))


@pytest.mark.parametrize(
    ("note", "accepted"),
    [
        ("x" * 100, True),  # a usual answer: its received size bounds it, not measured
        ("x" * 20_000, True),  # 20 KB: more than the size that skips the measure, well within the limit
        ("x" * (MAX_TASK_BYTES + 100), False),  # over the limit as received
        ("\u00e9" * 12_000, False),  # 24 KB received, 72 KB as XCom JSON (each "é" becomes \u00e9)
        ("\x7f" * 12_000, False),  # 12 KB received, 72 KB as XCom JSON (each DEL becomes \u007f)
    ],
    ids=["100B", "20KB", "70KB", "24KB-as-72KB", "12KB-of-DEL-as-72KB"],
)
def test_a_task_answer_is_measured_as_the_json_it_becomes_sync_and_async(
    hostile: HostileServer, hook: EvolinkHook, note: str, accepted: bool
) -> None:
    """The XCom limit holds for the task as it is stored (compact JSON, non-ASCII escaped), whatever the
    length of the body it arrived in."""
    hostile.json("/v1/tasks/", json.dumps(task(usage={"note": note}), ensure_ascii=False).encode())

    async def poll() -> dict[str, Any]:
        try:
            return await EvolinkHook("evolink_hostile").aget_task(TASK_ID)
        finally:
            await aclose_async_clients()

    for read in (lambda: hook.get_task(TASK_ID), lambda: asyncio.run(poll())):
        if accepted:
            assert read()["usage"]["note"] == note
        else:
            with pytest.raises(EvolinkBadAnswerError, match="bytes of JSON"):
                read()


def test_no_received_byte_grows_past_the_bound_that_skips_measuring_a_task() -> None:
    """The worst characters and numbers, each repeated a thousand times, re-serialized: DEL (one byte, six
    characters ``\\u007f``: found by red-team 22), a two-byte character (3 characters a byte), an astral one,
    numbers that print in full, escapes. ``checked_task`` skips the measure below ``MAX_TASK_BYTES`` / the
    bound, so no body under it may grow past it."""
    characters = ["\x7f", "\u00e9", "\U0001f600", "\\/", "\\u0041", "a"]
    numbers = ["9e15", "1e14", "-1e15", "1E1", "0.1e-3", "5"]
    bodies = [f'"{character * 1000}"'.encode() for character in characters]
    bodies += [f"[{','.join([number] * 1000)}]".encode() for number in numbers]
    bodies += [number.encode() for number in numbers]
    for raw in bodies:
        grown = json.dumps(loads_strict(raw), separators=(",", ":"))
        assert len(grown) <= JSON_GROWTH_PER_BYTE * len(raw), (raw[:12], len(grown) / len(raw))
    ratios = [len(json.dumps(loads_strict(raw), separators=(",", ":"))) / len(raw) for raw in bodies]
    assert max(ratios) > JSON_GROWTH_PER_BYTE - 0.1  # DEL's: the bound is not loose


def test_a_created_far_from_the_local_clock_does_not_drive_the_schedule() -> None:
    now = time.time()
    assert created_at(task(created=1), default=now) == now
    assert created_at(task(created=int(now) + 3600), default=now) == now  # an hour in the future
    assert created_at(task(created=int(now) - 600), default=now) == int(now) - 600


def test_bad_created_never_breaks_the_operator_start_time() -> None:
    assert created_at({"created": "yesterday"}, default=5.0) == 5.0
    assert created_at({"created": "1767225600"}, default=1767225700.0) == 1767225600.0
    assert created_at({"created": 1e300}, default=5.0) == 5.0


def test_a_malformed_task_in_a_batch_answer_fails_the_poll_not_the_triggerer(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_hostile_batch", hostile.url, batch_polling=True, max_retries=0)
    hostile.json("/v1/tasks/batch", {"data": [task(id=ESCAPING_ID)]})
    events = run_trigger(
        EvolinkTaskTrigger(
            TASK_ID,
            "evolink_hostile_batch",
            poll_interval=0.01,
            end_time=time.time() + 30,
            max_poll_failures=2,
        )
    )
    assert [event["status"] for event in events] == ["error"]
    assert "not a safe task id" in events[0]["message"]


def run_trigger(trigger: EvolinkTaskTrigger) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        try:
            return [event.payload async for event in trigger.run()]
        finally:
            await aclose_async_clients()

    return asyncio.run(collect())


def test_the_trigger_counts_bad_polls_and_recovers(hostile: HostileServer) -> None:
    answers = iter([b"[" * 5000 + b"]" * 5000, b'{"progress": NaN}'])
    good = json.dumps(task(status="completed", progress=100, results=["https://x.example/v.mp4"])).encode()
    hostile.routes["/v1/tasks/"] = lambda handler: send(handler, 200, next(answers, good))
    trigger = EvolinkTaskTrigger(
        TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 30, max_poll_failures=3
    )
    events = run_trigger(trigger)
    assert [event["status"] for event in events] == ["success"]
    assert events[0]["task"]["id"] == TASK_ID


# -- results into storage ----------------------------------------------------------------------------------


def completed(*urls: str, task_id: str = TASK_ID) -> dict[str, Any]:
    return task(id=task_id, status="completed", progress=100, results=list(urls))


def test_an_escaping_id_never_names_a_file(hostile: HostileServer, hook: EvolinkHook, tmp_path: Path) -> None:
    hostile.file("/media/", MP4, "application/octet-stream")
    out = tmp_path / "out"
    with pytest.raises(EvolinkBadAnswerError):
        store_results(hook, completed(f"{hostile.url}/media/x.pth", task_id=ESCAPING_ID), str(out))
    assert files_under(tmp_path) == []
    assert hostile.requests == []


def test_the_extension_comes_from_the_bytes_not_the_url(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path
) -> None:
    hostile.file("/media/ok", MP4, "application/octet-stream")
    hostile.file("/media/code", b"import os; os.system('id')\n" * 10, "application/octet-stream")

    stored = store_results(hook, completed(f"{hostile.url}/media/ok.pth"), str(tmp_path))
    assert stored == [str(tmp_path / f"{TASK_ID}-0.mp4")]
    with pytest.raises(EvolinkStorageError, match="first bytes"):
        store_results(
            hook, completed(f"{hostile.url}/media/code.pth", task_id=TASK_ID[:-1] + "9"), str(tmp_path)
        )
    assert files_under(tmp_path) == [f"{TASK_ID}-0.mp4"]


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (HTML, "video/mp4"),
        (b"\x1a\x45\xdf\xa3" + b"\x00" * 100, "video/webm"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100, "video/mp4"),
    ],
    ids=["html-as-mp4", "matroska-not-webm", "heic-brand"],
)
def test_content_that_is_not_an_allowed_format_is_refused(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path, body: bytes, kind: str
) -> None:
    hostile.file("/media/", body, kind)
    with pytest.raises(EvolinkStorageError, match="first bytes"):
        store_results(hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("announce", [True, False], ids=["with-length", "no-length"])
def test_a_result_over_the_byte_cap_is_refused(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path, announce: bool
) -> None:
    hostile.file("/media/", MP4 + b"\x00" * 300_000, "video/mp4", announce_length=announce)
    with pytest.raises(EvolinkStorageError, match="100000"):
        store_results(hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path), max_bytes=100_000)
    assert files_under(tmp_path) == []


def test_a_trickling_server_is_cut_off_at_the_deadline(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path
) -> None:
    stop = threading.Event()

    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "video/mp4")
        handler.send_header("Content-Length", str(len(MP4) + 10_000))
        handler.end_headers()
        handler.wfile.write(MP4)
        handler.wfile.flush()
        while not stop.wait(0.05):  # a byte at a time, each well inside the read timeout
            handler.wfile.write(b"\x00")
            handler.wfile.flush()

    hostile.routes["/media/"] = trickle
    began = time.monotonic()
    try:
        with pytest.raises(EvolinkWaitTimeoutError, match="timeout"):
            store_results(
                hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path), deadline=time.time() + 1
            )
    finally:
        stop.set()
    assert 1.0 - 0.1 <= time.monotonic() - began <= 1.0 + 2.0  # cut off at the deadline, not by a hang
    assert files_under(tmp_path) == []  # the partial file is gone too


def test_stale_partial_files_are_removed_and_symlinks_never_count(
    hostile: HostileServer, hook: EvolinkHook, tmp_path: Path
) -> None:
    hostile.file("/media/", MP4, "video/mp4")
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".{TASK_ID}-0.part-deadbeef"
    stale.write_bytes(b"killed mid-download")
    victim = tmp_path / "victim.mp4"
    victim.write_bytes(b"x" * len(MP4))  # same size as the result: must still not count as stored
    (out / f"{TASK_ID}-1.mp4").symlink_to(victim)

    with pytest.raises(EvolinkStorageError, match="symbolic link"):
        store_results(hook, completed(f"{hostile.url}/media/a.mp4", f"{hostile.url}/media/b.mp4"), str(out))

    assert not stale.exists()
    assert victim.read_bytes() == b"x" * len(MP4)
    assert sorted(p.name for p in out.iterdir()) == [f"{TASK_ID}-0.mp4", f"{TASK_ID}-1.mp4"]
    assert (out / f"{TASK_ID}-1.mp4").is_symlink()


def test_downloads_connect_to_the_checked_address_not_a_rebound_one(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The name resolves to a public address when checked and to loopback afterwards (DNS rebinding):
    the connection goes to the checked address, so the loopback server never sees a request."""
    set_connection(monkeypatch, "evolink_rebind", hostile.url, connect_timeout=0.5, max_retries=0)
    port = int(hostile.url.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "media.rebind.example":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        address = "192.0.43.8" if len(lookups) == 1 else "127.0.0.1"  # public, then loopback
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    hostile.file("/media/", MP4, "video/mp4")
    with pytest.raises(EvolinkError):
        store_results(
            EvolinkHook("evolink_rebind"),
            completed(f"http://media.rebind.example:{port}/v.mp4"),
            str(tmp_path),
        )
    assert lookups == ["media.rebind.example"]  # resolved once, when checked
    assert hostile.requests == []
    assert check_download_url(f"{hostile.url}/v.mp4", own_base_url=hostile.url) == "127.0.0.1"


# -- local inputs ------------------------------------------------------------------------------------------


@pytest.fixture
def allowed(hostile: HostileServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # A short path: a Unix socket's path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="up-", dir="/tmp"))
    set_connection(monkeypatch, "evolink_hostile", hostile.url, upload_allowed_dirs=f"{folder},s3://refs/ok/")
    hostile.json(
        "/api/v1/files/upload/stream",
        {"success": True, "data": {"file_url": "https://files.example/u/1.png"}},
    )
    yield folder
    shutil.rmtree(folder)


def upload(value: str) -> dict[str, Any]:
    fields = {"prompt": "p", "image_urls": [value]}
    return upload_local_media(EvolinkHook("evolink_hostile"), fields, [MediaRef("image_urls", 0, value)])


def test_an_allowed_image_is_streamed_with_its_checked_length(hostile: HostileServer, allowed: Path) -> None:
    picture = allowed / "hero.png"
    picture.write_bytes(PNG + b"\x00" * 1000)
    assert upload(str(picture))["image_urls"] == ["https://files.example/u/1.png"]
    assert hostile.requests == [("POST", "/api/v1/files/upload/stream")]
    assert picture.read_bytes() in hostile.bodies[0]


def test_a_storage_prefix_names_the_object_whatever_connection_reads_it() -> None:
    """The string form of ``upload_allowed_dirs`` keeps a storage URI whole (``os.pathsep`` once cut it at
    its ``:``), and ``conn_id@`` only picks the connection: the allow-list compares objects."""
    from evolink_provider.hooks.connection import _allowed_dirs
    from evolink_provider.uploads import allowed_locations

    configured = _allowed_dirs(f"/a{os.pathsep}/b,s3://aws_default@bucket/refs")
    assert configured == ("/a", "/b", "s3://aws_default@bucket/refs")
    assert allowed_locations(configured).uri_prefixes == ("s3://bucket/refs/",)


def make_socket(path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda d: Path("/proc/self/environ"), "/proc"),
        (lambda d: Path("/etc/passwd"), "upload_allowed_dirs"),
        (lambda d: (d / "link.png").symlink_to("/etc/passwd") or d / "link.png", "upload_allowed_dirs"),
        (lambda d: (d / "env.png").symlink_to("/proc/self/environ") or d / "env.png", "/proc"),
        (lambda d: os.mkfifo(d / "fifo.png") or d / "fifo.png", "regular files"),
        (lambda d: make_socket(d / "sock.png") or d / "sock.png", "regular files"),
        (lambda d: (d / "dir.png").mkdir() or d / "dir.png", "regular files"),
        (lambda d: os.truncate(_touch(d / "sparse.png"), 2 << 30) or d / "sparse.png", "at most"),
        (lambda d: (d / "notes.png").write_bytes(b"password=hunter2\n") and d / "notes.png", "first bytes"),
        (lambda d: (d / "secret.txt").write_bytes(b"x") and d / "secret.txt", "images named"),
        (lambda d: d / "missing.png", "existing"),
        (lambda d: Path("s3://other-bucket/x.png"), "prefix"),
        (lambda d: Path("s3://refs/ok/../../other/x.png"), "prefix"),
    ],
    ids=[
        "proc",
        "etc",
        "symlink-out",
        "symlink-proc",
        "fifo",
        "socket",
        "directory",
        "sparse-2GB",
        "not-an-image",
        "extension",
        "missing",
        "uri-not-listed",
        "uri-dotdot",
    ],
)
def test_inputs_the_deployment_does_not_allow_are_refused_before_any_http(
    hostile: HostileServer, allowed: Path, make: Callable[[Path], Path], rule: str
) -> None:
    value = str(make(allowed)).replace("s3:/", "s3://")
    with pytest.raises(EvolinkInputRefusedError, match=rule) as refused:
        upload(value)
    assert "image_urls[0]" in str(refused.value) and value[:40] in str(refused.value)
    assert hostile.requests == []


def _touch(path: Path) -> Path:
    path.write_bytes(PNG)
    return path


def test_the_default_allows_only_the_dags_folder(hostile: HostileServer, tmp_path: Path) -> None:
    outside = tmp_path / "hero.png"
    outside.write_bytes(PNG)
    with pytest.raises(EvolinkInputRefusedError, match="DAGs folder"):
        upload(str(outside))
    assert hostile.requests == []


def test_a_file_that_grows_after_the_check_is_not_sent_beyond_its_size(tmp_path: Path) -> None:
    path = tmp_path / "grow.png"
    path.write_bytes(PNG * 3)

    def refuse(rule: str) -> EvolinkInputRefusedError:
        return EvolinkInputRefusedError("image_urls[0]", str(path), rule)

    with path.open("rb") as raw:
        stream = CheckedStream(raw, len(PNG), refuse)
        assert stream.seek(0, os.SEEK_END) == len(PNG)
        stream.seek(0)
        assert stream.read(1 << 20) == PNG
        with pytest.raises(EvolinkInputRefusedError, match="grow"):
            stream.read(1 << 20)


# -- retries, secrets, discovery ------------------------------------------------------------------------


def test_retry_after_beyond_the_deadline_fails_with_the_error(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=3, retry_after_max=600)
    hostile.json(
        "/v1/tasks/",
        {"error": {"code": "rate_limited", "message": "slow down"}},
        status=429,
        headers={"Retry-After": "120"},
    )
    began = time.monotonic()
    with pytest.raises(EvolinkRateLimitError):
        EvolinkHook("evolink_hostile").get_task(TASK_ID, deadline=time.time() + 5)
    assert time.monotonic() - began < 2.0  # at once: not the 120 s, nor the 5 s deadline

    async def poll() -> None:
        try:
            await EvolinkHook("evolink_hostile").aget_task(TASK_ID, deadline=time.time() + 5)
        finally:
            await aclose_async_clients()

    with pytest.raises(EvolinkRateLimitError):
        asyncio.run(poll())
    assert len(hostile.requests) == 2  # one attempt each: the 120 s wait was never started


def test_a_key_with_a_line_break_is_refused_without_showing_it(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-live-secret-part1\nsk-live-secret-part2"
    monkeypatch.setenv(
        "AIRFLOW_CONN_EVOLINK_NEWLINE",
        json.dumps({"conn_type": "evolink", "password": key, "host": hostile.url}),
    )
    with pytest.raises(EvolinkConfigurationError, match="whitespace") as refused:
        EvolinkHook("evolink_newline").get_credits()
    assert "secret-part" not in str(refused.value) and "secret-part" not in repr(refused.value)
    assert hostile.requests == []


def test_the_hook_does_not_send_the_key_to_the_masker_again(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow masks the password whenever it hands out the connection; each further ``mask_secret``
    call is logged with the key at DEBUG by dag.test(), so the hook adds none for a key that is the
    password, and one per process for a key that differs from it (surrounding whitespace)."""
    import airflow.sdk.log

    keys_sent: list[object] = []

    def record(secret: object, name: str | None = None) -> None:
        if "sk-" in str(secret):  # Airflow's extra_dejson masks the extras through the same function
            keys_sent.append(secret)

    monkeypatch.setattr(airflow.sdk.log, "mask_secret", record)
    EvolinkHook("evolink_hostile").settings  # noqa: B018
    assert keys_sent == []
    padded = {"conn_type": "evolink", "password": " sk-padded-key-777 ", "host": hostile.url}
    monkeypatch.setenv("AIRFLOW_CONN_EVOLINK_PADDED", json.dumps(padded))
    EvolinkHook("evolink_padded").settings  # noqa: B018
    EvolinkHook("evolink_padded").settings  # noqa: B018
    assert keys_sent == ["sk-padded-key-777"]


def test_example_dag_discovery_imports_the_provider_by_its_distribution_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from airflow.dag_processing.bundles.manager import _add_provider_example_dags_to_bundle

    assert importlib.import_module("airflow_provider_evolink").__version__
    with caplog.at_level(logging.ERROR):
        _add_provider_example_dags_to_bundle([])
    assert "airflow_provider_evolink" not in caplog.text


# -- hypothesis: malformed answers end as EvolinkError in both modes ------------------------------------

JSON_LEAF = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=30)
)
ANY_JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
MALFORMED_TASK = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.just(TASK_ID), st.just(ESCAPING_ID), st.text(max_size=40), ANY_JSON),
        "status": st.one_of(st.sampled_from(["completed", "failed", "processing", "cancelled"]), ANY_JSON),
        "progress": ANY_JSON,
        "created": ANY_JSON,
        "results": st.one_of(st.lists(st.text(max_size=20), max_size=20), ANY_JSON),
        "result_data": ANY_JSON,
        "error": ANY_JSON,
        "task_info": ANY_JSON,
        "usage": ANY_JSON,
    },
)
RAW_BODIES = st.sampled_from(
    [b"", b"{", b"[" * 3000 + b"]" * 3000, b'{"id": 1e999}', b"\xff\xfe", b'{"a": ' + b"9" * 5000 + b"}"]
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.one_of(
        MALFORMED_TASK.map(lambda t: json.dumps(t).encode()),
        ANY_JSON.map(lambda v: json.dumps(v).encode()),
        RAW_BODIES,
    )
)
def test_any_answer_ends_as_a_task_or_an_evolink_error_in_both_modes(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, body: bytes
) -> None:
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=0)
    hostile.json("/v1/tasks/", body)
    try:
        answer = EvolinkHook("evolink_hostile").get_task(TASK_ID)
    except EvolinkError:
        accepted = False
    else:
        accepted = True
        assert checked_task(answer, TASK_ID) is answer
        assert loads_strict(body) == answer

    events = run_trigger(
        EvolinkTaskTrigger(
            TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 0.3, max_poll_failures=1
        )
    )
    assert len(events) == 1
    status = events[0]["status"]
    # On a loaded machine the 0.3 s wait can end inside a read: that read's error event, cut by the deadline.
    cut = status == "error" and "time ran out" in events[0]["message"]
    assert status in ({"success", "failed", "timeout"} if accepted else {"error"}) or cut, events[0]


# -- server-supplied text: one printable/length rule, and never the connection's key ---------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("processing", "processing"),
        ("caf\u00e9 \u00a0ok", "caf\u00e9 \u00a0ok"),  # not printable (U+00A0) yet neither Cc nor Cf: kept
        ("a\x1b[31mred\nline\u202e\u200b", "a\\x1b[31mred\\nline\\u202e\\u200b"),
        (None, "None"),
        (123, "123"),
    ],
)
def test_printable_escapes_control_and_format_characters_only(text: object, shown: str) -> None:
    from evolink_provider.exceptions import printable

    assert printable(text) == shown


def test_loads_strict_bounds_nesting_not_brackets() -> None:
    """Brackets inside strings, or many shallow objects, are not depth; the limit still holds."""
    from evolink_provider.answers import MAX_NESTING_DEPTH, loads_strict

    assert loads_strict('{"a": "' + "{[" * 40 + '"}') == {"a": "{[" * 40}
    assert loads_strict(json.dumps([{"x": [1]}] * 40)) == [{"x": [1]}] * 40
    deepest = "[" * MAX_NESTING_DEPTH + "]" * MAX_NESTING_DEPTH
    assert loads_strict(deepest) is not None
    with pytest.raises(ValueError, match="nested"):
        loads_strict("[" + deepest + "]")


HOSTILE_KEY = "sk-hostile-test-key-0123"
#: The key as a JSON escape: a server need not echo it byte for byte.
ESCAPED_KEY = "".join(f"\\u{ord(char):04x}" for char in HOSTILE_KEY)


def _every_text(error: BaseException) -> str:
    return " ".join([str(error), repr(error), *(str(value) for value in vars(error).values())])


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(
            {
                "error": {
                    "code": f"bad_{HOSTILE_KEY}",
                    "message": f"invalid key Bearer {HOSTILE_KEY}",
                    "request_id": f"req-{HOSTILE_KEY}",
                }
            }
        ).encode(),
        b'{"error": {"code": "x", "message": "key ' + ESCAPED_KEY.encode() + b' refused"}}',
        b"<html><body>502 upstream said: Authorization: Bearer " + HOSTILE_KEY.encode() + b"</body></html>",
    ],
    ids=["json", "json-escaped", "html"],
)
def test_a_key_echoed_in_an_error_body_reaches_no_exception_or_log(
    hostile: HostileServer, hook: EvolinkHook, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    hostile.json("/v1/tasks/", body, status=502, headers={"X-Request-Id": f"id-{HOSTILE_KEY}"})
    with caplog.at_level(logging.DEBUG):
        errors = _both_modes(hook)
    for error in errors:
        assert "***" in str(error), error
        assert HOSTILE_KEY not in _every_text(error)
    assert HOSTILE_KEY not in caplog.text
    assert "attempt 2 of 2" in caplog.text  # the retries were logged, without the key


def test_a_key_echoed_in_a_task_answer_is_replaced_before_anything_reads_it(
    hostile: HostileServer, hook: EvolinkHook
) -> None:
    failed = task(status="failed", error={"code": "service_error", "message": f"upstream got {HOSTILE_KEY}"})
    hostile.json("/v1/tasks/", failed)
    answer = hook.get_task(TASK_ID)
    assert answer["error"]["message"] == "upstream got ***"
    (event,) = run_trigger(
        EvolinkTaskTrigger(TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 30)
    )
    assert event["status"] == "failed" and HOSTILE_KEY not in json.dumps(event)


CONTROL = "\x1b[31m\u202e\r\n"
CONTROL_CHARACTERS = "\x1b\u202e\r\n"


def test_code_request_id_status_and_message_pass_one_printable_and_length_rule(
    hostile: HostileServer, hook: EvolinkHook
) -> None:
    from evolink_provider.exceptions import MAX_SERVER_MESSAGE, MAX_SERVER_NAME, EvolinkTaskError
    from evolink_provider.polling import decide_after_poll
    from evolink_provider.triggers.evolink import task_from_event

    hostile.json(
        "/v1/tasks/",
        {"error": {"code": f"c{CONTROL}" * 100, "message": f"m{CONTROL}" * 10_000, "request_id": CONTROL}},
        status=400,
        headers={"X-Request-Id": "h" * 10_000},
    )
    for error in _both_modes(hook):
        shown = str(error)
        assert not any(char in shown for char in CONTROL_CHARACTERS), shown
        assert len(shown) < 200 + MAX_SERVER_MESSAGE + 2 * MAX_SERVER_NAME, len(shown)

    failed = task(status="failed", error={"code": f"x{CONTROL}" * 10, "message": f"m{CONTROL}" * 1_000})
    decision = decide_after_poll(failed, now=time.time(), started_at=time.time(), deadline=None)
    hostile.json("/v1/tasks/", failed)
    (event,) = run_trigger(
        EvolinkTaskTrigger(TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 30)
    )
    with pytest.raises(EvolinkTaskError) as ended:
        task_from_event(event)
    odd_status = decide_after_poll(
        task(status=f"queued{CONTROL}"), now=time.time(), started_at=time.time(), deadline=None
    )
    ended_status = EvolinkTaskError(TASK_ID, f"cancelled{CONTROL}" * 40, None, None)
    for shown in (decision.message, str(ended.value), odd_status.message, str(ended_status)):
        assert not any(char in shown for char in CONTROL_CHARACTERS), shown
        assert len(shown) < 200 + MAX_SERVER_MESSAGE + 2 * MAX_SERVER_NAME, len(shown)


NON_ASCII_KEY = "sk-live-secret\u2013part-caf\u00e9"


def test_a_non_ascii_key_is_refused_when_the_connection_is_read_sync_and_in_the_trigger(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typographic dash pasted with the key: the clients failed to encode it (or sent it as Latin-1),
    the trigger's after the worker's paid submission. Both refuse it before any HTTP, not showing it."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_EVOLINK_NON_ASCII",
        json.dumps({"conn_type": "evolink", "password": NON_ASCII_KEY, "host": hostile.url}),
    )
    with pytest.raises(EvolinkConfigurationError, match="non-ASCII") as refused:
        EvolinkHook("evolink_non_ascii").get_task(TASK_ID)
    (event,) = run_trigger(
        EvolinkTaskTrigger(TASK_ID, "evolink_non_ascii", poll_interval=0.01, end_time=time.time() + 30)
    )
    assert event["status"] == "error" and "non-ASCII" in event["message"], event
    assert not event["retryable"]
    for shown in (str(refused.value), repr(refused.value), json.dumps(event)):
        assert "secret" not in shown and "caf" not in shown, shown
    assert hostile.requests == []


@pytest.mark.parametrize("proc", [True, False], ids=["proc-self-fd", "inode-of-the-path-resolved-again"])
def test_a_parent_folder_swapped_for_a_symlink_after_the_check_reads_no_outside_file(
    hostile: HostileServer, allowed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, proc: bool
) -> None:
    """The swap happens at a fixed point: right after the path was resolved and checked, before it is
    opened (in the wild a race a writer of the allowed folder wins 20 times in 12,210 tries)."""
    import evolink_provider.uploads as uploads

    inside, outside = allowed / "refs", tmp_path / "secrets"
    inside.mkdir()
    outside.mkdir()
    (inside / "hero.png").write_bytes(PNG + b"inside")
    (outside / "hero.png").write_bytes(PNG + b"outside: the deployment's private picture")
    real_realpath = os.path.realpath
    swapped = []

    def swap_after_resolving(path: Any, *args: Any, **kwargs: Any) -> str:
        resolved = real_realpath(path, *args, **kwargs)
        if str(path) == str(inside / "hero.png") and not swapped:
            inside.rename(allowed / "refs.before")
            inside.symlink_to(outside, target_is_directory=True)
            swapped.append(path)
        return resolved

    monkeypatch.setattr(os.path, "realpath", swap_after_resolving)
    if not proc:
        monkeypatch.setattr(uploads, "PROC_FD", tmp_path / "no-proc", raising=False)
    with pytest.raises(EvolinkInputRefusedError, match=r"upload_allowed_dirs|stays the same"):
        upload(str(inside / "hero.png"))
    assert swapped and hostile.requests == []


def test_a_hard_link_inside_an_allowed_folder_is_uploaded(
    hostile: HostileServer, allowed: Path, tmp_path: Path
) -> None:
    """Documented: a hard link is the file, by a name inside the folder (see evolink_provider.uploads)."""
    elsewhere = tmp_path / "hero.png"
    elsewhere.write_bytes(PNG + b"linked")
    os.link(elsewhere, allowed / "hero.png")
    assert upload(str(allowed / "hero.png"))["image_urls"] == ["https://files.example/u/1.png"]


# -- the key goes to the base URL only, and into no log line --------------------------------------------


def test_result_hosts_never_see_the_key_on_any_hop_or_retry(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The result host here is the connection's own host (the only private one a download may reach), so
    a download that reused the API requests' headers would hand it the key."""
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=2)
    answers = iter([503])

    def flaky_then_redirect(handler: BaseHTTPRequestHandler) -> None:
        status = next(answers, None)
        if status is not None:
            send(handler, status, b"busy", content_type="text/plain")
        else:
            send(handler, 302, b"", content_type="text/plain", headers={"Location": "/files/v.mp4"})

    hostile.routes["/media/"] = flaky_then_redirect
    hostile.file("/files/", MP4, "video/mp4")
    stored = store_results(
        EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v.mp4"), str(tmp_path)
    )
    assert len(stored) == 1
    assert [path for _, path in hostile.requests] == ["/media/v.mp4", "/media/v.mp4", "/files/v.mp4"]
    for headers in hostile.headers:
        assert not {name.lower() for name in headers} & {"authorization", "idempotency-key"}, headers
        assert not any(HOSTILE_KEY in value for value in headers.values()), headers


def test_retries_are_logged_without_the_key(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The send loops log each repeat (sync reads and submissions at WARNING, the triggers' reads at INFO;
    downloads repeat without a line); no line and no error carries the key, at any level."""
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=2, batch_polling=True)
    for prefix in ("/v1/tasks/", "/v1/videos/generations", "/media/"):
        hostile.json(prefix, {"error": {"code": "internal_error", "message": "try again"}}, status=503)
    hook = EvolinkHook("evolink_hostile")
    with caplog.at_level(logging.DEBUG):
        for call in (
            lambda: hook.get_task(TASK_ID),
            lambda: hook.create_video_task({"model": "m", "prompt": "p"}, "evl-retry-log-test-key-01"),
            lambda: store_results(hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path)),
            lambda: asyncio.run(_read_async(TASK_ID)),
        ):
            with pytest.raises(EvolinkError) as failed:
                call()
            assert HOSTILE_KEY not in _every_text(failed.value)
    retries = [record for record in caplog.records if "attempt" in record.getMessage()]
    assert len(retries) >= 6, [record.getMessage() for record in caplog.records]
    assert HOSTILE_KEY not in caplog.text
    assert all(HOSTILE_KEY not in repr(record.args) for record in caplog.records)


async def _read_async(task_id: str) -> dict[str, Any]:
    try:
        return await EvolinkHook("evolink_hostile").aget_task(task_id)
    finally:
        await aclose_async_clients()
