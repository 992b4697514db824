"""The triggers' HTTP client (aiohttp, one session per event loop, in hooks/transport.py), over real HTTP
on 127.0.0.1: keep-alive reuse, a server that closes after each answer, an environment proxy, one
connection lookup per event loop, desyncs, connections per origin and the deadline of a wait for one, and
no aiohttp exception riding along with the provider's errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

import pytest

from evolink_provider.hooks.evolink import EvolinkHook
from evolink_provider.hooks.transport import aclose_async_clients
from tests.test_hostile import TASK_ID, HostileServer, send, set_connection, task


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileServer]:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    hostile = HostileServer()
    yield hostile
    hostile.close()


def read_tasks(conn_id: str, count: int, concurrently: bool = False) -> list[dict[str, Any]]:
    async def reads() -> list[dict[str, Any]]:
        try:
            if concurrently:
                return list(
                    await asyncio.gather(*(EvolinkHook(conn_id).aget_task(TASK_ID) for _ in range(count)))
                )
            return [await EvolinkHook(conn_id).aget_task(TASK_ID) for _ in range(count)]
        finally:
            await aclose_async_clients()

    return asyncio.run(reads())


def test_polls_reuse_one_kept_alive_connection(sim: Any) -> None:
    created = EvolinkHook().create_video_task({"model": "seedance-2.0-fast-text-to-video", "prompt": "p"})

    async def reads() -> None:
        try:
            for _ in range(5):
                assert (await EvolinkHook().aget_task(created["id"]))["id"] == created["id"]
        finally:
            await aclose_async_clients()

    before = sim.stats()["connections_opened"]
    asyncio.run(reads())
    # Less one: the connection of the stats request that reads the count.
    assert sim.stats()["connections_opened"] - before - 1 == 1


def test_a_server_that_closes_after_each_answer_is_read_on_new_connections(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_closing", server.url)
    body = json.dumps(task()).encode()
    server.routes["/v1/tasks/"] = lambda handler: send(handler, 200, body, headers={"Connection": "close"})
    assert [answer["id"] for answer in read_tasks("evolink_closing", 3)] == [TASK_ID] * 3
    assert len(server.requests) == 3


def test_an_environment_proxy_carries_the_triggers_reads(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The base URL does not resolve: only a proxy can answer, and it sees the absolute-form request.
    set_connection(monkeypatch, "evolink_proxied", "http://evolink.invalid")
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    server.json("http://evolink.invalid/v1/tasks/", task())
    assert read_tasks("evolink_proxied", 1)[0]["id"] == TASK_ID
    assert server.requests == [("GET", f"http://evolink.invalid/v1/tasks/{TASK_ID}")]


def test_an_environment_proxy_with_credentials_is_sent_them_and_no_proxy_is_honoured(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    set_connection(monkeypatch, "evolink_proxied", "http://evolink.invalid")
    monkeypatch.setenv("HTTP_PROXY", server.url.replace("http://", "http://proxy-user:pr0xy@"))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    seen: list[str | None] = []
    body = json.dumps(task()).encode()

    def respond(handler: BaseHTTPRequestHandler) -> None:
        seen.append(handler.headers.get("Proxy-Authorization"))
        send(handler, 200, body)

    server.routes["http://evolink.invalid/v1/tasks/"] = respond
    assert read_tasks("evolink_proxied", 1)[0]["id"] == TASK_ID
    assert seen == ["Basic " + base64.b64encode(b"proxy-user:pr0xy").decode()]

    monkeypatch.setenv("NO_PROXY", "evolink.invalid")
    from evolink_provider.exceptions import EvolinkTransportError

    with pytest.raises(EvolinkTransportError, match="host name not found"):
        read_tasks("evolink_proxied", 1)  # straight to the base URL, which does not resolve
    assert len(seen) == 1


def test_a_netrc_entry_for_the_api_host_changes_nothing(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The environment is read for proxies only: a ``~/.netrc`` naming the API's host (kept for other
    tools) neither replaces the Bearer key nor fails the read (aiohttp's ``trust_env`` would refuse to
    combine its credentials with the Authorization header)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    set_connection(monkeypatch, "evolink_netrc", server.url)
    server.json("/v1/tasks/", task())
    assert read_tasks("evolink_netrc", 1)[0]["id"] == TASK_ID
    assert [headers.get("Authorization", "").split(" ")[0] for headers in server.headers] == ["Bearer"]


def test_hooks_of_one_event_loop_share_one_connection_lookup(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_shared", server.url)
    server.json("/v1/tasks/", task())
    lookups: list[str] = []
    from evolink_provider.hooks import evolink

    original = evolink.get_async_connection

    async def counted(conn_id: str) -> Any:
        lookups.append(conn_id)
        return await original(conn_id)

    monkeypatch.setattr(evolink, "get_async_connection", counted)
    assert len(read_tasks("evolink_shared", 20, concurrently=True)) == 20
    assert lookups == ["evolink_shared"]
    read_tasks("evolink_shared", 1)  # a new event loop reads the connection again
    assert lookups == ["evolink_shared"] * 2


def test_a_server_that_never_answers_is_cut_off_at_the_read_timeout(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_silent", server.url, read_timeout=0.5, max_retries=0)

    def silent(handler: BaseHTTPRequestHandler) -> None:
        handler.rfile.read(1)  # waits until the client gives up and closes

    server.routes["/v1/tasks/"] = silent
    from evolink_provider.exceptions import EvolinkTransportError

    with pytest.raises(EvolinkTransportError, match="time ran out"):
        read_tasks("evolink_silent", 1)


def test_bytes_after_an_answer_are_never_read_as_the_next_polls_answer(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that sends a second, unasked-for answer behind the first one (a desync: a proxy's leftover
    body, a smuggled response) must not have it read as the next poll's answer: the connection is dropped."""

    def raw_answer(body: dict[str, Any]) -> bytes:
        content = json.dumps(body).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n"
        return head.encode() + content

    answered: list[str] = []

    def respond(handler: BaseHTTPRequestHandler) -> None:
        smuggled = task(status="completed", progress=100, results=["https://smuggled.example/v.mp4"])
        handler.wfile.write(raw_answer(task()) + (raw_answer(smuggled) if not answered else b""))
        handler.wfile.flush()
        answered.append(handler.path)

    server.routes["/v1/tasks/"] = respond
    set_connection(monkeypatch, "evolink_desync", server.url)
    first, second = read_tasks("evolink_desync", 2)
    assert (first["status"], second["status"]) == ("processing", "processing")
    assert len(answered) == 2  # the second poll was really sent and its own answer read


