"""The alternatives for the triggers' poll path, measured side by side in one run (issue 16).

    python bench/transports.py          # about a minute on a 2-core machine
    BENCH_OLD_CHECKOUT=/path/to/old/tree python bench/transports.py   # and that tree's client beside it

Each client reads the same task from the simulator (its own process, so its CPU does not count) with
CONCURRENCY polls in flight on one event loop over at most POOL connections, and reports the CPU time
(``time.process_time``) per read: the HTTP exchange and the raw body only. JSON decoding is measured
apart, on a real task answer, for ``answers.loads_strict`` and the plain decoders.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable

from run import API_KEY, OLD_CHECKOUT, simulator  # bench/run.py: this script's folder is on sys.path

REQUESTS = 6000
CONCURRENCY = 500
POOL = 32
ROUNDS = 2
HEADERS = {
    "Authorization": f"Bearer {API_KEY}",
    "User-Agent": "bench",
    "Accept": "application/json",
    "Accept-Encoding": "gzip, deflate",
}

Reader = Callable[[], Awaitable[bytes]]


async def _drive(read: Reader) -> float:
    """CPU seconds per read for REQUESTS reads, CONCURRENCY at a time."""
    left = REQUESTS

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            body = await read()
            assert body.startswith(b"{"), body[:80]

    await read()  # warm: connect once, build pools
    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return (time.process_time() - cpu) / REQUESTS


async def via_provider(url: str, task_id: str) -> float:
    """The provider's path: ``transport._asend_once`` (shared pool, raw bytes, bounded body, strict JSON)."""
    from evolink_provider.hooks import connection, transport
    from evolink_provider.hooks.connection import Timeouts
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.hooks.transport import _asend_once, aclose_async_clients

    # Where the tree keeps it: hooks/connection.py since the aiohttp client, hooks/transport.py before.
    build_request = getattr(connection, "build_request", None) or transport.build_request

    settings = await EvolinkHook().aget_settings()
    request = build_request(settings, "GET", f"/v1/tasks/{task_id}")

    async def read() -> bytes:
        await _asend_once(request, Timeouts())
        return b"{"

    try:
        return await _drive(read)
    finally:
        await aclose_async_clients()


async def via_hook(url: str, task_id: str) -> float:
    """A whole poll read: ``EvolinkHook.aget_task`` (the retry loop and the answer checks around
    ``_asend_once``)."""
    from evolink_provider.hooks.evolink import EvolinkHook
    from evolink_provider.hooks.transport import aclose_async_clients

    hook = EvolinkHook()

    async def read() -> bytes:
        await hook.aget_task(task_id)
        return b"{"

    try:
        return await _drive(read)
    finally:
        await aclose_async_clients()


async def via_httpx(url: str, task_id: str) -> float:
    """httpx, one client with a semaphore in front (no provider code): the library's own floor."""
    import httpx

    limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL, keepalive_expiry=45)
    slots = asyncio.Semaphore(POOL)
    async with httpx.AsyncClient(limits=limits) as client:

        async def read() -> bytes:
            async with slots, client.stream("GET", f"{url}/v1/tasks/{task_id}", headers=HEADERS) as response:
                return b"".join([chunk async for chunk in response.aiter_raw()])

        return await _drive(read)


async def via_httpcore(url: str, task_id: str) -> float:
    """httpcore's pool directly, the request built once."""
    import httpcore

    headers = list(HEADERS.items())
    slots = asyncio.Semaphore(POOL)
    async with httpcore.AsyncConnectionPool(max_connections=POOL, keepalive_expiry=45) as pool:

        async def read() -> bytes:
            async with slots, pool.stream("GET", f"{url}/v1/tasks/{task_id}", headers=headers) as response:
                return b"".join([chunk async for chunk in response.aiter_stream()])

        return await _drive(read)


async def via_aiohttp(url: str, task_id: str) -> float:
    """aiohttp (C parser), raw body (no automatic decompression)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=POOL, keepalive_timeout=45)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def read() -> bytes:
            async with session.get(f"{url}/v1/tasks/{task_id}", headers=HEADERS) as response:
                return await response.read()

        return await _drive(read)


class _H11Pool:
    """A minimal keep-alive pool of asyncio stream connections speaking HTTP/1.1 through h11."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, object]] = []
        self.slots = asyncio.Semaphore(POOL)

    async def get(self, target: str, headers: list[tuple[str, str]]) -> bytes:
        import h11

        async with self.slots:
            if self.idle:
                reader, writer, conn = self.idle.pop()
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
                conn = h11.Connection(h11.CLIENT)
            assert isinstance(conn, h11.Connection)
            writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
            writer.write(conn.send(h11.EndOfMessage()))
            body = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            conn.start_next_cycle()
            self.idle.append((reader, writer, conn))
            return bytes(body)


