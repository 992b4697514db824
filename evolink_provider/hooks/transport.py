"""Transport: how a request to EvoLink is built and sent, one path for both clients.

A :class:`_Request` is built once (the key only in its headers) and sent by the sync client
(``requests``, one session per hook) or the async client (``httpx``, pools shared by every trigger of an
event loop); :mod:`evolink_provider.hooks.responses` reads what comes back. The send loops repeat what
:class:`~evolink_provider.hooks.retry.RetryPolicy` allows, and nothing else: one call decides for both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from evolink_provider import __version__
from evolink_provider.exceptions import EvolinkError, EvolinkSubmissionUnknownError
from evolink_provider.hooks.connection import EvolinkConnectionSettings, Timeouts
from evolink_provider.hooks.responses import (
    aread_capped,
    parse_response,
    read_capped,
    refused,
    transport_error,
)
from evolink_provider.hooks.retry import Kind, RetryPolicy, Verdict, outcome_unknown

if TYPE_CHECKING:
    import httpx
    import requests

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = f"airflow-provider-evolink/{__version__}"


@dataclass(frozen=True)
class _Request:
    """A request both clients can send: built once, the key only in ``headers``."""

    method: str
    url: str
    path: str
    headers: dict[str, str] = field(repr=False)
    json_body: Any = None
    #: A POST that only reads (the batch task read): safe to repeat, creates nothing.
    read_only: bool = False
    #: Who is asked, for error messages: ``EvoLink connection 'id' (base URL)``; never the key.
    connection: str = ""

    @property
    def kind(self) -> Kind:
        """Its row of the retry table: a POST that creates is a submission when it carries an
        ``Idempotency-Key``, else an upload (only failures that cannot have stored anything repeat)."""
        if self.method != "POST" or self.read_only:
            return Kind.READ
        return Kind.SUBMISSION if "Idempotency-Key" in self.headers else Kind.UPLOAD


def build_request(
    settings: EvolinkConnectionSettings,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    idempotency_key: str | None = None,
    base_url: str | None = None,
    read_only: bool = False,
) -> _Request:
    """A request to ``path`` on the connection's base URL (or ``base_url``), with the key."""
    headers = {
        "Authorization": f"Bearer {settings.api_key.reveal()}",
        "User-Agent": USER_AGENT,
        "Accept": "application/json",
        # Not br/zstd (whatever the clients have installed): the body is decoded here, bounded.
        "Accept-Encoding": "gzip, deflate",
    }
    if json_body is not None:
        headers["Content-Type"] = "application/json"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    base = base_url or settings.base_url
    connection = f"EvoLink connection {settings.conn_id!r} ({base})"
    return _Request(method, f"{base}{path}", path, headers, json_body, read_only, connection)


class _MultipartBody:
    """A ``multipart/form-data`` body with one file part, read from ``stream`` while it is sent, so an
    upload never sits whole in memory; its length is known up front (``Content-Length``)."""

    def __init__(self, stream: BinaryIO, filename: str, content_type: str) -> None:
        import re

        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:200] or "upload"  # no header injection
        self._head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        self._stream = stream
        start = stream.tell()
        self._size = stream.seek(0, 2) - start
        stream.seek(start)
        self._parts = iter((self._head, stream, self._tail))
        self._current: Any = next(self._parts)

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def read(self, size: int = -1) -> bytes:
        while self._current is not None:
            if isinstance(self._current, bytes):
                chunk, self._current = self._current, next(self._parts, None)
                return chunk
            chunk = self._current.read(size if size and size > 0 else 64 * 1024)
            if chunk:
                return bytes(chunk)
            self._current = next(self._parts, None)
        return b""


# -- sync client ----------------------------------------------------------------------------------


def new_session() -> requests.Session:
    """A ``requests.Session`` for one hook, so its calls reuse keep-alive connections."""
    import requests

    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def send(
    session: requests.Session,
    request: _Request,
    settings: EvolinkConnectionSettings,
    accept: Callable[[dict[str, Any]], T],
    deadline: float | None = None,
) -> T:
    """Send with retries; ``accept`` checks the answer inside the loop, so a malformed answer is
    retried like a garbled one."""
    for attempt in range(1, settings.retry.max_attempts + 1):
        try:
            return accept(_send_once(session, request, settings.timeouts, deadline))
        except EvolinkError as error:
            time.sleep(_wait_before_retry(request, settings.retry, attempt, error, logging.WARNING, deadline))
    raise AssertionError("unreachable: the loop returns or raises")


