"""Red team 21: eb146e6's connect() coverage (the sync header timer over a proxy's CONNECT answer and the
TLS handshake, the socket found at fire time).

A passing test is an attack that held. Findings, all fixed: the timer never cuts a TLS handshake (at fire
time ``connection.sock`` is the plain socket that ``ssl.wrap_socket`` has already detached, and the TLS
socket is assigned only after the handshake), nor a TCP connect (``sock`` still None).
F1: a download's blackholed TCP connect ran its full connect_timeout past the deadline; F2: a download's
stalled TLS handshake (direct or through a CONNECT tunnel) likewise (both: a download's connect timeout is
capped at the time left); F3: an API call whose proxy answers CONNECT just before the deadline, then whose
TLS handshake stalls, ended a whole socket timeout late (the handshake's socket timeout is now set from the
deadline as it starts: ``DeadlineSSLSocket``)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import tests.test_hostile as hostile_tests
import tests.test_redteam20 as redteam20
from evolink_provider.exceptions import EvolinkError, EvolinkSubmissionUnknownError, EvolinkTransportError
from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.simulator.tls import server_context, write_self_signed_certificate
from evolink_provider.storage import store_results
from tests.test_hostile import (
    TASK_ID,
    HostileServer,
    _every_text,
    completed,
    files_under,
    send,
    set_connection,
    task,
)
from tests.test_redteam20 import _RawProxy, _relay_to, _use_proxy
from tests.test_review_http import _timed_error, sync_poll

KEY = "sk-hostile-test-key-0123"
IDEMPOTENCY_KEY = "redteam21-submission-key-0001"
PAYLOAD = {"model": "seedance-2.0-fast-text-to-video", "prompt": "a cat"}

hostile = hostile_tests.hostile
tls_hostile = redteam20.tls_hostile


@pytest.fixture
def unraised(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Exceptions that escaped a thread (the timer's)."""
    seen: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    return seen


def _body(progress: int) -> bytes:
    return json.dumps(task(progress=progress)).encode()


def _http_answer(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class _RawTls:
    """A TLS server on loopback: ``behave(index, client)`` gets each accepted raw socket (the handshake
    not yet begun) and decides: stall, delay the handshake, answer."""

    def __init__(self, tmp_path: Path, behave: Any) -> None:
        self.cert, key = write_self_signed_certificate(tmp_path / "rawtls")
        self.context = server_context(self.cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.behave, self.stop, self.accepted, self.held = behave, threading.Event(), 0, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            index = self.accepted
            self.accepted += 1
            self.held.append(client)
            threading.Thread(target=self._one, args=(index, client), daemon=True).start()

    def _one(self, index: int, client: socket.socket) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self.behave(self, index, client)

    def stall(self, client: socket.socket) -> None:
        self.stop.wait(15)

    def serve(self, client: socket.socket, body: bytes, delay: float = 0.0) -> None:
        if delay:
            time.sleep(delay)
        tls = self.context.wrap_socket(client, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            if not chunk:
                return
            head += chunk
        tls.sendall(_http_answer(body))
        tls.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for client in self.held:
            client.close()


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(server: _RawTls) -> None:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.cert))

    return use


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


# -- 1: slow but within the deadline: never cut -----------------------------------------------------------


def _late_answer(delay: float, progress: int) -> Any:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(delay)
        send(handler, 200, _body(progress))

    return answer


def test_http_answer_0_3_s_before_the_deadline_is_taken(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, unraised: list[Any]
) -> None:
    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=0, read_timeout=5)
    hostile.routes["/v1/tasks/"] = _late_answer(1.2, 37)
    assert sync_poll(deadline=time.time() + 1.5)["progress"] == 37
    assert not unraised


def test_tls_answer_0_3_s_before_the_deadline_is_taken(
    tls_hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, unraised: list[Any]
) -> None:
    set_connection(monkeypatch, "evolink_hostile", tls_hostile.url, max_retries=0, read_timeout=5)
    tls_hostile.routes["/v1/tasks/"] = _late_answer(1.2, 38)
    assert sync_poll(deadline=time.time() + 1.5)["progress"] == 38
    assert not unraised


def test_a_slow_tls_handshake_ending_0_3_s_before_the_deadline_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any]
) -> None:
    server = _RawTls(tmp_path, lambda s, i, c: s.serve(c, _body(39), delay=1.2))
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=5, read_timeout=5
    )
    try:
        assert sync_poll(deadline=time.time() + 1.5)["progress"] == 39
    finally:
        server.close()
    assert not unraised