def test_an_answer_sent_to_an_idle_connection_is_never_read_as_the_next_polls_answer(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same desync, with the unasked-for answer arriving while the connection sits idle in the pool
    (the next poll waits until it was written: one sent after the next request would be its answer to any
    HTTP/1.1 client)."""
    answered: list[str] = []
    written = threading.Event()
    smuggled = json.dumps(task(status="completed", progress=100, results=["https://s.example/v.mp4"]))

    def respond(handler: BaseHTTPRequestHandler) -> None:
        send(handler, 200, json.dumps(task()).encode())
        answered.append(handler.path)
        if len(answered) == 1:
            time.sleep(0.3)  # the client has read the answer and parked the connection
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(smuggled)}\r\n\r\n"
            handler.wfile.write(head.encode() + smuggled.encode())
            handler.wfile.flush()
            written.set()

    server.routes["/v1/tasks/"] = respond
    set_connection(monkeypatch, "evolink_desync", server.url)

    async def reads() -> list[dict[str, Any]]:
        try:
            first = await EvolinkHook("evolink_desync").aget_task(TASK_ID)
            assert await asyncio.to_thread(written.wait, 10)
            await asyncio.sleep(0.5)  # the loop sees the bytes arrive on the idle connection
            return [first, await EvolinkHook("evolink_desync").aget_task(TASK_ID)]
        finally:
            await aclose_async_clients()

    first, second = asyncio.run(reads())
    assert (first["status"], second["status"]) == ("processing", "processing")
    assert len(answered) == 2


def _silent(stop: threading.Event) -> Any:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        stop.wait(30)  # the request was read; no answer comes

    return respond


def test_a_silent_host_does_not_hold_up_polls_to_a_healthy_one(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent host holds at most CONNECTIONS_PER_ORIGIN connections; a healthy host's poll does not
    wait for one of them to come free."""
    from evolink_provider.hooks.transport import CONNECTIONS_PER_ORIGIN

    silent, stop = HostileServer(), threading.Event()
    silent.routes["/v1/tasks/"] = _silent(stop)
    set_connection(monkeypatch, "evolink_silent", silent.url, read_timeout=20, max_retries=0)
    set_connection(monkeypatch, "evolink_healthy", server.url)
    server.json("/v1/tasks/", task())

    async def reads() -> float:
        stuck = [
            asyncio.ensure_future(EvolinkHook("evolink_silent").aget_task(TASK_ID))
            for _ in range(CONNECTIONS_PER_ORIGIN + 8)
        ]
        try:
            await asyncio.sleep(0.5)  # the silent host holds its connections now
            started = time.monotonic()
            assert (await EvolinkHook("evolink_healthy").aget_task(TASK_ID))["id"] == TASK_ID
            return time.monotonic() - started
        finally:
            for read in stuck:
                read.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
            await aclose_async_clients()

    try:
        took = asyncio.run(reads())
    finally:
        stop.set()
        silent.close()
    assert took < 5, f"the healthy host's poll took {took:.1f} s"  # one pool for all hosts: 9.6 s


def test_the_wait_for_a_connection_ends_at_the_polls_deadline(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection to the origin is held by a silent exchange: a poll with a deadline 1 s away ends
    then, though its read timeout (20 s) is far off."""
    from evolink_provider.exceptions import EvolinkError
    from evolink_provider.hooks.transport import CONNECTIONS_PER_ORIGIN

    stop = threading.Event()
    server.routes["/v1/tasks/"] = _silent(stop)
    set_connection(monkeypatch, "evolink_full", server.url, read_timeout=20, max_retries=0)

    async def reads() -> tuple[float, BaseException | None]:
        holding = [
            asyncio.ensure_future(EvolinkHook("evolink_full").aget_task(TASK_ID))
            for _ in range(CONNECTIONS_PER_ORIGIN)
        ]
        try:
            await asyncio.sleep(0.5)
            started = time.monotonic()
            try:
                await EvolinkHook("evolink_full").aget_task(TASK_ID, deadline=time.time() + 1)
            except EvolinkError as error:
                return time.monotonic() - started, error
            return time.monotonic() - started, None
        finally:
            for read in holding:
                read.cancel()
            await asyncio.gather(*holding, return_exceptions=True)
            await aclose_async_clients()

    try:
        took, error = asyncio.run(reads())
    finally:
        stop.set()
    assert error is not None and "time ran out" in str(error), error
    assert took < 5, f"the poll waited {took:.1f} s for a connection"  # without the bound: 20 s


def test_a_poll_waiting_for_a_connection_holds_few_objects(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection to the origin is held: the polls queued behind them wait before aiohttp builds
    their requests. Thousands of waiting triggers' objects are what the triggerer's full garbage
    collections walk. Queued inside aiohttp (its request, headers, URL and timers already built), a poll
    holds more than half again as many objects as queued before it."""
    import gc

    from evolink_provider.hooks.transport import CONNECTIONS_PER_ORIGIN

    stop = threading.Event()
    server.routes["/v1/tasks/"] = _silent(stop)
    set_connection(monkeypatch, "evolink_queue", server.url, read_timeout=20, max_retries=0)
    waiting = 300

    async def objects_per_waiting_poll() -> float:
        holding = [
            asyncio.ensure_future(EvolinkHook("evolink_queue").aget_task(TASK_ID))
            for _ in range(CONNECTIONS_PER_ORIGIN)
        ]
        queued: list[asyncio.Future[Any]] = []
        try:
            await asyncio.sleep(0.5)  # the silent exchanges hold every connection now
            gc.collect()
            before = len(gc.get_objects())
            queued += [
                asyncio.ensure_future(EvolinkHook("evolink_queue").aget_task(TASK_ID)) for _ in range(waiting)
            ]
            await asyncio.sleep(0.3)
            assert not any(read.done() for read in queued)
            gc.collect()
            return (len(gc.get_objects()) - before) / waiting
        finally:
            for read in holding + queued:
                read.cancel()
            await asyncio.gather(*holding, *queued, return_exceptions=True)
            await aclose_async_clients()

    try:
        held = asyncio.run(objects_per_waiting_poll())
    finally:
        stop.set()
    assert held < 85, f"a poll waiting for a connection holds {held:.1f} objects"


@pytest.mark.parametrize("failure", ["refused", "reset", "cut", "garbled", "silent"])
def test_no_aiohttp_exception_rides_along_with_the_error(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """aiohttp's exceptions carry the URL and (in their reprs) the request headers, so the key: the
    provider's error says what happened in a few words and chains nothing."""
    import socket

    from evolink_provider.exceptions import EvolinkTransportError

    stop = threading.Event()
    url = server.url
    if failure == "refused":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{probe.getsockname()[1]}"

    def respond(handler: BaseHTTPRequestHandler) -> None:
        if failure == "reset":
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            handler.connection.close()
        elif failure == "cut":
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{")
            handler.close_connection = True
        elif failure == "garbled":
            handler.wfile.write(b"HTTP/1.1 2x0 OK\r\nSet-Cookie: a\r\n\r\n")
            handler.close_connection = True
        else:
            stop.wait(5)

    server.routes["/v1/tasks/"] = respond
    set_connection(monkeypatch, "evolink_failing", url, read_timeout=0.5, max_retries=0)
    try:
        with pytest.raises(EvolinkTransportError) as caught:
            read_tasks("evolink_failing", 1)
    finally:
        stop.set()
    error = caught.value
    assert error.__cause__ is None and error.__context__ is None
    assert "sk-hostile" not in str(error) + repr(error) and "aiohttp" not in str(error) + repr(error)
    assert str(error).startswith("EvoLink connection 'evolink_failing'"), error


def test_the_connection_extra_is_never_read_synchronously_on_the_event_loop(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before Airflow 3.3.2, Connection.extra_dejson masks the extra's secrets with a synchronous call to the
    # supervisor: on a triggerer's loop it raises DeadlockImminentError when another async call is in
    # flight. Stand-in: extra_dejson refuses a running loop.
    from airflow.sdk.definitions.connection import Connection

    real = Connection.extra_dejson

    def guarded(self: Connection) -> dict:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return real.fget(self)  # type: ignore[attr-defined]
        raise RuntimeError("DeadlockImminentError stand-in: extra_dejson called on the event loop")

    monkeypatch.setattr(Connection, "extra_dejson", property(guarded))
    set_connection(monkeypatch, "evolink_extra", server.url)
    server.json("/v1/tasks/", task())
    assert [answer["id"] for answer in read_tasks("evolink_extra", 1)] == [TASK_ID]


def sockets_open_to(port: int | None) -> int:
    """This process's TCP sockets whose far end is ``port`` (client sides only: the simulator's own accepted
    sockets, other files of the process and the sync client's pool toward other ports are not counted)."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[9] in inodes and fields[3] != "06":  # 06: TIME_WAIT
                    count += 1
    return count


def test_a_trigger_run_in_its_own_event_loop_leaves_no_session_loop_or_socket_behind(sim: Any) -> None:
    # dag.test() runs each deferral's trigger in asyncio.run and nothing there closes the session: it must
    # not outlive its loop (the session holds the loop, so a weak key alone never dies).
    import gc
    import warnings

    from evolink_provider.hooks import transport

    submitter = EvolinkHook()
    created = submitter.create_video_task({"model": "seedance-2.0-fast-text-to-video", "prompt": "p"})
    submitter.close()  # its pooled socket to the simulator would otherwise be counted (or close mid-count)

    async def one_poll() -> None:
        await EvolinkHook().aget_task(created["id"])

    asyncio.run(one_poll())  # warm up imports
    gc.collect()
    port = urlsplit(sim.base_url).port
    sockets, clients = sockets_open_to(port), len(transport._CLIENTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            asyncio.run(one_poll())
        gc.collect()
    assert (len(transport._CLIENTS) - clients, sockets_open_to(port) - sockets) == (0, 0)
    assert not [warning for warning in caught if "Unclosed" in str(warning.message)]