async def via_h11_streams(url: str, task_id: str) -> float:
    """asyncio streams with h11, a pool of idle connections in a list."""
    pool = _H11Pool(url)
    headers = [("Host", f"{pool.host}:{pool.port}"), *HEADERS.items()]
    try:
        return await _drive(lambda: pool.get(f"/v1/tasks/{task_id}", headers))
    finally:
        for _, writer, _ in pool.idle:
            writer.close()


def bench_json(answer: bytes) -> list[str]:
    import msgspec

    from evolink_provider.answers import checked_task, loads_strict

    decoder = msgspec.json.Decoder()
    rounds = 20000
    lines = []
    for name, decode in (
        ("answers.loads_strict", loads_strict),
        ("json.loads", json.loads),
        ("msgspec.json.decode", decoder.decode),
        ("loads_strict + checked_task", lambda body: checked_task(loads_strict(body))),
    ):
        cpu = time.process_time()
        for _ in range(rounds):
            decode(answer)
        lines.append(f"json {name}: {1e6 * (time.process_time() - cpu) / rounds:.1f} us per answer")
    return lines


def bench_retry_loop() -> list[str]:
    """CPU per call of what wraps a poll read that succeeds at once: a ``tenacity`` loop built for it (every
    call before the first attempt ran outside it) against the first attempt awaited directly."""
    import logging

    from evolink_provider.hooks.retry import Kind, RetryPolicy

    policy, log, rounds = RetryPolicy(), logging.getLogger("bench"), 20000

    async def answer() -> bytes:
        return b"{}"

    async def measure() -> tuple[float, float]:
        cpu = time.process_time()
        for _ in range(rounds):
            await answer()
        direct = time.process_time() - cpu
        cpu = time.process_time()
        for _ in range(rounds):
            await policy.retrying(Kind.POLL, time.time() + 60, log, logging.INFO, asynchronous=True)(answer)
        return direct, time.process_time() - cpu

    direct, looped = asyncio.run(measure())
    return [
        f"retry loop: tenacity built per call {1e6 * looped / rounds:.1f} us, first attempt awaited "
        f"directly {1e6 * direct / rounds:.1f} us per call"
    ]


CLIENTS = {
    "provider (transport._asend_once: aiohttp session, bounded body, strict JSON)": via_provider,
    "provider hook (EvolinkHook.aget_task: retry loop, answer checks)": via_hook,
    "httpx, one client": via_httpx,
    "httpcore pool": via_httpcore,
    "aiohttp": via_aiohttp,
    "asyncio streams + h11": via_h11_streams,
}


def old_provider(url: str, task_id: str, mode: str = "exchange") -> float:
    """``via_provider`` (``mode="hook"``: ``via_hook``) on the client of ``BENCH_OLD_CHECKOUT``, in a child
    process importing that tree."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": OLD_CHECKOUT}
    done = subprocess.run(
        [sys.executable, __file__, "_provider", url, task_id, mode], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from evolink_provider.hooks.evolink import EvolinkHook

    if sys.argv[1:2] == ["_provider"]:  # a child of old_provider
        via = via_hook if sys.argv[4:5] == ["hook"] else via_provider
        print(asyncio.run(via(sys.argv[2], sys.argv[3])))
        return
    clients: dict[str, Callable[[str, str], Awaitable[float] | float]] = dict(CLIENTS)
    if OLD_CHECKOUT:
        clients[f"old provider client ({OLD_CHECKOUT})"] = old_provider
        clients[f"old provider hook ({OLD_CHECKOUT})"] = lambda url, task: old_provider(url, task, "hook")

    with simulator(task_seconds=3600) as url:
        hook = EvolinkHook()
        task_id = hook.create_video_task({"model": "seedance-2.0-fast-text-to-video", "prompt": "bench"})[
            "id"
        ]
        hook.close()
        import requests

        answer = requests.get(
            f"{url}/v1/tasks/{task_id}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        ).content
        print(f"task answer: {len(answer)} bytes; {REQUESTS} reads, {CONCURRENCY} in flight, pool {POOL}")
        figures: dict[str, list[float]] = {name: [] for name in clients}
        for _ in range(ROUNDS):
            for name, client in clients.items():
                result = client(url, task_id)
                figures[name].append(result if isinstance(result, float) else asyncio.run(result))
        for name, values in figures.items():
            shown = ", ".join(f"{1000 * value:.3f}" for value in values)
            print(f"client {name}: {shown} ms CPU per read ({ROUNDS} rounds)")
    for line in [*bench_json(answer), *bench_retry_loop()]:
        print(line)


if __name__ == "__main__":
    main()