def test_a_slow_connect_tunnel_and_server_within_the_deadline_are_taken(
    tls_hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, unraised: list[Any]
) -> None:
    relay = _relay_to(tls_hostile.httpd.server_address[1])

    def slow_relay(proxy: _RawProxy, client: socket.socket) -> None:
        time.sleep(0.6)  # the CONNECT answer late
        relay(proxy, client)

    proxy = _RawProxy(slow_relay)
    tls_hostile.routes["/v1/tasks/"] = _late_answer(0.6, 41)
    set_connection(monkeypatch, "evolink_hostile", tls_hostile.url, max_retries=0, read_timeout=5)
    _use_proxy(monkeypatch, proxy.url)
    try:
        assert sync_poll(deadline=time.time() + 1.5)["progress"] == 41
    finally:
        proxy.close()
    assert proxy.heads and proxy.heads[0].startswith("CONNECT ")
    assert not unraised


# -- 2: a TLS handshake that stalls ----------------------------------------------------------------------


def test_a_stalled_tls_handshake_ends_by_the_deadline_without_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any], caplog: Any
) -> None:
    server = _RawTls(tmp_path, lambda s, i, c: s.stall(c))
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=10, read_timeout=10
    )
    caplog.set_level(logging.DEBUG)
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        server.close()
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, took
    assert KEY not in _every_text(error) and KEY not in caplog.text
    assert not unraised


def test_a_submission_whose_tls_handshake_stalls_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any], caplog: Any
) -> None:
    """Records how it is classified: the request provably was never sent (no handshake)."""
    server = _RawTls(tmp_path, lambda s, i, c: s.stall(c))
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=1, connect_timeout=1, read_timeout=1
    )
    caplog.set_level(logging.DEBUG)
    try:
        error, took = _timed_error(
            lambda: EvolinkHook("evolink_hostile").create_video_task(PAYLOAD, IDEMPOTENCY_KEY)
        )
    finally:
        server.close()
    assert isinstance(error, EvolinkError), error
    assert took < 5, took
    assert KEY not in _every_text(error) and KEY not in caplog.text
    assert not unraised
    # Conservative: an unknown outcome naming the key (never "not sent" for something that could be sent).
    assert isinstance(error, EvolinkSubmissionUnknownError), type(error)


def test_a_tls_handshake_trickled_by_a_server_ends_at_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any]
) -> None:
    """The server answers the ClientHello with one garbage-free byte every 0.3 s (a TLS record header
    dribbled): every socket read is inside the socket timeout; only the timer can end it."""

    def dribble(s: _RawTls, i: int, client: socket.socket) -> None:
        client.recv(4096)  # the ClientHello
        for byte in b"\x16\x03\x03\x40\x00" + b"\x02" * 200:
            if s.stop.wait(0.3):
                return
            client.sendall(bytes([byte]))

    server = _RawTls(tmp_path, dribble)
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=5, read_timeout=5
    )
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        server.close()
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, took
    assert not unraised


# -- 3: the timer with no socket yet, reuse after a cut, races --------------------------------------------


def _blackhole() -> tuple[socket.socket, list[socket.socket], int]:
    """A listener that accepts nothing, its backlog filled: the next SYN is dropped, connect() hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("the backlog does not blackhole on this kernel")
    except (TimeoutError, OSError):
        pass
    finally:
        probe.close()
    return listener, fillers, port


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_blackholed_connect_ends_by_the_deadline_as_not_sent(
    monkeypatch: pytest.MonkeyPatch, unraised: list[Any], scheme: str
) -> None:
    listener, fillers, port = _blackhole()
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", f"{scheme}://127.0.0.1:{port}", max_retries=0, connect_timeout=10
    )
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=time.time() + 1))
    finally:
        listener.close()
        for filler in fillers:
            filler.close()
    assert isinstance(error, EvolinkTransportError), error
    assert took < 3, took
    assert KEY not in _every_text(error)
    assert not unraised


# F1 (fixed): a download's connect timeout is capped at the time left, as its read timeout was
def test_a_download_whose_connect_is_blackholed_ends_by_the_deadline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, unraised: list[Any]
) -> None:
    """The timer fires while ``connection.sock`` is still None (urllib3 sets it after connect returns):
    nothing to shut, so the connect runs its full connect_timeout past the caller's deadline."""
    listener, fillers, port = _blackhole()
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", f"http://127.0.0.1:{port}", connect_timeout=6, read_timeout=6
    )
    try:
        _error, took = _timed_error(
            lambda: store_results(
                EvolinkHook("evolink_hostile"),
                completed(f"http://127.0.0.1:{port}/media/v.mp4"),
                str(tmp_path / "out"),
                deadline=time.time() + 1,
            )
        )
    finally:
        listener.close()
        for filler in fillers:
            filler.close()
    assert files_under(tmp_path / "out") == []
    assert not unraised
    assert took < 3, f"the deadline was 1 s away; the download took {took:.1f} s"


