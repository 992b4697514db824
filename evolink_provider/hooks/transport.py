"""Transport: how a request to EvoLink is sent, one path for both clients.

An :class:`~evolink_provider.hooks.connection.ApiRequest` is sent by the sync client (``requests``, one
session per hook) or the async client (``aiohttp``, one session per event loop, shared by every trigger
on it); :mod:`evolink_provider.hooks.responses` reads what comes back. The send loops are ``tenacity``
loops built by :meth:`~evolink_provider.hooks.retry.RetryPolicy.retrying`: they repeat what the retry table
allows, and nothing else.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
import uuid
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

from evolink_provider.exceptions import EvolinkError, EvolinkSubmissionUnknownError
from evolink_provider.hooks.connection import ApiRequest, EvolinkConnectionSettings, Timeouts
from evolink_provider.hooks.responses import (
    AnswerBody,
    answer_out_of_time,
    parse_response,
    read_capped,
    refused,
    transport_error,
)
from evolink_provider.hooks.retry import Kind, outcome_unknown

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # installed with aiohttp there
    from async_timeout import timeout

if TYPE_CHECKING:
    import aiohttp
    import requests

log = logging.getLogger(__name__)

T = TypeVar("T")


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


def send(
    session: requests.Session,
    request: ApiRequest,
    settings: EvolinkConnectionSettings,
    accept: Callable[[dict[str, Any]], T],
    deadline: float | None = None,
) -> T:
    """Send with retries; ``accept`` checks the answer inside the loop, so a malformed answer is
    retried like a garbled one."""
    retrying = settings.retry.retrying(request.kind, deadline, log, logging.WARNING)
    try:
        return retrying(lambda: accept(_send_once(session, request, settings.timeouts, deadline)))
    except EvolinkError as error:
        raise _give_up(request, error, retrying.statistics["attempt_number"]) from None


def upload(
    session: requests.Session,
    request: ApiRequest,
    settings: EvolinkConnectionSettings,
    stream: BinaryIO,
    filename: str,
    content_type: str,
    deadline: float,
) -> dict[str, Any]:
    """Send ``stream`` as a multipart upload, repeated (from its start) only where the retry policy's
    upload row allows (uploads are not idempotent), and, like :func:`send`, no retry waits past
    ``deadline`` nor is an answer read after it."""

    def attempt() -> dict[str, Any]:
        stream.seek(0)
        body = _MultipartBody(stream, filename, content_type)
        return _send_once(session, request, settings.timeouts, deadline, body)

    return settings.retry.retrying(request.kind, deadline, log, logging.WARNING)(attempt)


def _answer_until(timeouts: Timeouts, deadline: float | None) -> float:
    """When an answer's body must have arrived, counted from its headers: within one read timeout, and
    by the wait's deadline when there is one."""
    until = time.time() + timeouts.read
    return until if deadline is None else min(until, deadline)


