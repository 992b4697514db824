"""Transport: how a request to EvoLink is built and sent, one path for both clients.

A :class:`_Request` is built once (the key only in its headers) and sent by the sync client
(``requests``, one session per hook) or the async client (:mod:`~evolink_provider.hooks.http11`
connections, one pool shared by every trigger of an event loop);
:mod:`evolink_provider.hooks.responses` reads what comes back. The send loops repeat what
:class:`~evolink_provider.hooks.retry.RetryPolicy` allows, and nothing else: one call decides for both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

from evolink_provider import __version__
from evolink_provider.exceptions import EvolinkError, EvolinkSubmissionUnknownError
from evolink_provider.hooks.connection import EvolinkConnectionSettings, Timeouts
from evolink_provider.hooks.http11 import Http11Connection, Origin
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
    import h11

    pool = await _shared_pool(timeouts)
    if pool.proxied(request.url):
        return await _asend_through_proxy(pool, request, timeouts, deadline)
    parts = urlsplit(request.url)
    body = (
        None if request.json_body is None else json.dumps(request.json_body, separators=(",", ":")).encode()
    )
    target = f"{parts.path}?{parts.query}" if parts.query else parts.path
    tls = parts.scheme == "https"
    async with pool.connection(
        (parts.scheme, parts.hostname or "", parts.port or (443 if tls else 80))
    ) as connect:
        try:
            connection = await connect()
        except OSError as exc:  # refused, unresolved, TLS verification, connect timeout
            raise transport_error(request, exc, request_sent=False) from None
        try:
            status, headers, content = await connection.exchange(
                request, target, body, _answer_until(timeouts, deadline)
            )
        except (OSError, h11.ProtocolError) as exc:  # resets, timeouts, malformed answers
            raise transport_error(request, exc, request_sent=True) from None
        finally:
            pool.release(connection)
    return parse_response(request, status, headers, content)


async def _asend_through_proxy(
    pool: _SharedPool, request: _Request, timeouts: Timeouts, deadline: float | None
) -> dict[str, Any]:
    """The same exchange through httpx, which speaks to the proxy the environment names."""
    import httpx

    try:
        async with (
            pool.slots,
            pool.proxy_client.stream(
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
    """The HTTP connections all triggers of one event loop share: at most :data:`ASYNC_POOL_SIZE` open,
    idle ones kept per origin (newest reused first) for :data:`ASYNC_KEEPALIVE_SECONDS`.

    A poll waits on an ``asyncio.Semaphore`` (O(1)) for a connection slot, then takes an idle connection
    or opens one (:mod:`evolink_provider.hooks.http11` says why not httpx). Where the environment names a
    proxy for the base URL (``HTTPS_PROXY``, ``NO_PROXY``, ...), requests go through one httpx client
    instead, as before, which speaks to the proxy.

    Building it takes 60-70 ms of CPU (the SSL context loads the CA bundle), so it is built once per event
    loop, in a thread (:func:`_shared_pool`).
    """

    def __init__(self, timeouts: Timeouts) -> None:
        import urllib.request

        import httpx  # its SSL context: certifi's bundle, or SSL_CERT_FILE / SSL_CERT_DIR

        self.timeouts = timeouts
        self.ssl_context = httpx.create_ssl_context()
        self.slots = asyncio.Semaphore(ASYNC_POOL_SIZE)
        self._idle: dict[Origin, list[Http11Connection]] = {}
        self._proxies = urllib.request.getproxies()
        self._proxy_client: httpx.AsyncClient | None = None
        self.is_closed = False

    def proxied(self, url: str) -> bool:
        """Whether the environment sends ``url`` through a proxy."""
        if not self._proxies:
            return False
        parts = urlsplit(url)
        import urllib.request

        named = parts.scheme in self._proxies or "all" in self._proxies
        return named and not urllib.request.proxy_bypass(parts.hostname or "")

    @property
    def proxy_client(self) -> httpx.AsyncClient:
        import httpx

        if self._proxy_client is None:
            self._proxy_client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeouts.read, connect=self.timeouts.connect, pool=None),
                limits=httpx.Limits(
                    max_connections=ASYNC_POOL_SIZE, keepalive_expiry=ASYNC_KEEPALIVE_SECONDS
                ),
                verify=self.ssl_context,
                follow_redirects=False,
            )
        return self._proxy_client

    @asynccontextmanager
    async def connection(self, origin: Origin) -> AsyncIterator[Callable[[], Awaitable[Http11Connection]]]:
        """Within a connection slot: a call that hands out an idle connection to ``origin``, or a new one."""

        async def connect() -> Http11Connection:
            idle = self._idle.get(origin)
            while idle:
                connection = idle.pop()
                if connection.reusable and connection.idle_since > time.monotonic() - ASYNC_KEEPALIVE_SECONDS:
                    return connection
                connection.close()
            return await Http11Connection.open(origin, self.ssl_context, self.timeouts.connect)

        async with self.slots:
            yield connect

    def release(self, connection: Http11Connection) -> None:
        """Keep ``connection`` for the next poll if it can carry one; close those idle too long."""
        idle = self._idle.setdefault(connection.origin, [])
        while idle and idle[0].idle_since < time.monotonic() - ASYNC_KEEPALIVE_SECONDS:
            idle.pop(0).close()
        if connection.reusable and not self.is_closed:
            idle.append(connection)

    async def aclose(self) -> None:
        self.is_closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        if self._proxy_client is not None:
            await self._proxy_client.aclose()


# One shared pool per event loop: triggers share it instead of opening a client, and TCP connections, per
# poll. The triggerer's loop lives as long as the process.
_SHARED_POOLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Timeouts, _SharedPool]] = (
    weakref.WeakKeyDictionary()
)
#: Connections per event loop (see :class:`_SharedPool`).
ASYNC_POOL_SIZE = 32
#: Idle pooled connections are kept this long (longer than the adaptive poll interval, else most polls
#: would open a new connection); below the common 60 s idle limit of load
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
