"""Committer review: hostile servers against both HTTP clients (aiohttp for the triggers' polls, requests for
submissions, uploads and downloads). A passing test is an attack that held; ``xfail(strict=True)`` marks a
finding (F<n>), which passes the day it is fixed. Fixed: F1 (a silent server: the socket timeouts end at
the deadline; a header slowloris: a timer shuts the socket at the deadline), F2 (an interim 1xx is a
retryable transport error and its connection is dropped), F3, F4 (JSON bytes must be UTF-8), F5 (an
upload body is exactly its Content-Length), F6 (no ``~/.netrc`` credentials on any request), F7 (no
exchange starts with no time left)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

import tests.test_hostile as hostile_tests
from evolink_provider.exceptions import (
    EvolinkBadAnswerError,
    EvolinkError,
    EvolinkInputRefusedError,
    EvolinkTransportError,
)
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import aclose_async_clients
from evolink_provider.storage import store_results
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from evolink_provider.uploads import CheckedStream
from tests.test_hostile import (
    MP4,
    TASK_ID,
    HostileServer,
    _every_text,
    _peak_rss_growth_mb,
    completed,
    run_trigger,
    send,
    set_connection,
    task,
)

KEY = "sk-hostile-test-key-0123"


#: test_hostile's fixture: the connection ``evolink_hostile`` points at a fresh HostileServer.
hostile = hostile_tests.hostile


TASK_BODY = json.dumps(task()).encode()


def raw_answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def write_raw(handler: BaseHTTPRequestHandler, data: bytes, close: bool = False) -> None:
    handler.wfile.write(data)
    handler.wfile.flush()
    handler.close_connection = close


async def _poll(conn_id: str = "evolink_hostile", deadline: float | None = None) -> dict[str, Any]:
    try:
        return await EvolinkHook(conn_id).aget_task(TASK_ID, deadline=deadline)
    finally:
        await aclose_async_clients()


def sync_poll(deadline: float | None = None) -> dict[str, Any]:
    return EvolinkHook("evolink_hostile").get_task(TASK_ID, deadline=deadline)


def async_poll(deadline: float | None = None) -> dict[str, Any]:
    return asyncio.run(_poll(deadline=deadline))


MODES = pytest.mark.parametrize("poll", [sync_poll, async_poll], ids=["sync", "async"])


def _timed_error(call: Any) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(EvolinkError) as caught:
        call()
    return caught.value, time.monotonic() - started


# -- slowloris: the deadline of one exchange ------------------------------------------------------------


def _trickled_headers(stop: threading.Event) -> Any:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        handler.wfile.flush()
        while not stop.wait(0.3):  # one byte per 0.3 s: every socket read well inside the read timeout
            handler.wfile.write(b"a")
            handler.wfile.flush()
        handler.close_connection = True

    return respond


def test_async_headers_trickled_past_the_deadline_are_cut_off_at_it(hostile: HostileServer) -> None:
    stop = threading.Event()
    hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    try:
        error, took = _timed_error(lambda: async_poll(deadline=time.time() + 1))
    finally:
        stop.set()
    assert isinstance(error, EvolinkTransportError) and "time ran out" in str(error), error
    assert took < 2.5, took


@pytest.mark.parametrize(
    "attack",
    [
        # F1: each header byte restarts the socket's timeout and requests has no bound on the whole
        # header phase (fixed: sync_session's timer shuts the socket at the deadline).
        "trickled-headers",
        "trickled-headers-through-a-proxy",  # the proxy's connection gets the same timer
        "silent",  # F1: the socket timeouts end at the deadline
    ],
)
def test_sync_exchange_ends_at_the_callers_deadline(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, attack: str
) -> None:
    stop = threading.Event()
    if attack == "silent":
        set_connection(monkeypatch, "evolink_hostile", hostile.url, read_timeout=6)
        hostile.routes["/v1/tasks/"] = lambda handler: stop.wait(8)
    elif attack == "trickled-headers":
        hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    else:  # the hostile server as the environment's forward proxy, asked for an absolute URL
        set_connection(monkeypatch, "evolink_hostile", "http://evolink.invalid:8080")
        monkeypatch.setenv("HTTP_PROXY", hostile.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        hostile.routes["http://evolink.invalid:8080/v1/tasks/"] = _trickled_headers(stop)
    threading.Timer(7, stop.set).start()
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        stop.set()
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, f"the deadline was 1 s away; the read took {took:.1f} s"
    assert hostile.requests, "the attack never reached the hostile server"


def test_a_download_whose_headers_trickle_past_the_deadline_ends_at_it(hostile: HostileServer) -> None:
    """F1 for result downloads (their session is built the same way): a header slowloris on a result host."""
    stop = threading.Event()
    hostile.routes["/results/"] = _trickled_headers(stop)
    threading.Timer(7, stop.set).start()

    def download() -> None:
        with EvolinkHook("evolink_hostile").open_result(f"{hostile.url}/results/v.mp4", time.time() + 1):
            pass

    try:
        error, took = _timed_error(download)
    finally:
        stop.set()
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, f"the deadline was 1 s away; the download took {took:.1f} s"


def test_tls_headers_trickled_past_the_deadline_are_cut_off_at_it(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """F1 over HTTPS, as the real API is reached: the TLS connection class gets the same timer."""
    from evolink_provider.simulator.tls import server_context, write_self_signed_certificate

    certificate, key = write_self_signed_certificate(tmp_path)
    context = server_context(certificate, key)
    hostile.httpd.socket = context.wrap_socket(hostile.httpd.socket, server_side=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    set_connection(monkeypatch, "evolink_hostile", hostile.url.replace("http://", "https://"))
    stop = threading.Event()
    hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    threading.Timer(7, stop.set).start()
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        stop.set()
    assert isinstance(error, EvolinkTransportError) and "in time" in str(error), error
    assert took < 3 and hostile.requests, took


def test_the_header_timer_fires_at_answer_until_and_reads_as_a_timeout(hostile: HostileServer) -> None:
    """A silent server behind a long socket timeout: the timer, not the socket, ends the wait, at the
    time given (not a second later), and the cut reads as a timeout, not as a server closing on us."""
    import requests

    from evolink_provider.hooks.connection import answer_until, sync_session

    stop = threading.Event()
    hostile.routes["/silent"] = lambda handler: stop.wait(8)
    started = time.monotonic()
    try:
        with pytest.raises(requests.ReadTimeout), answer_until(time.time() + 0.2):
            sync_session().get(f"{hostile.url}/silent", timeout=5)
    finally:
        stop.set()
    assert time.monotonic() - started < 0.95


def test_a_request_outside_answer_until_is_not_cut(hostile: HostileServer) -> None:
    """The deadline belongs to its block: a later request on the same thread, outside any, is not cut."""
    from evolink_provider.hooks.connection import answer_until, sync_session

    def slow(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(0.6)
        hostile_tests.send(handler, 200, b"{}")

    hostile.routes["/slow"] = slow
    with answer_until(time.time() + 0.2):
        pass
    assert sync_session().get(f"{hostile.url}/slow", timeout=5).status_code == 200


def test_no_header_timer_outlives_its_exchange(hostile: HostileServer) -> None:
    """Each exchange's timer is cancelled once its headers are in: none waits on (a thread each) for a
    deadline far away, and none shuts a kept-alive connection later."""
    from evolink_provider.hooks.connection import answer_until, sync_session

    hostile.json("/fast", {})
    session = sync_session()
    session.get(f"{hostile.url}/fast", timeout=5)  # the pool's first connection
    threads = threading.active_count()
    for _ in range(30):
        with answer_until(time.time() + 60):
            assert session.get(f"{hostile.url}/fast", timeout=5).status_code == 200
    settled_by = time.monotonic() + 5  # a cancelled timer's thread ends at once; a live one waits a minute
    while threading.active_count() > threads + 2 and time.monotonic() < settled_by:
        time.sleep(0.05)
    assert threading.active_count() <= threads + 2


def test_a_trickled_body_without_a_deadline_still_ends_within_one_read_timeout(
    hostile: HostileServer,
) -> None:
    """The 'answer within one read timeout' rule of _answer_until, sync and async, for the body."""
    stop = threading.Event()

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n{")
        handler.wfile.flush()
        while not stop.wait(0.3):
            handler.wfile.write(b" ")
            handler.wfile.flush()

    hostile.routes["/v1/tasks/"] = respond
    try:
        for poll in (sync_poll, async_poll):
            error, took = _timed_error(poll)
            assert "time ran out" in str(error), error
            assert took < 2 * (2 + 0.5) + 1, took  # two attempts of one 2 s read timeout each
    finally:
        stop.set()


# -- bodies: endless, wrong length, desync ----------------------------------------------------------------


@MODES
def test_an_endless_chunked_body_is_refused_in_bounded_memory(hostile: HostileServer, poll: Any) -> None:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b" " * 65536
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        for _ in range(4096):  # 256 MiB, never terminated
            handler.wfile.write(frame)
        handler.close_connection = True

    hostile.routes["/v1/tasks/"] = respond
    error, _ = _timed_error(poll)
    assert isinstance(error, EvolinkBadAnswerError) and "more than" in str(error), error
    assert _peak_rss_growth_mb(poll) < 64


@MODES
def test_a_content_length_longer_than_the_body_is_a_cut_answer_not_a_hang(
    hostile: HostileServer, poll: Any
) -> None:
    hostile.routes["/v1/tasks/"] = lambda handler: write_raw(
        handler, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + TASK_BODY, close=True
    )
    error, took = _timed_error(poll)
    assert isinstance(error, EvolinkTransportError) and error.retryable, error
    assert "cut short" in str(error) or "closed" in str(error), error
    assert took < 2


@MODES
def test_a_content_length_shorter_than_the_body_never_lets_the_rest_answer_the_next_poll(
    hostile: HostileServer, poll: Any
) -> None:
    """The first answer's Content-Length covers the task; behind it, in the same write, a second answer
    ('completed', a smuggled result link). The next poll must read its own answer."""
    smuggled = json.dumps(task(status="completed", progress=100, results=["https://s.example/v.mp4"]))
    answered: list[int] = []

    def respond(handler: BaseHTTPRequestHandler) -> None:
        extra = raw_answer(smuggled.encode()) if not answered else b""
        answered.append(1)
        write_raw(handler, raw_answer(TASK_BODY) + extra)

    hostile.routes["/v1/tasks/"] = respond
    if poll is sync_poll:
        hook = EvolinkHook("evolink_hostile")
        first, second = hook.get_task(TASK_ID), hook.get_task(TASK_ID)  # one session: one pool
    else:

        async def two() -> list[dict[str, Any]]:
            try:
                return [await EvolinkHook("evolink_hostile").aget_task(TASK_ID) for _ in range(2)]
            finally:
                await aclose_async_clients()

        first, second = asyncio.run(two())
    assert (first["status"], second["status"]) == ("processing", "processing")
    assert len(answered) == 2


def test_sync_an_answer_sent_to_an_idle_keep_alive_connection_is_not_the_next_answer(
    hostile: HostileServer,
) -> None:
    smuggled = json.dumps(task(status="completed", progress=100, results=["https://s.example/v.mp4"]))
    answered: list[int] = []
    smuggled_sent = threading.Event()

    def respond(handler: BaseHTTPRequestHandler) -> None:
        answered.append(1)  # before the answer: the client may read it before this thread goes on
        send(handler, 200, TASK_BODY)
        if len(answered) == 1:
            time.sleep(0.3)  # the client has parked the connection in its pool
            write_raw(handler, raw_answer(smuggled.encode()))
            smuggled_sent.set()

    hostile.routes["/v1/tasks/"] = respond
    hook = EvolinkHook("evolink_hostile")
    first = hook.get_task(TASK_ID)
    assert smuggled_sent.wait(10)
    time.sleep(0.2)  # the bytes have reached the parked connection's socket
    second = hook.get_task(TASK_ID)
    assert (first["status"], second["status"]) == ("processing", "processing")
    assert len(answered) == 2


# -- 1xx / 101 --------------------------------------------------------------------------------------------


def test_sync_an_interim_103_before_the_answer_is_a_retryable_error_on_a_dropped_connection(
    hostile: HostileServer,
) -> None:
    """http.client takes any 1xx but 100 for the final answer: a retryable transport error, whose
    connection (holding the real answer) is dropped, never a final configuration error."""
    hostile.routes["/v1/tasks/"] = lambda handler: write_raw(
        handler, b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + raw_answer(TASK_BODY)
    )
    with pytest.raises(EvolinkTransportError) as raised:
        sync_poll()
    assert raised.value.retryable and "interim" in str(raised.value)
    hostile.json("/v1/tasks/", task())
    assert sync_poll()["id"] == TASK_ID  # the next call reads its own answer, not the one left behind


def test_async_an_interim_103_before_the_answer_is_skipped(hostile: HostileServer) -> None:
    hostile.routes["/v1/tasks/"] = lambda handler: write_raw(
        handler, b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + raw_answer(TASK_BODY)
    )
    assert async_poll()["id"] == TASK_ID


@MODES
def test_a_101_switching_protocols_is_an_error_and_its_connection_is_not_reused(
    hostile: HostileServer, poll: Any
) -> None:
    calls: list[int] = []

    def respond(handler: BaseHTTPRequestHandler) -> None:
        calls.append(1)
        if len(calls) == 1:
            # After the 101 the bytes belong to 'another protocol': here, a forged HTTP answer.
            forged = raw_answer(
                json.dumps(task(status="completed", progress=100, results=["https://s.x/v"])).encode()
            )
            write_raw(
                handler, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
            )
            time.sleep(0.2)
            write_raw(handler, forged)
            time.sleep(0.5)
            handler.close_connection = True
        else:
            send(handler, 200, TASK_BODY)

    hostile.routes["/v1/tasks/"] = respond
    if poll is sync_poll:  # an interim answer to http.client: retried on a new connection, which answers
        assert poll()["status"] == "processing" and len(calls) == 2
        return
    error, took = _timed_error(poll)
    assert "101" in str(error) and KEY not in _every_text(error), error
    assert took < 5
    assert poll()["status"] == "processing"


# -- headers: huge, many, injected, the key echoed ----------------------------------------------------------


@MODES
def test_endless_response_headers_end_as_a_transport_error_in_bounded_memory(
    hostile: HostileServer, poll: Any
) -> None:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
        line = b"X-Pad: " + b"a" * 100 + b"\r\n"
        for _ in range(200_000):  # 21 MB of headers, never ended
            handler.wfile.write(line)
        handler.close_connection = True

    hostile.routes["/v1/tasks/"] = respond
    error, _ = _timed_error(lambda: poll(deadline=time.time() + 3))
    assert isinstance(error, EvolinkTransportError), error
    assert _peak_rss_growth_mb(lambda: poll(deadline=time.time() + 3)) < 64


@MODES
def test_one_huge_header_line_is_a_transport_error(hostile: HostileServer, poll: Any) -> None:
    hostile.routes["/v1/tasks/"] = lambda handler: write_raw(
        handler, raw_answer(TASK_BODY, extra="X-Big: " + "b" * 200_000 + "\r\n"), close=True
    )
    error, _ = _timed_error(poll)
    assert isinstance(error, EvolinkTransportError) and KEY not in _every_text(error), error


@MODES
def test_the_key_echoed_in_reason_phrase_headers_and_location_reaches_no_text(
    hostile: HostileServer, poll: Any, caplog: pytest.LogCaptureFixture
) -> None:
    answers = [
        raw_answer(
            b'{"x": 1}', status=f"500 {KEY}", extra=f"X-Request-Id: {KEY}\r\nX-Echo: Bearer {KEY}\r\n"
        ),
        raw_answer(b"", status=f"302 {KEY}", extra=f"Location: https://evil.example/{KEY}?k={KEY}\r\n"),
        raw_answer(b"<html>" + KEY.encode(), extra=f"Request-Id: {KEY}\r\n"),
        raw_answer(b"not json", status=f"999 {KEY}"),
    ]
    for answer in answers:
        hostile.routes["/v1/tasks/"] = lambda handler, answer=answer: write_raw(handler, answer)
        with caplog.at_level(logging.DEBUG):
            error, _ = _timed_error(poll)
        assert KEY not in _every_text(error), error
    assert KEY not in caplog.text
    assert all(KEY not in repr(record.args) for record in caplog.records)


def test_sync_a_request_id_header_with_control_characters_is_not_shown_raw(hostile: HostileServer) -> None:
    hostile.routes["/v1/tasks/"] = lambda handler: write_raw(
        handler, raw_answer(b"<html>", extra="X-Request-Id: a\x1b[31mred\x1b[0m\r\n")
    )
    error, _ = _timed_error(sync_poll)
    assert "\x1b" not in str(error), repr(str(error))


# -- bodies: encodings, nesting ----------------------------------------------------------------------------


def _utf16(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-16")


def test_the_key_echoed_in_a_utf16_body_reaches_no_error_log_or_event(
    hostile: HostileServer, caplog: pytest.LogCaptureFixture
) -> None:
    hostile.json("/v1/tasks/", _utf16({"error": {"code": "x", "message": f"bad key {KEY}"}}), status=502)
    with caplog.at_level(logging.DEBUG):
        for poll in (sync_poll, async_poll):
            error, _ = _timed_error(poll)
            assert KEY not in _every_text(error), error
        failed = task(status="failed", error={"code": "service_error", "message": f"upstream got {KEY}"})
        hostile.json("/v1/tasks/", _utf16(failed))
        (event,) = run_trigger(
            EvolinkTaskTrigger(TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 30)
        )
    assert KEY not in json.dumps(event) and KEY not in caplog.text


@MODES
@pytest.mark.parametrize(
    "body",
    [
        b'{"id": "' + TASK_ID.encode() + b'", "status": "processing\xff\xfe"}',
        b"\xef\xbb\xbf" + TASK_BODY,
        b'{"a": ' * 200_000 + b"1" + b"}" * 200_000,
        b'{"id": "x", "id": "' + TASK_ID.encode() + b'"}' + b" " * 10,
    ],
    ids=["latin1-bytes", "utf8-bom", "deep-objects", "duplicate-keys"],
)
def test_odd_json_bytes_end_as_a_bad_answer_or_the_task(
    hostile: HostileServer, poll: Any, body: bytes
) -> None:
    hostile.json("/v1/tasks/", body)
    try:
        answer = poll()
    except EvolinkBadAnswerError:
        return
    assert answer["id"] == TASK_ID


@MODES
def test_a_deeply_nested_error_body_is_still_a_typed_error(hostile: HostileServer, poll: Any) -> None:
    hostile.json("/v1/tasks/", b"[" * 100_000 + b"]" * 100_000, status=503)
    error, _ = _timed_error(poll)
    assert "503" in str(error) and len(str(error)) < 1000, error


# -- uploads (requests, MultipartBody) ----------------------------------------------------------------------


class GrowingFile(io.BytesIO):
    """A file another process appends to while it is uploaded (a log, a render still being written)."""

    def __init__(self, data: bytes, tail: bytes) -> None:
        super().__init__(data)
        self.tail = tail
        self.grown = False

    def read(self, size: int | None = -1) -> bytes:
        if not self.grown and self.tell() > 0:
            self.grown = True
            position = self.tell()
            self.seek(0, os.SEEK_END)
            self.write(self.tail)
            self.seek(position)
        return super().read(size)


def test_upload_file_never_sends_more_than_its_content_length(hostile: HostileServer) -> None:
    hostile.json("/api/v1/files/upload/stream", {"success": True, "data": {"file_url": "https://f.x/1.png"}})
    # The server reads Content-Length bytes: the grown bytes push the multipart's 40-byte closing boundary
    # out of the body, and what follows it is read as the connection's next request.
    smuggled = b"x" * 40 + b"GET /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    stream = GrowingFile(b"\x89PNG" + b"\x00" * 70_000, smuggled)
    with pytest.raises(EvolinkError, match="grew"):  # refused, as CheckedStream does: never sent cut short
        EvolinkHook("evolink_hostile").upload_file(stream, "a.png", "image/png")
    time.sleep(0.3)
    assert stream.grown
    assert ("GET", "/smuggled") not in hostile.requests, hostile.requests


def test_a_checked_input_that_grows_mid_upload_is_refused_and_never_stored(
    hostile: HostileServer, tmp_path: Path
) -> None:
    """The operators' path: CheckedStream bounds the body, urllib3 drops the half-sent connection."""
    hostile.json("/api/v1/files/upload/stream", {"success": True, "data": {"file_url": "https://f.x/1.png"}})
    path = tmp_path / "grow.png"
    data = b"\x89PNG" + b"\x00" * 70_000
    path.write_bytes(data)

    def refuse(rule: str) -> EvolinkInputRefusedError:
        return EvolinkInputRefusedError("image_urls[0]", str(path), rule)

    with path.open("rb") as raw:
        stream = GrowingFile(raw.read(), b"more")
    with pytest.raises(EvolinkInputRefusedError, match="grow"):
        EvolinkHook("evolink_hostile").upload_file(
            CheckedStream(stream, len(data), refuse),  # type: ignore[arg-type]
            "a.png",
            "image/png",
        )
    time.sleep(0.3)
    # The half-sent request was dropped: the multipart never reached its closing boundary.
    assert all(not body.endswith(b"--\r\n") for body in hostile.bodies), [b[-50:] for b in hostile.bodies]
    assert all(
        len(body) < int(h["Content-Length"]) for body, h in zip(hostile.bodies, hostile.headers, strict=True)
    )