def test_after_a_cut_handshake_the_same_hook_connects_again_and_reads_its_own_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any]
) -> None:
    def behave(s: _RawTls, index: int, client: socket.socket) -> None:
        if index == 0:
            s.stall(client)
        else:
            s.serve(client, _body(index))

    server = _RawTls(tmp_path, behave)
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=5, read_timeout=5
    )
    hook = EvolinkHook("evolink_hostile")
    try:
        error, _ = _timed_error(lambda: hook.get_task(TASK_ID, deadline=time.time() + 0.5))
        assert isinstance(error, EvolinkTransportError)
        got = [hook.get_task(TASK_ID, deadline=time.time() + 3)["progress"] for _ in range(3)]
    finally:
        server.close()
    assert got == [1, 2, 3]
    assert not unraised


def test_handshakes_ending_around_the_deadline_are_each_the_right_answer_or_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any]
) -> None:
    """The handshake delayed to the deadline +-20 ms: the timer fires before, during or just after
    connect() (socket None, being wrapped, wrapped); each call is its own answer or an EvolinkError."""
    window = 0.3
    lags = [window + 0.002 * (i % 21 - 10) for i in range(1000)]

    def behave(s: _RawTls, index: int, client: socket.socket) -> None:
        s.serve(client, _body(index % 101), delay=lags[index])

    server = _RawTls(tmp_path, behave)
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=5, read_timeout=5
    )
    hook = EvolinkHook("evolink_hostile")
    outcomes: list[str] = []
    try:
        for _ in range(30):
            before = server.accepted
            try:
                got = hook.get_task(TASK_ID, deadline=time.time() + window)["progress"]
            except EvolinkError as error:
                assert KEY not in _every_text(error)
                outcomes.append(type(error).__name__)
                continue
            assert got == before % 101, f"connection {before} was handed answer {got}"
            outcomes.append("ok")
    finally:
        server.close()
    print("OUTCOMES:", outcomes)
    assert not unraised, [str(args.exc_value) for args in unraised]
    assert set(outcomes) <= {"ok", "EvolinkTransportError", "EvolinkWaitTimeoutError"}, outcomes


def test_connect_answers_around_the_deadline_through_a_proxy_are_right_or_an_error(
    tls_hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, unraised: list[Any]
) -> None:
    window = 0.3
    lags = iter([window - 0.015 + 0.002 * (i % 21 - 10) for i in range(1000)])
    relay = _relay_to(tls_hostile.httpd.server_address[1])

    def late(proxy: _RawProxy, client: socket.socket) -> None:
        time.sleep(next(lags))
        relay(proxy, client)

    numbers = iter(range(1000))
    tls_hostile.routes["/v1/tasks/"] = lambda handler: send(handler, 200, _body(next(numbers) % 101))
    proxy = _RawProxy(late)
    set_connection(monkeypatch, "evolink_hostile", tls_hostile.url, max_retries=0, read_timeout=5)
    _use_proxy(monkeypatch, proxy.url)
    hook = EvolinkHook("evolink_hostile")
    outcomes: list[str] = []
    try:
        for _ in range(25):
            before = len(tls_hostile.requests)
            try:
                got = hook.get_task(TASK_ID, deadline=time.time() + window)["progress"]
            except EvolinkError as error:
                outcomes.append(type(error).__name__)
                continue
            assert got == before % 101, f"request {before} was handed answer {got}"
            outcomes.append("ok")
    finally:
        proxy.close()
    print("OUTCOMES:", outcomes)
    assert not unraised, [str(args.exc_value) for args in unraised]
    assert set(outcomes) <= {"ok", "EvolinkTransportError", "EvolinkWaitTimeoutError"}, outcomes


# -- 4/5: downloads through a CONNECT tunnel whose TLS handshake stalls ----------------------------------


def _stalled_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, tunnel: bool) -> Any:
    server = _RawTls(tmp_path, lambda s, i, c: s.stall(c))
    trust(server)
    proxy = _RawProxy(_relay_to(server.port)) if tunnel else None
    set_connection(monkeypatch, "evolink_hostile", server.url, connect_timeout=6, read_timeout=6)
    if proxy:
        _use_proxy(monkeypatch, proxy.url)
    else:
        _no_proxy(monkeypatch)
    out = tmp_path / "out"
    try:
        error, took = _timed_error(
            lambda: store_results(
                EvolinkHook("evolink_hostile"),
                completed(f"{server.url}/media/v.mp4"),
                str(out),
                deadline=time.time() + 1,
            )
        )
    finally:
        if proxy:
            proxy.close()
        server.close()
    if proxy:
        assert proxy.heads and proxy.heads[0].startswith("CONNECT ")
    return error, took, out


def test_a_download_through_a_tunnel_whose_handshake_stalls_stores_nothing_without_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any], caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    error, _took, out = _stalled_download(tmp_path, monkeypatch, trust, tunnel=True)
    assert isinstance(error, EvolinkTransportError), error
    assert files_under(out) == []
    assert KEY not in _every_text(error) and KEY not in caplog.text
    assert not unraised