def _send_once(
    session: requests.Session,
    request: ApiRequest,
    timeouts: Timeouts,
    deadline: float | None = None,
    body: _MultipartBody | None = None,
) -> dict[str, Any]:
    """One exchange: ``request``'s JSON body, or the multipart ``body`` of an upload."""
    import requests

    headers = request.headers if body is None else {**request.headers, "Content-Type": body.content_type}
    try:
        response = session.request(
            request.method,
            request.url,
            headers=headers,
            json=request.json_body,
            data=body,
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


# -- async client ---------------------------------------------------------------------------------


async def asend(
    request: ApiRequest,
    settings: EvolinkConnectionSettings,
    accept: Callable[[dict[str, Any]], T],
    deadline: float | None = None,
) -> T:
    """:func:`send` on this event loop's shared ``aiohttp`` session."""

    async def attempt() -> T:
        return accept(await _asend_once(request, settings.timeouts, deadline))

    # INFO, not WARNING: a trigger's poll failures are counted and reported by the trigger.
    retrying = settings.retry.retrying(request.kind, deadline, log, logging.INFO, asynchronous=True)
    try:
        return await retrying(attempt)
    except EvolinkError as error:
        raise _give_up(request, error, retrying.statistics["attempt_number"]) from None


async def _asend_once(
    request: ApiRequest, timeouts: Timeouts, deadline: float | None = None
) -> dict[str, Any]:
    """One exchange, all of it (the wait for a free connection, connecting, the answer) by the time
    :func:`_answer_until` gives; any ``aiohttp`` failure leaves as an :class:`EvolinkTransportError` in a few
    words (its exceptions' texts and reprs carry the URL and the request headers, so the key), with no
    exception chained to it."""
    until = _answer_until(timeouts, deadline)
    if until <= time.time():
        raise answer_out_of_time(request)
    client = await _loop_client()
    origin = client.origin(request.url)
    if not await origin.take_slot(until):
        raise answer_out_of_time(request)
    try:
        return await _exchange(client.session, origin, request, timeouts, until)
    finally:
        origin.slots.release()


async def _exchange(
    session: aiohttp.ClientSession, origin: _Origin, request: ApiRequest, timeouts: Timeouts, until: float
) -> dict[str, Any]:
    """The exchange itself, once this origin's slot is held (see :func:`_asend_once`)."""
    import aiohttp

    failure: EvolinkError | None = None
    try:
        async with session.request(
            request.method,
            request.url,
            headers=request.headers,
            json=request.json_body,
            **origin.proxy,
            allow_redirects=False,
            # ceil_threshold: aiohttp rounds longer timeouts up to a whole second; a deadline is exact.
            timeout=aiohttp.ClientTimeout(
                total=until - time.time(), sock_connect=timeouts.connect, ceil_threshold=float("inf")
            ),
        ) as response:
            answer = AnswerBody(request, response.headers.get("Content-Encoding"), until)
            try:
                async for chunk in response.content.iter_any():
                    answer.add(chunk)
                content = answer.content()
            except EvolinkError:
                response.close()  # the rest is never read: drop the connection
                raise
            status, headers = response.status, {name.lower(): v for name, v in response.headers.items()}
    except EvolinkError:
        raise
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        failure = transport_error(request, exc, request_sent=False)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
        failure = (
            answer_out_of_time(request)
            if isinstance(exc, asyncio.TimeoutError)
            else transport_error(request, exc, request_sent=True)
        )
    if failure is not None:
        raise failure  # outside the except: no aiohttp exception rides along as its context
    return parse_response(request, status, headers, content)


#: Connections per origin (scheme, host, port) and event loop: a silent host can hold this many, and no
#: more, while polls to other origins go on; a poll's wait for one counts against its own deadline.
CONNECTIONS_PER_ORIGIN = 32
#: Idle connections are kept this long (longer than the adaptive poll interval, else most polls would open
#: a new connection); below the common 60 s idle limit of load balancers, and a connection the server
#: closed first is retried like any dropped GET.
KEEPALIVE_SECONDS = 45.0


class _Origin:
    """What the requests of one event loop to one origin share: the proxy arguments (looked up once) and
    the slots for its CONNECTIONS_PER_ORIGIN connections.

    A poll takes a slot *before* aiohttp builds its request: a request waiting inside aiohttp for a free
    connection already holds its request, headers, URL and timer objects, and thousands of waiting
    triggers' worth of them outlive the young garbage collections, so the full collections that stall the
    triggerer's loop come more often (docs/benchmarks.md, issue 22).
    """

    __slots__ = ("proxy", "slots")

    def __init__(self, proxy: dict[str, Any]) -> None:
        self.proxy = proxy
        self.slots = asyncio.Semaphore(CONNECTIONS_PER_ORIGIN)

    async def take_slot(self, until: float) -> bool:
        """Take a slot, waiting for one at most until ``until`` (epoch seconds); False if time ran out."""
        if not self.slots.locked():
            await self.slots.acquire()  # free: taken without suspending
            return True
        try:
            # Not asyncio.wait_for: before Python 3.12 it wraps the wait in a task of its own.
            async with timeout(until - time.time()):
                await self.slots.acquire()
        except asyncio.TimeoutError:
            return False
        return True


class _LoopClient:
    """One event loop's ``aiohttp.ClientSession`` (the triggers of a triggerer share its connections) and
    the proxies the environment names (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``), read when it is
    built, as every other HTTP client of the deployment reads them.

    Not aiohttp's ``trust_env``: it looks the proxy up (and ``~/.netrc``) in a thread for every request,
    several times a poll's CPU (docs/benchmarks.md), and fails every request to a host that ``~/.netrc``
    names (it will not combine those credentials with the ``Authorization`` header). NO_PROXY is honoured
    alike, and a proxy is sent only its own credentials (``Proxy-Authorization``).
    """

    def __init__(self, session: aiohttp.ClientSession) -> None:
        import urllib.request

        self.session = session
        #: The task that closes the session when the loop ends (held here: a loop holds tasks weakly).
        self.keeper: asyncio.Task[None] | None = None
        self._proxies = urllib.request.getproxies()
        self._origins: dict[str, _Origin] = {}

    def origin(self, url: str) -> _Origin:
        """The shared state of requests to ``url``'s origin, built the first time."""
        key = "/".join(url.split("/", 3)[:3])  # scheme and host:port
        if key not in self._origins:
            self._origins[key] = _Origin(self._proxy_for(url))
        return self._origins[key]

    def _proxy_for(self, url: str) -> dict[str, Any]:
        """The ``proxy`` and ``proxy_auth`` arguments of a request to ``url`` (none: a direct connection)."""
        import urllib.request

        import aiohttp

        proxy = self._proxies.get(url.split(":", 1)[0]) or self._proxies.get("all")
        arguments: dict[str, Any] = {}
        if proxy and not urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
            parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            host = parts.netloc.rpartition("@")[2]
            arguments["proxy"] = urlunsplit((parts.scheme, host, parts.path, parts.query, ""))
            if parts.username:
                arguments["proxy_auth"] = aiohttp.BasicAuth(parts.username, parts.password or "")
        return arguments


#: This event loop's client, per loop.
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
#: Polls that arrive while the client is being built wait for that one build.
_CLIENT_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


async def _loop_client() -> _LoopClient:
    """This event loop's client, built the first time. ``aiohttp`` is imported in a thread: the import
    loads its CA bundle (tens of milliseconds) and must not stall the loop's other triggers."""
    loop = asyncio.get_running_loop()
    client = _CLIENTS.get(loop)
    if client is not None and not client.session.closed:
        return client
    async with _CLIENT_LOCKS.setdefault(loop, asyncio.Lock()):
        client = _CLIENTS.get(loop)
        if client is None or client.session.closed:
            aiohttp = await asyncio.to_thread(importlib.import_module, "aiohttp")
            session = aiohttp.ClientSession(
                connector=_connector(aiohttp)(
                    limit=0, limit_per_host=CONNECTIONS_PER_ORIGIN, keepalive_timeout=KEEPALIVE_SECONDS
                ),
                auto_decompress=False,  # AnswerBody decodes, bounded
                cookie_jar=aiohttp.DummyCookieJar(),  # an answer's cookies are not sent back
                skip_auto_headers=("Accept-Encoding",),
            )
            client = _CLIENTS[loop] = _LoopClient(session)
            client.keeper = loop.create_task(_close_when_the_loop_ends(loop, client))
    return client


#: Other per-loop state (the hooks' connection readings and batchers), dropped with the loop's session.
PER_LOOP_STATE: list[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]] = [_CLIENT_LOCKS]