def test_a_server_closing_mid_upload_is_not_retried_and_shows_no_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted.append(connection.recv(1000))  # the request line, headers, a little body
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            connection.close()  # a reset, mid-upload

    threading.Thread(target=serve, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    set_connection(monkeypatch, "evolink_hostile", url, max_retries=3)
    big = io.BytesIO(b"\x89PNG" + b"\x00" * (8 << 20))
    with caplog.at_level(logging.DEBUG):
        error, _ = _timed_error(lambda: EvolinkHook("evolink_hostile").upload_file(big, "a.png", "image/png"))
    assert isinstance(error, EvolinkTransportError) and error.request_sent, error
    assert KEY not in _every_text(error) and KEY not in caplog.text
    listener.close()
    assert len(accepted) == 1, accepted  # uploads are not idempotent: sent once


# -- ~/.netrc ------------------------------------------------------------------------------------------------


def test_a_netrc_entry_changes_no_sync_request(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    hostile.json("/v1/tasks/", task())
    hostile.file("/media/", MP4, "video/mp4")
    hook = EvolinkHook("evolink_hostile")
    hook.get_task(TASK_ID)
    store_results(hook, completed(f"{hostile.url}/media/v.mp4"), str(tmp_path / "out"))
    api, media = hostile.headers
    assert api.get("Authorization", "").startswith("Bearer "), api.get("Authorization")
    assert "Authorization" not in media, media.get("Authorization")


# -- the trigger --------------------------------------------------------------------------------------------


def test_a_trigger_facing_a_slowloris_fires_timeout_by_its_end_time(hostile: HostileServer) -> None:
    stop = threading.Event()
    hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    started = time.monotonic()
    try:
        events = run_trigger(
            EvolinkTaskTrigger(TASK_ID, "evolink_hostile", poll_interval=0.01, end_time=time.time() + 1.5)
        )
    finally:
        stop.set()
    assert [event["status"] for event in events] in (["timeout"], ["error"]), events
    assert time.monotonic() - started < 4
    assert KEY not in json.dumps(events)


def test_a_poll_that_reaches_the_request_with_no_time_left_still_ends(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evolink_provider.hooks import transport

    stop = threading.Event()
    hostile.routes["/v1/tasks/"] = lambda handler: stop.wait(10)
    build = transport._loop_client

    async def slow_build() -> Any:  # the first poll of a loop: aiohttp imported in a thread, a busy host
        client = await build()
        await asyncio.sleep(0.05)
        return client

    async def poll() -> None:
        from evolink_provider.hooks.connection import build_request

        hook = EvolinkHook("evolink_hostile")
        settings = await hook.aget_settings()
        request = build_request(settings, "GET", f"/v1/tasks/{TASK_ID}")
        monkeypatch.setattr(transport, "_loop_client", slow_build)
        try:
            once = transport._asend_once(request, settings.timeouts, time.time() + 0.02)
            await asyncio.wait_for(once, timeout=3)
        except EvolinkTransportError:
            return  # the exchange ended by itself, out of time
        except asyncio.TimeoutError:
            pytest.fail("the exchange was still waiting 3 s after its deadline")
        finally:
            await aclose_async_clients()

    try:
        asyncio.run(poll())
    finally:
        stop.set()
