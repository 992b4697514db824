"""Red team 20: d6b46c5 (a cheaper poll path), 109bc01 (the trigger's sleep written out, the reporter's
snapshot) and 664610d (a timer shuts a sync exchange's socket at its deadline while its headers trickle).

A passing test is an attack that held; ``xfail(strict=True)`` marked a finding (F<n>) until it was fixed.
Findings, all fixed: F1/F2 (pre-existing, low): printable lets U+2028/U+2029 and lone surrogates through;
F3: an https API through an http proxy, the proxy's CONNECT answer trickled, holds a sync call past its
deadline (read while connecting, no timer); F4: through an https:// proxy the timer's
socket.socket.shutdown meets urllib3's SSLTransport (TypeError in the timer thread): no cut at all."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import unicodedata
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

import tests.test_hostile as hostile_tests
from evolink_provider.answers import MAX_NESTING_DEPTH, loads_strict
from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
    printable,
)
from evolink_provider.hooks.connection import answer_until, settings_from_connection, sync_session
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import aclose_async_clients
from evolink_provider.polling import ProgressReporter
from evolink_provider.simulator.tls import server_context, write_self_signed_certificate
from evolink_provider.storage import store_results
from evolink_provider.triggers.evolink import EvolinkTaskTrigger
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    _every_text,
    completed,
    files_under,
    run_trigger,
    send,
    set_connection,
    task,
)
from tests.test_review_http import _timed_error, _trickled_headers, sync_poll

KEY = "sk-hostile-test-key-0123"
SUBMIT = "/v1/videos/generations"
IDEMPOTENCY_KEY = "redteam20-submission-key-0001"

#: test_hostile's fixture: the connection ``evolink_hostile`` points at a fresh HostileServer.
hostile = hostile_tests.hostile


def _timers() -> int:
    return sum(isinstance(thread, threading.Timer) for thread in threading.enumerate())


@pytest.fixture
def tls_hostile(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[HostileServer]:
    """The hostile server behind TLS (a self-signed certificate the client is told to trust)."""
    cert, key = write_self_signed_certificate(tmp_path / "tls")
    hostile.httpd.socket = server_context(cert, key).wrap_socket(
        hostile.httpd.socket, server_side=True, do_handshake_on_connect=False
    )
    hostile.url = hostile.url.replace("http://", "https://")
    set_connection(monkeypatch, "evolink_hostile", hostile.url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    yield hostile


def _marked(progress: int) -> bytes:
    return json.dumps(task(progress=progress)).encode()


# -- 664610d: the timer over the header phase ----------------------------------------------------------


def test_tls_headers_trickled_past_the_deadline_end_at_it_without_the_key(tls_hostile: HostileServer) -> None:
    stop = threading.Event()
    tls_hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    threading.Timer(7, stop.set).start()
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        stop.set()
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, f"the deadline was 1 s away; the call took {took:.1f} s"
    assert KEY not in _every_text(error)
    assert tls_hostile.requests, "the attack never reached the server"


@pytest.mark.parametrize("scheme", ["http", "tls"])
def test_after_a_cut_exchange_the_next_call_on_the_same_hook_reads_its_own_answer(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheme: str
) -> None:
    """The cut exchange's answer, completed late by the server, never answers the next call."""
    if scheme == "tls":
        cert, key = write_self_signed_certificate(tmp_path / "tls")
        hostile.httpd.socket = server_context(cert, key).wrap_socket(
            hostile.httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        hostile.url = hostile.url.replace("http://", "https://")
        set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=0)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    else:
        set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=0)
    calls = iter(range(1000))

    def answer(handler: BaseHTTPRequestHandler) -> None:
        number = next(calls)
        if number == 0:  # headers begun, then the rest of the first answer after the cut
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            handler.wfile.flush()
            time.sleep(1.5)
            try:
                handler.wfile.write(b"a\r\n" + _stale_answer()[len(b"HTTP/1.1 200 OK\r\n") :])
                handler.wfile.flush()
            except OSError:
                pass
            return
        send(handler, 200, _marked(number))

    hostile.routes["/v1/tasks/"] = answer
    hook = EvolinkHook("evolink_hostile")
    with pytest.raises(EvolinkTransportError):
        hook.get_task(TASK_ID, deadline=time.time() + 0.5)
    time.sleep(1.3)  # the stale answer is sent (to whatever still listens)
    for number in (1, 2, 3):
        assert hook.get_task(TASK_ID)["progress"] == number


