"""How an :class:`~evolink_provider.hooks.connection.ApiRequest` is sent: by the sync client (``requests``,
one session per hook) or the async client (``aiohttp``, one session per event loop, shared by its triggers),
each call in the ``tenacity`` loop :meth:`~evolink_provider.hooks.retry.RetryPolicy.retrying` builds, so
that only what the retry table allows is repeated. :mod:`evolink_provider.hooks.responses` reads the answers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from evolink_provider.exceptions import (
    EvolinkError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
)
from evolink_provider.hooks.connection import (
    ApiRequest,
    EvolinkConnectionSettings,
    Timeouts,
    answer_until,
    headers_as_given,
)
from evolink_provider.hooks.responses import (
    AnswerBody,
    answer_out_of_time,
    parse_response,
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
T_co = TypeVar("T_co", covariant=True)
READ_CHUNK = 64 * 1024


class Accept(Protocol[T_co]):
    """Checks a decoded answer (raising an :class:`EvolinkError` to refuse it) and returns what the call
    gives back; ``received_bytes`` is the length of the body it was decoded from."""

    def __call__(self, answer: dict[str, Any], *, received_bytes: int) -> T_co: ...


class MultipartBody:
    """A ``multipart/form-data`` body with one file part, streamed from the file's start each time it is
    sent (an upload never sits whole in memory); its length is known up front (``Content-Length``)."""

    def __init__(self, stream: BinaryIO, filename: str, content_type: str) -> None:
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        name = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[:200] or "upload"  # no header injection
        self._head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        self._stream = stream
        self._size = stream.seek(0, 2)

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        """Exactly the ``Content-Length`` announced: bytes past it would be read by the server as the
        connection's next request, so a file that grew or shrank since is refused mid-body."""
        self._stream.seek(0)
        yield self._head
        left = self._size
        while left > 0:
            chunk = self._stream.read(min(READ_CHUNK, left))
            if not chunk:
                raise EvolinkError(f"the file shrank below its {self._size} bytes while uploaded")
            left -= len(chunk)
            yield bytes(chunk)
        if self._stream.read(1):
            raise EvolinkError(f"the file grew past its {self._size} bytes while uploaded")
        yield self._tail


# -- sync client ----------------------------------------------------------------------------------


def send(
    session: requests.Session,
    request: ApiRequest,
    settings: EvolinkConnectionSettings,
    accept: Accept[T],
    deadline: float | None = None,
    body: MultipartBody | None = None,
) -> T:
    """Send with retries; ``accept`` checks the answer inside the loop, so a malformed answer is retried
    like a garbled one. ``body``: an upload's, sent instead of ``request``'s JSON."""
    retrying = settings.retry.retrying(request.kind, deadline, log, logging.WARNING)
    try:
        return retrying(
            lambda: _accepted(accept, _send_once(session, request, settings.timeouts, deadline, body))
        )
    except EvolinkError as error:
        raise _give_up(request, error, retrying.statistics["attempt_number"]) from None


def _answer_until(timeouts: Timeouts, deadline: float | None) -> float:
    """When an answer must have arrived: within one read timeout, and by the deadline when there is one."""
    until = time.time() + timeouts.read
    return until if deadline is None else min(until, deadline)


def _send_once(
    session: requests.Session,
    request: ApiRequest,
    timeouts: Timeouts,
    deadline: float | None = None,
    body: MultipartBody | None = None,
) -> tuple[dict[str, Any], int]:
    """One exchange: the decoded answer and the length of its body, read raw and decoded by
    :class:`AnswerBody`; ``read1`` returns what one socket read brings, so the time bound is checked as
    bytes trickle in."""
    import requests
    import urllib3

    headers = request.headers if body is None else {**request.headers, "Content-Type": body.content_type}
    until = _answer_until(timeouts, deadline)
    left = until - time.time()
    if left <= 0:
        raise answer_out_of_time(request)
    try:
        with answer_until(until):  # the header phase too (see sync_session)
            response = session.request(
                request.method,
                request.url,
                headers=headers,
                json=request.json_body,
                data=body,
                # No socket wait outlasts the deadline.
                timeout=(min(timeouts.connect, left), left),
                allow_redirects=False,
                stream=True,
                auth=headers_as_given,
            )
        if 100 <= response.status_code < 200:  # an interim answer http.client takes for the final one
            response.close()  # the final answer behind it is never read as another request's
            raise EvolinkTransportError(
                f"{request.where} answered an interim HTTP {response.status_code} where its answer was due",
                request_sent=True,
            )
        answer = AnswerBody(request, response.headers.get("content-encoding"), until)
        try:
            while chunk := response.raw.read1(READ_CHUNK, decode_content=False):
                answer.add(chunk)
            content = answer.content()
        except EvolinkError:
            response.close()  # the rest is never read: drop the connection
            raise
    except requests.ConnectTimeout as exc:
        raise transport_error(request, exc, request_sent=False) from None
    except requests.ConnectionError as exc:  # TLS errors (SSLError) too: see refused()
        raise transport_error(request, exc, request_sent=not refused(exc)) from None
    # Read timeouts and chunked-encoding errors (requests), a reset or timeout mid-answer (urllib3, OSError).
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise transport_error(request, exc, request_sent=True) from None
    return parse_response(request, response.status_code, response.headers, content), len(content)