# F2 (fixed): the same cap bounds a download's TLS handshake (CPython's handshake takes the socket timeout
# as one limit; the timer cannot cut it: at fire time connection.sock is the plain socket already detached)
@pytest.mark.parametrize("tunnel", [False, True], ids=["direct", "connect-tunnel"])
def test_a_download_whose_handshake_stalls_ends_by_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, tunnel: bool
) -> None:
    _error, took, out = _stalled_download(tmp_path, monkeypatch, trust, tunnel=tunnel)
    assert files_under(out) == []
    assert took < 3, f"the deadline was 1 s away; the download took {took:.1f} s"


@pytest.mark.parametrize("ca", ["bundle", "default"])
def test_a_connect_answered_late_then_a_stalled_handshake_ends_by_the_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any], ca: str
) -> None:
    """``default``: no CA bundle named (the stalled handshake never reaches a certificate), as most
    deployments run: requests 2.32.0-2.32.4 then hand in a context of their own (red-team 22's G2)."""
    server = _RawTls(tmp_path, lambda s, i, c: s.stall(c))
    if ca == "bundle":
        trust(server)
    else:
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    relay = _relay_to(server.port)

    answered: list[float] = []

    def late(proxy: _RawProxy, client: socket.socket) -> None:
        time.sleep(2)  # inside the socket timeout (3 s), 1 s before the deadline
        answered.append(time.time())
        relay(proxy, client)

    proxy = _RawProxy(late)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=10, read_timeout=10
    )
    _use_proxy(monkeypatch, proxy.url)
    deadline = time.time() + 3
    try:
        error, took = _timed_error(lambda: sync_poll(deadline=deadline))
    finally:
        proxy.close()
        server.close()
    assert isinstance(error, EvolinkTransportError), error
    assert not unraised
    # The CONNECT was answered well inside the deadline: what the deadline cut is the handshake.
    assert answered and answered[0] < deadline - 0.5, (answered, deadline)
    # Without the bound the handshake would get the whole socket timeout after the CONNECT: 5 s.
    assert took < 4, f"the deadline was 3 s away; the call took {took:.1f} s"


def test_a_stalled_handshake_far_from_any_deadline_still_ends_at_the_connect_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: Any, unraised: list[Any]
) -> None:
    """The handshake's timeout is the time left or the connect timeout, whichever ends first: no deadline
    near, a read timeout of 10 s, a connect timeout of 1 s, and the handshake ends after about 1 s."""
    server = _RawTls(tmp_path, lambda s, i, c: s.stall(c))
    trust(server)
    _no_proxy(monkeypatch)
    set_connection(
        monkeypatch, "evolink_hostile", server.url, max_retries=0, connect_timeout=1, read_timeout=10
    )
    try:
        error, took = _timed_error(sync_poll)
    finally:
        server.close()
    assert isinstance(error, EvolinkTransportError), error
    assert not unraised
    assert took < 3, f"the connect timeout was 1 s; the handshake took {took:.1f} s"


def test_a_late_timer_never_cuts_the_next_exchange_on_a_reused_connection(
    hostile: HostileServer, monkeypatch: pytest.MonkeyPatch, unraised: list[Any]
) -> None:
    """The timer thread preempted between ``cut.set()`` and reading ``connection.sock`` (simulated: its
    Event.set sleeps 0.8 s) while the caller fails, and the next call connects again: the stale timer
    must not shut the next exchange's socket."""
    real_event = threading.Event

    class SlowEvent(real_event):  # type: ignore[misc,valid-type]
        def set(self) -> None:
            super().set()
            time.sleep(0.8)  # only the cut Event of _cut_at_answer_until is a SlowEvent

    set_connection(monkeypatch, "evolink_hostile", hostile.url, max_retries=0, read_timeout=5)
    lags = iter([0.35, 0.4, 0.4, 0.4])
    numbers = iter(range(100))

    def answer(handler: BaseHTTPRequestHandler) -> None:
        number = next(numbers)
        time.sleep(next(lags))
        send(handler, 200, _body(number))

    hostile.routes["/v1/tasks/"] = answer
    hook = EvolinkHook("evolink_hostile")
    import evolink_provider.hooks.connection as connection_module

    monkeypatch.setattr(
        connection_module, "threading", SimpleNamespace(Event=SlowEvent, Timer=threading.Timer)
    )
    error, _ = _timed_error(lambda: hook.get_task(TASK_ID, deadline=time.time() + 0.3))
    assert isinstance(error, EvolinkTransportError)
    assert hook.get_task(TASK_ID, deadline=time.time() + 3)["progress"] == 1
    time.sleep(0.5)
    assert not unraised