def upload(
    session: requests.Session,
    request: _Request,
    settings: EvolinkConnectionSettings,
    stream: BinaryIO,
    filename: str,
    content_type: str,
) -> dict[str, Any]:
    """Send ``stream`` as a multipart upload, repeated (from its start) only where the retry policy's
    upload row allows: uploads are not idempotent."""
    for attempt in range(1, settings.retry.max_attempts + 1):
        stream.seek(0)
        try:
            return _send_multipart(session, request, settings.timeouts, stream, filename, content_type)
        except EvolinkError as error:
            time.sleep(_wait_before_retry(request, settings.retry, attempt, error, logging.WARNING))
    raise AssertionError("unreachable: the loop returns or raises")


def _answer_until(timeouts: Timeouts, deadline: float | None) -> float:
    """When an answer's body must have arrived, counted from its headers: within one read timeout, and
    by the wait's deadline when there is one."""
    until = time.time() + timeouts.read
    return until if deadline is None else min(until, deadline)


def _send_once(
    session: requests.Session, request: _Request, timeouts: Timeouts, deadline: float | None = None
) -> dict[str, Any]:
    import requests

    try:
        response = session.request(
            request.method,
            request.url,
            headers=request.headers,
            json=request.json_body,
            timeout=(timeouts.connect, timeouts.read),
            allow_redirects=False,
            stream=True,
        )
        content = read_capped(request, response, _answer_until(timeouts, deadline))
    except (requests.ConnectTimeout, requests.exceptions.SSLError) as exc:
        raise transport_error(request, exc, request_sent=False) from None
    except requests.ConnectionError as exc:
        raise transport_error(request, exc, request_sent=not refused(exc)) from None
    except requests.RequestException as exc:  # read timeouts, chunked-encoding errors, ...
        raise transport_error(request, exc, request_sent=True) from None
    return parse_response(request, response.status_code, response.headers, content)


def _send_multipart(
    session: requests.Session,
    request: _Request,
    timeouts: Timeouts,
    stream: BinaryIO,
    filename: str,
    content_type: str,
) -> dict[str, Any]:
    import requests

    body = _MultipartBody(stream, filename, content_type)
    try:
        response = session.post(
            request.url,
            headers={**request.headers, "Content-Type": body.content_type},
            data=body,
            timeout=(timeouts.connect, timeouts.read),
            allow_redirects=False,
            stream=True,
        )
        content = read_capped(request, response, _answer_until(timeouts, None))
    except requests.ConnectionError as exc:
        raise transport_error(request, exc, request_sent=not refused(exc)) from None
    except requests.RequestException as exc:
        raise transport_error(request, exc, request_sent=True) from None
    return parse_response(request, response.status_code, response.headers, content)


# -- async client ---------------------------------------------------------------------------------


async def asend(
    request: _Request,
    settings: EvolinkConnectionSettings,
    accept: Callable[[dict[str, Any]], T],
    deadline: float | None = None,
) -> T:
    """:func:`send` on this event loop's shared pool."""
    for attempt in range(1, settings.retry.max_attempts + 1):
        try:
            return accept(await _asend_once(request, settings.timeouts, deadline))
        except EvolinkError as error:
            # INFO, not WARNING: a trigger's poll failures are counted and reported by the trigger.
            await asyncio.sleep(
                _wait_before_retry(request, settings.retry, attempt, error, logging.INFO, deadline)
            )
    raise AssertionError("unreachable: the loop returns or raises")


async def _asend_once(request: _Request, timeouts: Timeouts, deadline: float | None = None) -> dict[str, Any]:
    import httpx

    try:
        async with (
            (await _shared_pool(timeouts)).client() as client,
            client.stream(
                request.method, request.url, headers=request.headers, json=request.json_body
            ) as response,
        ):
            content = await aread_capped(request, response, _answer_until(timeouts, deadline))
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        raise transport_error(request, exc, request_sent=False) from None
    except httpx.HTTPError as exc:  # read timeouts, resets mid-answer, protocol errors
        raise transport_error(request, exc, request_sent=True) from None
    return parse_response(request, response.status_code, response.headers, content)