# -- async client ---------------------------------------------------------------------------------


async def asend(
    request: ApiRequest,
    settings: EvolinkConnectionSettings,
    accept: Accept[T],
    deadline: float | None = None,
) -> T:
    """:func:`send` on this event loop's shared ``aiohttp`` session.

    The first attempt runs before ``tenacity`` is built: most polls succeed at once, and building its loop
    costs a tenth of a poll's CPU (docs/benchmarks.md). A failed first attempt is handed to the loop as its
    own first outcome, so the loop decides on it and on every repeat exactly as on a call it made itself."""
    try:
        return _accepted(accept, await _asend_once(request, settings.timeouts, deadline))
    except EvolinkError as error:
        first_outcome: list[EvolinkError] = [error]

    async def attempt() -> T:
        if first_outcome:
            raise first_outcome.pop()
        return _accepted(accept, await _asend_once(request, settings.timeouts, deadline))

    # INFO, not WARNING: a trigger's poll failures are counted and reported by the trigger.
    retrying = settings.retry.retrying(request.kind, deadline, log, logging.INFO, asynchronous=True)
    try:
        return await retrying(attempt)
    except EvolinkError as error:
        raise _give_up(request, error, retrying.statistics["attempt_number"]) from None


async def _asend_once(
    request: ApiRequest, timeouts: Timeouts, deadline: float | None = None
) -> tuple[dict[str, Any], int]:
    """One exchange, all of it (the wait for a connection slot, connecting, the answer) by the time
    :func:`_answer_until` gives. An ``aiohttp`` failure leaves as an :class:`EvolinkTransportError` with no
    exception chained: aiohttp's texts and reprs carry the URL and the request headers, so the key."""
    until = _answer_until(timeouts, deadline)
    if until <= time.time():
        raise answer_out_of_time(request)
    client = await _loop_client()
    import aiohttp  # imported by _loop_client, in a thread

    origin = client.origin(request.url)
    if not await origin.take_slot(until):
        raise answer_out_of_time(request)
    left = until - time.time()
    if left <= 0:  # aiohttp reads a total of 0 or less as no time limit at all
        origin.slots.release()
        raise answer_out_of_time(request)
    failure: EvolinkError | None = None
    try:
        async with client.session.request(
            request.method,
            request.url,
            headers=request.headers,
            json=request.json_body,
            **origin.proxy,
            allow_redirects=False,
            # ceil_threshold: aiohttp rounds longer timeouts up to a whole second; a deadline is exact.
            timeout=aiohttp.ClientTimeout(
                total=left, sock_connect=timeouts.connect, ceil_threshold=float("inf")
            ),
        ) as response:
            answer = AnswerBody(request, response.headers.get("Content-Encoding"), until)
            try:
                while chunk := await response.content.readany():
                    answer.add(chunk)
                content = answer.content()
            except EvolinkError:
                response.close()  # the rest is never read: drop the connection
                raise
            status, headers = response.status, response.headers  # names case-insensitive, as requests'
    except EvolinkError:
        raise
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        failure = transport_error(request, exc, request_sent=False)
    except asyncio.TimeoutError:
        failure = answer_out_of_time(request)
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        failure = transport_error(request, exc, request_sent=True)
    finally:
        origin.slots.release()
    if failure is not None:
        raise failure  # outside the except: no aiohttp exception rides along as its context
    return parse_response(request, status, headers, content), len(content)