async def _close_when_the_loop_ends(loop: asyncio.AbstractEventLoop, client: _LoopClient) -> None:
    """Wait until cancelled, then close the loop's session and drop its per-loop state. The session (and
    what the per-loop maps hold) keeps the loop alive, so a weak key alone never dies; ``asyncio.run``
    (``dag.test()``, one per deferral) and the triggerer's shutdown cancel pending tasks and let them
    finish, so a loop that ends leaves no session, loop or socket behind."""
    try:
        await loop.create_future()
    finally:
        if _CLIENTS.get(loop) is client:
            del _CLIENTS[loop]
        for state in PER_LOOP_STATE:
            state.pop(loop, None)
        await client.session.close()


def _connector(aiohttp: Any) -> type[aiohttp.TCPConnector]:
    """``aiohttp.TCPConnector`` that never lends out an idle connection on which bytes arrived that no
    request asked for: aiohttp parses them into an answer and hands it to the next request on that
    connection (a desync: one poll reading another's, or a smuggled, answer; httpcore drops such a
    connection too). Such a connection is closed and the next one taken.

    ``should_close`` (no underscore, but undocumented) is read because no documented aiohttp API says
    whether a pooled connection holds unread bytes; ``force_close`` would close that gap by opening a
    connection (a TLS handshake) per poll, many times a poll's CPU. Bytes that arrive between this check
    and the answer are the answer to any HTTP/1.1 client; a task read must still name the task asked for.
    """

    class FreshConnector(aiohttp.TCPConnector):
        async def connect(self, *args: Any, **kwargs: Any) -> aiohttp.connector.Connection:
            while True:
                connection = await super().connect(*args, **kwargs)
                if connection.protocol is None or not connection.protocol.should_close:
                    return connection
                connection.close()

    return FreshConnector


async def aclose_async_clients() -> None:
    """Close this event loop's session (tests and benchmarks; the triggerer never needs it)."""
    client = _CLIENTS.pop(asyncio.get_running_loop(), None)
    if client is not None:
        if client.keeper is not None:
            client.keeper.cancel()
        await client.session.close()


# -- giving up ----------------------------------------------------------------------------------------


def _give_up(request: ApiRequest, error: EvolinkError, attempts: int) -> EvolinkError:
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