class _SharedPool:
    """The HTTP connections all triggers of one event loop share, as a few small httpx pools.

    Why not one httpx client with a large pool: each time a request starts or ends, httpcore examines
    every pooled connection (a ``getpeername`` and a readability check each) and every queued request, so
    a poll costs O(pool + queue). Measured at N=5,000 triggers: 14 ms of CPU per poll with 5,000 requests
    queued in one pool of 64, 6.3 ms with the queue held outside the pool, 1.6 ms with pools of 16.
    Small pools, each behind an ``asyncio.Semaphore`` (O(1) to wait on), keep that scan short.

    Building it takes 60-70 ms of CPU (mostly SSL contexts loading the CA bundle), so it is built once per
    event loop, in a thread (:func:`_shared_pool`), and its clients share one SSL context.
    """

    def __init__(self, timeouts: Timeouts) -> None:
        import httpx

        ssl_context = httpx.create_ssl_context()
        limits = httpx.Limits(
            max_connections=ASYNC_SHARD_SIZE,
            max_keepalive_connections=ASYNC_SHARD_SIZE,
            keepalive_expiry=ASYNC_KEEPALIVE_SECONDS,
        )
        timeout = httpx.Timeout(timeouts.read, connect=timeouts.connect, pool=None)
        self._shards = [
            (
                httpx.AsyncClient(timeout=timeout, limits=limits, verify=ssl_context, follow_redirects=False),
                asyncio.Semaphore(ASYNC_SHARD_SIZE),
            )
            for _ in range(max(1, ASYNC_POOL_SIZE // ASYNC_SHARD_SIZE))
        ]
        self._turn = itertools.count()

    @property
    def is_closed(self) -> bool:
        return any(client.is_closed for client, _ in self._shards)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[httpx.AsyncClient]:
        """The first client with a free connection slot, so that light load reuses few connections;
        when all are busy, the clients take the waiters in turn."""
        free = (shard for shard in self._shards if not shard[1].locked())
        client, slots = next(free, None) or self._shards[next(self._turn) % len(self._shards)]
        async with slots:
            yield client

    async def aclose(self) -> None:
        for client, _ in self._shards:
            await client.aclose()


# One shared pool per event loop: triggers share it instead of opening a client, and TCP connections, per
# poll. The triggerer's loop lives as long as the process.
_SHARED_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Timeouts, _SharedPool]] = (
    weakref.WeakKeyDictionary()
)
#: Connections per event loop, and per httpx pool within it (see :class:`_SharedPool`).
ASYNC_POOL_SIZE = 32
ASYNC_SHARD_SIZE = 8
#: Idle pooled connections are kept this long (httpx's default is 5 s, shorter than the adaptive poll
#: interval, so most polls would open a new connection); below the common 60 s idle limit of load
#: balancers, and a connection the server closed first is retried like any dropped GET.
ASYNC_KEEPALIVE_SECONDS = 45.0


async def _shared_pool(timeouts: Timeouts) -> _SharedPool:
    """This event loop's pool for ``timeouts``, built off the loop the first time (never blocks it)."""
    loop = asyncio.get_running_loop()
    pools = _SHARED_POOLS.setdefault(loop, {})
    pool = pools.get(timeouts)
    if pool is not None and not pool.is_closed:
        return pool
    async with _POOL_BUILD_LOCKS.setdefault(loop, asyncio.Lock()):
        pool = pools.get(timeouts)
        if pool is None or pool.is_closed:
            pool = pools[timeouts] = await asyncio.to_thread(_SharedPool, timeouts)
    return pool


#: Polls that arrive while the pool is being built wait for that one build.
_POOL_BUILD_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def aclose_async_clients() -> None:
    """Close this event loop's shared clients (tests and benchmarks; the triggerer never needs it)."""
    for pool in _SHARED_POOLS.pop(asyncio.get_running_loop(), {}).values():
        await pool.aclose()


# -- retries ----------------------------------------------------------------------------------------


def _wait_before_retry(
    request: _Request,
    policy: RetryPolicy,
    attempt: int,
    error: EvolinkError,
    level: int,
    deadline: float | None = None,
) -> float:
    """Seconds to wait before repeating ``request`` after ``error`` on ``attempt``, as the policy says;
    raises when it says stop. Every send loop calls it, so they cannot drift apart."""
    decision = policy.decide(request.kind, attempt, error, deadline)
    if decision.verdict is Verdict.OUT_OF_TIME:
        log.log(level, "%s; no time left to retry", error)
    if decision.verdict is not Verdict.REPEAT:
        raise _give_up(request, error, attempt) from None
    log.log(level, "%s; attempt %d of %d in %.1fs", error, attempt + 1, policy.max_attempts, decision.delay)
    return decision.delay


def _give_up(request: _Request, error: EvolinkError, attempts: int) -> EvolinkError:
    """The error to raise once retrying stops."""
    if request.kind is Kind.SUBMISSION and outcome_unknown(error):
        key = request.headers.get("Idempotency-Key", "")
        detail = getattr(error, "detail", None) or str(error)
        return EvolinkSubmissionUnknownError(
            f"{request.connection}: {request.method} {request.path}: whether EvoLink created (and bills) "
            f"the task is unknown after {attempts} attempt(s) (last: {detail}). Look it up in the "
            f"EvoLink dashboard by Idempotency-Key {key}; an Airflow retry resubmits with the same key, "
            "which EvoLink answers with the original task.",
            idempotency_key=key,
        )
    return error
