"""The triggers' HTTP client (hooks/http11.py, the pool in hooks/transport.py), over real HTTP on 127.0.0.1:
keep-alive reuse, a server that closes after each answer, an environment proxy, one connection lookup per
event loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

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


def test_hooks_of_one_event_loop_share_one_connection_lookup(
    server: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_connection(monkeypatch, "evolink_shared", server.url)
    server.json("/v1/tasks/", task())
    lookups: list[str] = []
    original = EvolinkHook.aget_connection

    async def counted(conn_id: str) -> Any:
        lookups.append(conn_id)
        return await original(conn_id)

    monkeypatch.setattr(EvolinkHook, "aget_connection", staticmethod(counted))
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