def _stale_answer() -> bytes:
    body = json.dumps(task(progress=99, status="completed", results=["https://stale.example/v.mp4"]))
    return (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def test_answers_landing_around_the_deadline_are_each_the_right_one_or_an_error(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer firing just before, at or just after complete headers: every call either fails as a
    transport error or returns the answer to its own request (progress = the request's number)."""
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=0)
    numbers = iter(range(1000))
    lag = iter([0.15 + 0.004 * (i % 20 - 10) for i in range(1000)])

    def answer(handler: BaseHTTPRequestHandler) -> None:
        number = next(numbers)
        time.sleep(next(lag))
        send(handler, 200, _marked(number % 101))

    hostile.routes["/v1/tasks/"] = answer
    hook = EvolinkHook("evolink_hostile")
    outcomes = []
    for number in range(40):
        try:
            got = hook.get_task(TASK_ID, deadline=time.time() + 0.15)["progress"]
        except EvolinkTransportError:
            outcomes.append("cut")
            continue
        except EvolinkError as error:  # answer_out_of_time and the like: still no answer handed on
            outcomes.append(type(error).__name__)
            continue
        assert got == number % 101, f"call {number} was handed answer {got}"
        outcomes.append("ok")
    assert set(outcomes) <= {"ok", "cut", "EvolinkWaitTimeoutError"}, outcomes


def test_timer_threads_do_not_pile_up_over_many_calls(hostile: HostileServer) -> None:
    hostile.json("/v1/tasks/", task())
    hook = EvolinkHook("evolink_hostile")
    before_threads, before_timers = threading.active_count(), _timers()
    for _ in range(200):
        hook.get_task(TASK_ID, deadline=time.time() + 30)
    time.sleep(0.5)
    assert _timers() <= before_timers + 1
    assert threading.active_count() <= before_threads + 3  # the server's connection threads at most


@pytest.mark.parametrize("scheme", ["http", "tls"])
def test_a_submission_cut_by_the_timer_is_an_unknown_outcome_naming_its_key(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scheme: str
) -> None:
    if scheme == "tls":
        cert, key = write_self_signed_certificate(tmp_path / "tls")
        hostile.httpd.socket = server_context(cert, key).wrap_socket(
            hostile.httpd.socket, server_side=True, do_handshake_on_connect=False
        )
        hostile.url = hostile.url.replace("http://", "https://")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    set_connection(monkeypatch, "evolink_hostile", hostile.url, read_timeout=1)
    stop = threading.Event()
    hostile.routes[SUBMIT] = _trickled_headers(stop)
    threading.Timer(9, stop.set).start()
    try:
        error, took = _timed_error(
            lambda: EvolinkHook("evolink_hostile").create_video_task(
                {"model": "seedance-2.0-fast-text-to-video", "prompt": "a cat"}, IDEMPOTENCY_KEY
            )
        )
    finally:
        stop.set()
    assert isinstance(error, EvolinkSubmissionUnknownError), error
    assert error.idempotency_key == IDEMPOTENCY_KEY and IDEMPOTENCY_KEY in str(error)
    assert KEY not in _every_text(error)
    assert took < 5
    assert [path for _, path in hostile.requests] == [SUBMIT, SUBMIT]  # retried with the same key
    assert {headers.get("Idempotency-Key") for headers in hostile.headers} == {IDEMPOTENCY_KEY}


def test_a_result_host_trickling_its_headers_stores_nothing(hostile: HostileServer, tmp_path: Path) -> None:
    stop = threading.Event()
    hostile.routes["/media/"] = _trickled_headers(stop)
    threading.Timer(7, stop.set).start()
    try:
        error, took = _timed_error(
            lambda: store_results(
                EvolinkHook("evolink_hostile"),
                completed(f"{hostile.url}/media/v.mp4"),
                str(tmp_path),
                deadline=time.time() + 1,
            )
        )
    finally:
        stop.set()
    assert took < 4
    assert KEY not in _every_text(error)
    assert files_under(tmp_path) == []


def test_a_result_host_cutting_its_own_headers_short_stores_nothing(
    hostile: HostileServer, tmp_path: Path
) -> None:
    """Headers cut short by the server (not the timer) parse as a body-less answer read to the close."""

    def cut(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nX-Half: ")
        handler.wfile.flush()
        handler.close_connection = True

    hostile.routes["/media/"] = cut
    with pytest.raises(EvolinkError):
        store_results(EvolinkHook("evolink_hostile"), completed(f"{hostile.url}/media/v.mp4"), str(tmp_path))
    assert files_under(tmp_path) == []


def test_a_timer_cut_leaves_no_deadline_behind_for_later_exchanges_of_the_thread(
    hostile: HostileServer,
) -> None:
    """answer_until is reset on the way out, also when the exchange failed: a later plain exchange of the
    same thread (no answer_until) is not cut by the old deadline."""
    stop = threading.Event()
    hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    try:
        with pytest.raises(EvolinkTransportError):
            sync_poll(deadline=time.time() + 0.5)
    finally:
        stop.set()

    def slow(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(0.6)
        send(handler, 200, b"{}")

    hostile.routes["/slow"] = slow
    session = sync_session()
    assert session.get(f"{hostile.url}/slow", timeout=5).status_code == 200
    with answer_until(time.time() + 5):
        assert session.get(f"{hostile.url}/slow", timeout=5).status_code == 200


# -- 109bc01: the trigger's sleep and the reporter's snapshot -------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_status_change_moving_percentage_and_between_polls() -> None:
    clock = _Clock()
    reporter = ProgressReporter(TASK_ID, started_at=clock.now, clock=clock)
    assert "pending" in (reporter.update(task(status="pending", progress=None)) or "")
    clock.now += 5
    assert "processing 10%" in (reporter.update(task(progress=10)) or "")  # status change: at once
    clock.now += 5
    assert reporter.update(task(progress=20)) is None  # moved, but within PROGRESS_MIN_GAP
    clock.now += 20
    assert "processing 30%" in (reporter.update(task(progress=30)) or "")
    assert reporter.next_pause(clock.now + 500) == pytest.approx(60)  # the next line between polls
    clock.now += 60
    line = reporter.between_polls()
    assert line is not None and "30%" in line and "as of the poll" in line
    clock.now += 1
    assert "completed" in (reporter.update(task(status="completed", progress=100)) or "")
    assert reporter.next_pause(clock.now + 5) == pytest.approx(5)  # no more lines once finished


@pytest.mark.parametrize(
    "task_info",
    [
        {"estimated_time": "90"},
        {"estimated_time": 1e308},
        {"estimated_time": -5},
        {"estimated_time": True},
        {"estimated_time": {"nested": [1, 2, {"x": 3}]}},
        {"estimated_time": [1e308]},
        {"estimated_time": 10**300},
        {"nested": {"deep": {"deeper": 1}}},
    ],
)
def test_hostile_task_info_reaches_the_snapshot_without_a_crash(task_info: dict[str, Any]) -> None:
    clock = _Clock()
    reporter = ProgressReporter(TASK_ID, started_at=clock.now, clock=clock)
    for step in range(4):
        clock.now += 61
        line = reporter.update(task(progress=step * 10, task_info=task_info))
        assert line is not None
        assert "\n" not in line and "{" not in line
        assert reporter.between_polls() is None
        clock.now += 61
        assert reporter.between_polls() is not None
    snapshot = reporter._task
    assert set(snapshot) == {"status", "progress", "task_info"}
    assert all(not isinstance(value, (list, dict)) for value in snapshot["task_info"].values())


@pytest.mark.parametrize(
    "answer",
    [
        task(task_info={"estimated_time": 1e308}),
        task(task_info={"estimated_time": {"a": [1, {"b": 2}]}}),
        task(task_info={"estimated_time": 10**300}),
        task(progress=100.0, task_info={"estimated_time": 0.000001}),
        task(status="pending", progress=None, task_info={"estimated_time": "soon"}),
        task(status="mystery\x1b[31m", progress=0),
    ],
)
def test_the_trigger_survives_hostile_task_info_and_times_out_at_end_time(
    hostile: HostileServer, answer: dict[str, Any]
) -> None:
    hostile.json("/v1/tasks/", answer)
    began = time.monotonic()
    events = run_trigger(
        EvolinkTaskTrigger(TASK_ID, "evolink_hostile", poll_interval=0.05, end_time=time.time() + 1.0)
    )
    assert [event["status"] for event in events] == ["timeout"]
    assert time.monotonic() - began < 3


def test_the_trigger_retries_failures_recovers_then_gives_up(hostile: HostileServer) -> None:
    answers = iter([500, 500, 200, 500, 500, 500, 500, 500, 500])

    def respond(handler: BaseHTTPRequestHandler) -> None:
        status = next(answers, 500)
        body = _marked(50) if status == 200 else b'{"error": {"code": "internal", "message": "x"}}'
        send(handler, status, body)

    hostile.routes["/v1/tasks/"] = respond
    events = run_trigger(
        EvolinkTaskTrigger(
            TASK_ID,
            "evolink_hostile",
            poll_interval=0.01,
            max_poll_interval=0.05,
            end_time=time.time() + 30,
            max_poll_failures=3,
        )
    )
    assert [event["status"] for event in events] == ["error"]


@pytest.mark.parametrize("offset", [-100.0, 0.6])
def test_first_poll_at_in_the_past_polls_at_once_in_the_future_waits(
    hostile: HostileServer, offset: float
) -> None:
    seen: list[float] = []

    def respond(handler: BaseHTTPRequestHandler) -> None:
        seen.append(time.time())
        send(
            handler,
            200,
            json.dumps(task(status="completed", progress=100, results=["https://x.example/v.mp4"])).encode(),
        )

    hostile.routes["/v1/tasks/"] = respond
    began = time.time()
    events = run_trigger(
        EvolinkTaskTrigger(
            TASK_ID, "evolink_hostile", poll_interval=0.05, end_time=began + 30, first_poll_at=began + offset
        )
    )
    assert [event["status"] for event in events] == ["success"]
    waited = seen[0] - began
    assert (waited < 0.4) if offset < 0 else (0.55 <= waited < 1.5), waited


def test_end_time_reached_while_sleeping_is_a_timeout_not_a_late_poll(hostile: HostileServer) -> None:
    hostile.json("/v1/tasks/", task(progress=1, task_info={"estimated_time": 3600}))
    began = time.monotonic()
    events = run_trigger(
        EvolinkTaskTrigger(
            TASK_ID, "evolink_hostile", poll_interval=5, max_poll_interval=60, end_time=time.time() + 1.5
        )
    )
    assert [event["status"] for event in events] == ["timeout"]
    assert time.monotonic() - began < 3.5


# -- d6b46c5: printable's fast path, loads_strict's bracket count, the cached task read ------------------


def _printable_slow(text: object) -> str:  # 9037a2e's printable, with F1/F2's categories
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs")
        else char
        for char in str(text)
    )


def test_printable_fast_path_is_the_slow_function_on_every_code_point() -> None:
    differ = [
        hex(point)
        for point in range(0x110000)
        if printable("a" + chr(point) + "b") != _printable_slow("a" + chr(point) + "b")
    ]
    assert differ == []
    for char in ("\x1b", "\u202e", "\u200b", "\u0085", "\x7f", "\ufeff", "\u2066", "\U000e0001"):
        assert char not in printable(f"ok{char}ok")


# F1 (pre-existing, low; fixed): U+2028/U+2029 are escaped (Zl/Zp)
def test_printable_escapes_unicode_line_separators() -> None:
    shown = printable("processing\u2028[2026-12-04] ERROR forged line\u2029")
    assert "\u2028" not in shown and "\u2029" not in shown
    assert len(shown.splitlines()) == 1


# F2 (pre-existing, low; fixed): lone surrogates are escaped (Cs)
def test_printable_leaves_no_lone_surrogate() -> None:
    shown = printable(loads_strict(b'{"status": "x\\ud800y"}')["status"])
    shown.encode("utf-8")


@pytest.mark.parametrize(
    "text",
    [
        "[" * (MAX_NESTING_DEPTH + 1) + "]" * (MAX_NESTING_DEPTH + 1),
        '{"a":' * (MAX_NESTING_DEPTH + 1) + "1" + "}" * (MAX_NESTING_DEPTH + 1),
        "[ \n\t" * (MAX_NESTING_DEPTH + 1) + "]" * (MAX_NESTING_DEPTH + 1),
        '{"\\u005b\\u007b":' * (MAX_NESTING_DEPTH + 1) + "1" + "}" * (MAX_NESTING_DEPTH + 1),
        "[" * MAX_NESTING_DEPTH + '{"a": 1}' + "]" * MAX_NESTING_DEPTH,
    ],
)
def test_nesting_one_past_the_limit_is_still_refused(text: str) -> None:
    for content in (text, text.encode()):
        with pytest.raises(ValueError, match="nested"):
            loads_strict(content)


def test_nesting_at_the_limit_is_taken_and_brackets_in_strings_change_nothing() -> None:
    at_limit = "[" * MAX_NESTING_DEPTH + "]" * MAX_NESTING_DEPTH
    assert loads_strict(at_limit)
    padded = '{"pad": "' + "[{" * 100 + '", "v": ' + at_limit + "}"
    with pytest.raises(ValueError, match="nested"):  # the object adds a level: 33
        loads_strict(padded)
    assert loads_strict('{"pad": "' + "[{" * 100 + '"}')["pad"].startswith("[{")


def test_the_kept_task_read_follows_the_task_id_and_the_settings(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from airflow.sdk import Connection

    other = TASK_ID.replace("abcd1234", "ffff0000")
    hostile.routes["/v1/tasks/"] = lambda handler: send(
        handler, 200, json.dumps(task(id=handler.path.rsplit("/", 1)[1])).encode()
    )
    hook = EvolinkHook("evolink_hostile")

    def settings(key: str) -> Any:
        return settings_from_connection(
            Connection(conn_id="evolink_hostile", conn_type="evolink", password=key, host=hostile.url)
        )

    first, second = settings("sk-first-key-000000001"), settings("sk-second-key-00000002")

    async def reads() -> list[str]:
        try:
            return [
                (await hook._aread_task(s, task_id))["id"]
                for s, task_id in [
                    (first, TASK_ID),
                    (first, other),
                    (first, TASK_ID),
                    (second, TASK_ID),
                    (first, TASK_ID),
                ]
            ]
        finally:
            await aclose_async_clients()

    assert asyncio.run(reads()) == [TASK_ID, other, TASK_ID, TASK_ID, TASK_ID]
    assert [path.rsplit("/", 1)[1] for _, path in hostile.requests] == [
        TASK_ID,
        other,
        TASK_ID,
        TASK_ID,
        TASK_ID,
    ]
    assert [headers["Authorization"][-2:] for headers in hostile.headers] == ["01", "01", "01", "02", "01"]


# -- 664610d: proxies --------------------------------------------------------------------------------


class _RawProxy:
    """A forward proxy on loopback for CONNECT: ``answer`` gets the client socket after the request head
    (optionally wrapped in TLS first: an ``https://`` proxy)."""

    def __init__(self, answer: Any, context: ssl.SSLContext | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if context else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answer, self.context, self.heads = answer, context, []
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(client,), daemon=True).start()

    def _one(self, client: socket.socket) -> None:
        try:
            if self.context is not None:
                client = self.context.wrap_socket(client, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.heads.append(head.split(b"\r\n", 1)[0].decode())
            self.answer(self, client)
        except OSError:
            pass
        finally:
            client.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


def _trickle_to(proxy: _RawProxy, client: socket.socket, start: bytes) -> None:
    client.sendall(start)
    while not proxy.stop.wait(0.3):
        client.sendall(b"a")


def _relay_to(port: int) -> Any:
    def relay(proxy: _RawProxy, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(source: Any, sink: Any) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)
        upstream.close()

    return relay


def _use_proxy(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", url)
    monkeypatch.setenv("HTTP_PROXY", url)


# F3 (fixed): the timer covers connect() too (the CONNECT answer, the TLS handshake)
def test_a_connect_answer_trickled_by_the_proxy_ends_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _RawProxy(lambda p, c: _trickle_to(p, c, b"HTTP/1.1 200 Connection established\r\nX-Slow: "))
    set_connection(monkeypatch, "evolink_hostile", "https://evolink.invalid", max_retries=0)
    _use_proxy(monkeypatch, proxy.url)
    threading.Timer(8, proxy.stop.set).start()
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        proxy.close()
    assert proxy.heads and proxy.heads[0].startswith("CONNECT evolink.invalid:443")
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, f"the deadline was 1 s away; the call took {took:.1f} s"


def test_tls_headers_trickled_through_an_http_connect_tunnel_end_at_the_deadline(
    tls_hostile: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop = threading.Event()
    tls_hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    proxy = _RawProxy(_relay_to(tls_hostile.httpd.server_address[1]))
    set_connection(monkeypatch, "evolink_hostile", tls_hostile.url, max_retries=0)
    _use_proxy(monkeypatch, proxy.url)
    threading.Timer(8, stop.set).start()
    threading.Timer(8, proxy.stop.set).start()
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        stop.set()
        proxy.close()
    assert proxy.heads and proxy.heads[0].startswith("CONNECT ")
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, f"the deadline was 1 s away; the call took {took:.1f} s"


# F4 (fixed): the timer reaches the socket under urllib3's SSLTransport
def test_tls_headers_trickled_through_an_https_proxy_end_at_the_deadline(
    tls_hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stop = threading.Event()
    tls_hostile.routes["/v1/tasks/"] = _trickled_headers(stop)
    cert, key = tmp_path / "tls" / "simulator.pem", tmp_path / "tls" / "simulator.key"  # the server's
    proxy = _RawProxy(_relay_to(tls_hostile.httpd.server_address[1]), server_context(cert, key))
    set_connection(monkeypatch, "evolink_hostile", tls_hostile.url, max_retries=0)
    _use_proxy(monkeypatch, proxy.url)
    unraised: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", unraised.append)
    threading.Timer(8, stop.set).start()
    threading.Timer(8, proxy.stop.set).start()
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        stop.set()
        proxy.close()
    assert proxy.heads and proxy.heads[0].startswith("CONNECT ")
    assert isinstance(error, EvolinkTransportError), error
    assert "SSL" not in str(error) and "certificate" not in str(error), error
    assert not unraised, [str(args.exc_value) for args in unraised]
    assert took < 3, f"the deadline was 1 s away; the call took {took:.1f} s"