def _accepted(accept: Accept[T], exchange: tuple[dict[str, Any], int]) -> T:
    answer, received_bytes = exchange
    return accept(answer, received_bytes=received_bytes)


#: Connections per origin (scheme, host, port) and event loop: a silent host can hold this many, and no
#: more, while polls to other origins go on.
CONNECTIONS_PER_ORIGIN = 32
#: Longer than the adaptive poll interval (else most polls would open a connection), shorter than the common
#: 60 s idle limit of load balancers.
KEEPALIVE_SECONDS = 45.0


class _Origin:
    """What one event loop's requests to one origin share: the proxy arguments, looked up once, and the
    slots of its connections. A poll takes its slot *before* aiohttp builds the request: requests queued
    inside aiohttp hold objects that outlive young collections (docs/benchmarks.md)."""

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
    """One event loop's ``aiohttp`` session and the environment's proxies (``HTTP(S)_PROXY``, ``ALL_PROXY``,
    ``NO_PROXY``), read once. Not aiohttp's ``trust_env``: it reads them and ``~/.netrc`` in a thread per
    request (docs/benchmarks.md), and fails every request to a host ``~/.netrc`` names."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        import urllib.request

        self.session = session
        #: The task that closes the session when the loop ends (held here: a loop holds tasks weakly).
        self.keeper: asyncio.Task[None] | None = None
        self._proxies = urllib.request.getproxies()
        self._origins: dict[str, _Origin] = {}

    def origin(self, url: str) -> _Origin:
        key = "/".join(url.split("/", 3)[:3])  # scheme and host:port
        if key not in self._origins:
            self._origins[key] = _Origin(self._proxy_for(url))
        return self._origins[key]

    def _proxy_for(self, url: str) -> dict[str, Any]:
        """The ``proxy`` and ``proxy_auth`` arguments of a request to ``url`` (none: a direct connection);
        a proxy gets its own credentials only, as ``Proxy-Authorization``."""
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


_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
#: Polls that arrive while the loop's client is being built wait for that one build.
_CLIENT_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
#: Per-loop state dropped with the loop's session (the hook adds its connection readings and batchers).
PER_LOOP_STATE: list[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]] = [_CLIENT_LOCKS]


async def _loop_client() -> _LoopClient:
    """This event loop's client, built the first time. ``aiohttp`` is imported in a thread: the import loads
    its CA bundle (tens of milliseconds) and must not stall the loop's other triggers."""
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


async def _close_when_the_loop_ends(loop: asyncio.AbstractEventLoop, client: _LoopClient) -> None:
    """Wait until cancelled (``asyncio.run`` and the triggerer's shutdown cancel pending tasks), then close
    the loop's session and drop its per-loop state: they keep the loop alive, so its weak keys never die."""
    try:
        await loop.create_future()
    finally:
        if _CLIENTS.get(loop) is client:
            del _CLIENTS[loop]
        for state in PER_LOOP_STATE:
            state.pop(loop, None)
        await client.session.close()


def _connector(aiohttp: Any) -> type[aiohttp.TCPConnector]:
    """A ``TCPConnector`` that never lends out an idle connection on which unasked bytes arrived: aiohttp
    would hand them to the next request as its answer (a desync, or a smuggled answer). It reads
    ``should_close`` (public, undocumented) since no documented API tells; ``force_close`` would cost a TLS
    handshake per poll."""

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


def _give_up(request: ApiRequest, error: EvolinkError, attempts: int) -> EvolinkError:
    """The error to raise once retrying stops: a submission whose outcome is unknown names its key."""
    if request.kind is Kind.SUBMISSION and outcome_unknown(error):
        key = request.headers.get("Idempotency-Key", "")
        detail = getattr(error, "detail", None) or str(error)
        return EvolinkSubmissionUnknownError(
            f"{request.where}: whether EvoLink created (and bills) the task is unknown after {attempts} "
            f"attempt(s) (last: {detail}). Look it up in the EvoLink dashboard by Idempotency-Key {key}; an "
            "Airflow retry resubmits with the same key, which EvoLink answers with the original task.",
            idempotency_key=key,
        )
    return error
