"""EvolinkHook: the only place that speaks HTTP to EvoLink.

It owns the connection (base URL, API key, timeouts, retry settings), one request-building and one
response-parsing path shared by the sync client (``requests``) and the async client (``httpx``), the retry
policy, and the mapping of EvoLink's error bodies to :mod:`evolink_provider.exceptions`.

Retry rule (the same for both clients):

* ``GET`` (and the read-only ``POST /v1/tasks/batch``) is always safe to repeat: it is retried on
  connection failures, timeouts, garbled bodies, 429, 5xx and the transient "no available channel" 400
  codes.
* ``POST /v1/videos/generations`` always carries an ``Idempotency-Key``. It is retried only with that same
  key, and only where the answer was a connection failure or timeout, 429, 5xx or a transient 400 code.
  EvoLink's gateway replays the original task for a repeated key (observed, not documented), so a retry
  after a lost answer does not create a second task. Because the replay is only observed, a POST whose
  outcome is still unknown when the retries run out raises
  :class:`~evolink_provider.exceptions.EvolinkSubmissionUnknownError` naming the key, rather than
  pretending nothing happened; the operators reuse the same key on an Airflow retry.
* Other 4xx answers are never retried: repeating them cannot succeed.

Waits between attempts grow exponentially with full jitter, bounded by ``backoff_max``; a ``Retry-After``
header (seconds or an HTTP date) is honoured up to ``retry_after_max``. A call given a ``deadline`` (the
operator's wait budget) does not sleep past it: it raises the last error instead.

Nothing received is trusted (see :mod:`evolink_provider.answers`): answers are read with a size cap and
decoded strictly, task objects are checked before they are returned, and result downloads connect only to
the address that passed the private-address check.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar
from urllib.parse import SplitResult, urljoin, urlsplit

from evolink_provider import __version__
from evolink_provider.answers import MAX_ANSWER_BYTES, checked_task, loads_strict, task_id_to_send
from evolink_provider.compat import BaseHook, hook_field_behaviour
from evolink_provider.exceptions import (
    PAID_OUTCOME_UNKNOWN,
    EvolinkAPIError,
    EvolinkAuthenticationError,
    EvolinkBadAnswerError,
    EvolinkConfigurationError,
    EvolinkError,
    EvolinkNotFoundError,
    EvolinkRefusedError,
    EvolinkSubmissionUnknownError,
    EvolinkTransportError,
    EvolinkWaitTimeoutError,
    error_for_status,
)
from evolink_provider.hooks.task_batcher import TaskBatcher, tasks_in_batch_answer

if TYPE_CHECKING:
    import httpx
    import requests
    from airflow.sdk import Connection

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.evolink.ai"
DEFAULT_FILES_BASE_URL = "https://files-api.evolink.ai"
USER_AGENT = f"airflow-provider-evolink/{__version__}"
CREATE_VIDEO_PATH = "/v1/videos/generations"
CREDITS_PATH = "/v1/credits"
FILES_UPLOAD_PATH = "/api/v1/files/upload/stream"
FILES_QUOTA_PATH = "/api/v1/files/quota"
#: Observed, undocumented: reads up to 50 tasks in one call (used only with ``batch_polling``).
TASK_BATCH_PATH = "/v1/tasks/batch"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is repeated (see the module docstring for *which* calls)."""

    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 30.0
    retry_after_max: float = 120.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
        jittered = random.uniform(ceiling / 2, ceiling)
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_max) + random.uniform(0, ceiling / 10)
        return jittered


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts in seconds, one policy for both clients."""

    connect: float = 10.0
    read: float = 60.0


class _ApiKey:
    """Holds the key so that no ``repr``, log line or traceback local can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<EvoLink API key ***>"

    __str__ = __repr__


@dataclass(frozen=True)
class EvolinkConnectionSettings:
    """Everything the hook reads from the Airflow connection, resolved once."""

    conn_id: str
    base_url: str
    files_base_url: str
    api_key: _ApiKey = field(repr=False)
    timeouts: Timeouts
    retry: RetryPolicy
    batch_polling: bool = False
    #: Folders and storage-URI prefixes local inputs may be uploaded from; empty means the DAGs folder.
    upload_allowed_dirs: tuple[str, ...] = ()

    @cached_property
    def batch_owner(self) -> tuple[str, str]:
        """Whose tasks a batch may hold: the base URL and a digest of the key (never the key itself)."""
        return self.base_url, hashlib.sha256(self.api_key.reveal().encode()).hexdigest()


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
    def may_create(self) -> bool:
        return self.method == "POST" and not self.read_only


def resolve_base_url(host: str | None, schema: str | None = None, port: int | None = None) -> str:
    """Turn the connection's host (which may carry a scheme and port) into a base URL.

    An empty host means EvoLink's public API. Without a scheme, ``schema`` (``http``/``https``) picks one,
    else https: the key must never travel in clear text by accident.
    """
    host = (host or "").strip()
    if not host:
        return DEFAULT_BASE_URL
    if "://" not in host:
        scheme = schema if schema in ("http", "https") else "https"
        host = f"{scheme}://{host}"
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EvolinkConfigurationError(
            f"EvoLink connection host {host!r} is not an http(s) URL; use e.g. https://api.evolink.ai"
        )
    netloc = parts.netloc
    if port and parts.port is None:
        netloc = f"{netloc}:{port}"
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def _extra_float(extra: Mapping[str, Any], name: str, default: float) -> float:
    value = extra.get(name)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EvolinkConfigurationError(
            f"EvoLink connection extra {name!r} must be a number, got {value!r}"
        ) from None


def _allowed_dirs(value: Any) -> tuple[str, ...]:
    """The ``upload_allowed_dirs`` extra: a list, or one string separated by commas or ``os.pathsep``."""
    import os
    import re

    if value in (None, ""):
        return ()
    if isinstance(value, str):
        items: list[Any] = re.split(f"[,{re.escape(os.pathsep)}]", value)
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise EvolinkConfigurationError(
            f"EvoLink connection extra 'upload_allowed_dirs' must be a list of folders or a comma-separated "
            f"string, got {type(value).__name__}"
        )
    if not all(isinstance(item, str) for item in items):
        raise EvolinkConfigurationError("EvoLink connection extra 'upload_allowed_dirs' must hold strings")
    return tuple(item.strip() for item in items if item.strip())


def settings_from_connection(conn: Connection) -> EvolinkConnectionSettings:
    """Read and check the connection; raises before any HTTP call when the key is missing or malformed."""
    key = (conn.password or "").strip()
    if not key:
        raise EvolinkConfigurationError(
            f"Airflow connection {conn.conn_id!r} has no EvoLink API key: put the key in its password "
            "field (shown as 'API key' in the UI)."
        )
    if not key.isprintable() or any(char.isspace() for char in key):
        # Never echo it: the key is a secret, and the HTTP libraries would put it in their error text.
        raise EvolinkConfigurationError(
            f"The EvoLink API key of Airflow connection {conn.conn_id!r} contains whitespace or control "
            "characters (a line break pasted with it?); the key itself is not shown. Re-enter it."
        )
    extra = conn.extra_dejson or {}
    base_url = resolve_base_url(conn.host, conn.schema, conn.port)
    files_base_url = str(extra.get("files_base_url") or "").rstrip("/")
    if not files_base_url:
        # EvoLink's Files API lives on its own host; a custom host (the simulator, a proxy) serves both.
        files_base_url = DEFAULT_FILES_BASE_URL if base_url == DEFAULT_BASE_URL else base_url
    defaults = RetryPolicy()
    return EvolinkConnectionSettings(
        conn_id=conn.conn_id,
        base_url=base_url,
        files_base_url=files_base_url,
        api_key=_ApiKey(key),
        timeouts=Timeouts(
            connect=_extra_float(extra, "connect_timeout", Timeouts.connect),
            read=_extra_float(extra, "read_timeout", Timeouts.read),
        ),
        retry=RetryPolicy(
            max_attempts=max(1, int(_extra_float(extra, "max_retries", defaults.max_attempts - 1)) + 1),
            backoff_base=_extra_float(extra, "backoff_base", defaults.backoff_base),
            backoff_max=_extra_float(extra, "backoff_max", defaults.backoff_max),
            retry_after_max=_extra_float(extra, "retry_after_max", defaults.retry_after_max),
        ),
        batch_polling=str(extra.get("batch_polling", "")).lower() in ("1", "true", "yes", "on"),
        upload_allowed_dirs=_allowed_dirs(extra.get("upload_allowed_dirs")),
    )


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; ``None`` when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def new_idempotency_key() -> str:
    """A random key for callers that did not derive one (still makes the hook's own retries safe)."""
    return f"evl-{uuid.uuid4().hex}"


def parse_response(
    request: _Request, status_code: int, headers: Mapping[str, str], content: bytes
) -> dict[str, Any]:
    """Decode a JSON answer or raise the typed error its status and body describe."""
    request_id = headers.get("x-request-id") or headers.get("request-id")
    if status_code >= 400:
        try:
            body = loads_strict(content)
        except ValueError:
            body = None
        code, message, body_request_id = error_fields(body)
        if body is None:
            message = content[:200].decode("utf-8", "replace").strip()
        raise error_for_status(
            status_code,
            message or f"HTTP {status_code}",
            code=code,
            request_id=body_request_id or request_id,
            retry_after=parse_retry_after(headers.get("retry-after")),
            method=request.method,
            path=request.path,
            connection=request.connection,
        )
    try:
        decoded = loads_strict(content)
    except ValueError as exc:
        reason = str(exc) if "JSON" in str(exc) else "not JSON"
        raise EvolinkBadAnswerError(
            f"{request.connection}: {request.method} {request.path} answered HTTP {status_code} with a body "
            f"that is {reason} ({len(content)} bytes)" + (f", request_id={request_id}" if request_id else "")
        ) from None
    if not isinstance(decoded, dict):
        raise EvolinkBadAnswerError(
            f"{request.connection}: {request.method} {request.path} answered a JSON "
            f"{type(decoded).__name__}, not an object"
        )
    _raise_if_refused(request, decoded, request_id)
    if headers.get("idempotency-replayed", "").lower() == "true":
        log.info("EvoLink replayed the original task for this Idempotency-Key (no new task was created).")
    return decoded


def error_fields(body: Any) -> tuple[str | None, str, str | None]:
    """``(code, message, request_id)`` of every error body shape EvoLink's clients have seen.

    * ``{"error": {"code", "message", "type", "param"?, "request_id"?}}`` (the usual one; ``code`` is an
      integer on ``GET /v1/credits``);
    * OAuth-shaped 401s: ``{"error": "invalid_token", "error_description": "..."}``;
    * envelopes ``{"success": false, "code", "msg"}`` (Files API) or ``{"code", "message"}``;
    * the request id inside ``error``, at the top level, or (read by the caller) in a header.
    """
    if not isinstance(body, dict):
        return None, "", None
    error = body.get("error")
    if isinstance(error, dict):
        code, message, request_id = error.get("code"), error.get("message"), error.get("request_id")
    elif isinstance(error, str):
        code, message, request_id = error, body.get("error_description"), None
    else:
        code, message, request_id = body.get("code"), body.get("msg") or body.get("message"), None
    request_id = request_id or body.get("request_id")
    return (
        str(code) if code not in (None, "") and not isinstance(code, bool) else None,
        str(message or ""),
        str(request_id) if request_id else None,
    )


def _raise_if_refused(request: _Request, answer: dict[str, Any], request_id: str | None) -> None:
    """An HTTP 200 saying ``"success": false`` (credits, Files API) is a refusal, not an answer."""
    if answer.get("success") is not False:
        return
    code, message, body_request_id = error_fields(answer)
    raise EvolinkRefusedError(
        message or "success: false",
        status_code=200,
        code=code,
        request_id=body_request_id or request_id,
        method=request.method,
        path=request.path,
        connection=request.connection,
    )


def should_retry(request: _Request, error: EvolinkError) -> bool:
    """The retry rule of the module docstring, in one place for both clients."""
    if not error.retryable or not error.retry_now:
        return False
    if not request.may_create:
        return True
    # A POST is only ever repeated with its original Idempotency-Key, which _Request carries.
    return "Idempotency-Key" in request.headers


def _outcome_unknown(error: EvolinkError) -> bool:
    """Whether a failed POST may still have created a task."""
    if isinstance(error, EvolinkTransportError):
        return error.request_sent
    if isinstance(error, EvolinkAPIError) and error.code == PAID_OUTCOME_UNKNOWN:
        return True  # the gateway itself does not know yet whether it billed
    return isinstance(error, EvolinkAPIError) and error.status_code >= 500


def _delay_before_retry(
    request: _Request,
    policy: RetryPolicy,
    attempt: int,
    error: EvolinkError,
    level: int,
    deadline: float | None = None,
) -> float:
    """Seconds to wait before repeating ``request`` after ``error`` on ``attempt``; raises when retrying
    stops, or when the wait would end past ``deadline`` (epoch seconds). Both clients' loops call it, so
    they cannot drift apart."""
    if attempt >= policy.max_attempts or not should_retry(request, error):
        raise _give_up(request, error, attempt) from None
    delay = policy.delay(attempt, getattr(error, "retry_after", None))
    if deadline is not None and time.time() + delay > deadline:
        log.log(level, "%s; no time left to retry", error)
        raise _give_up(request, error, attempt) from None
    log.log(level, "%s; attempt %d of %d in %.1fs", error, attempt + 1, policy.max_attempts, delay)
    return delay


def _give_up(request: _Request, error: EvolinkError, attempts: int) -> EvolinkError:
    """The error to raise once retrying stops."""
    if request.may_create and _outcome_unknown(error):
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


class EvolinkHook(BaseHook):
    """Talks to EvoLink's task gateway with the API key of an Airflow connection.

    :param evolink_conn_id: Airflow connection of type ``evolink``: the password is the API key, the host
        the base URL (empty for ``https://api.evolink.ai``; may carry scheme and port).
    """

    conn_name_attr = "evolink_conn_id"
    default_conn_name = "evolink_default"
    conn_type = "evolink"
    hook_name = "EvoLink"

    def __init__(self, evolink_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.evolink_conn_id = evolink_conn_id
        self._async_settings: EvolinkConnectionSettings | None = None

    def __repr__(self) -> str:
        return f"<EvolinkHook conn_id={self.evolink_conn_id!r}>"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form for Airflow 3.0 and 3.1 (3.2+ read it from the provider info instead)."""
        return hook_field_behaviour(cls.conn_type)

    # -- connection -------------------------------------------------------------------------------

    @cached_property
    def settings(self) -> EvolinkConnectionSettings:
        """The connection, read once per hook (sync lookup: never call this on an event loop)."""
        conn = self.get_connection(self.evolink_conn_id)
        settings = settings_from_connection(conn)
        if _needs_masking(settings.api_key, conn.password):
            from airflow.sdk.log import mask_secret

            mask_secret(settings.api_key.reveal())
        return settings

    async def aget_settings(self) -> EvolinkConnectionSettings:
        """The connection read without blocking the event loop (``aget_connection``), cached."""
        if self._async_settings is None:
            conn = await self.aget_connection(self.evolink_conn_id)
            settings = settings_from_connection(conn)
            if _needs_masking(settings.api_key, conn.password):
                from evolink_provider.compat import amask_secret

                await amask_secret(settings.api_key.reveal())
            self._async_settings = settings
        return self._async_settings

    def _build_request(
        self,
        settings: EvolinkConnectionSettings,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        idempotency_key: str | None = None,
        base_url: str | None = None,
        read_only: bool = False,
    ) -> _Request:
        headers = {
            "Authorization": f"Bearer {settings.api_key.reveal()}",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        if json_body is not None:
            headers["Content-Type"] = "application/json"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        base = base_url or settings.base_url
        connection = f"EvoLink connection {settings.conn_id!r} ({base})"
        return _Request(method, f"{base}{path}", path, headers, json_body, read_only, connection)

    # -- sync client ------------------------------------------------------------------------------

    @cached_property
    def session(self) -> requests.Session:
        """One ``requests.Session`` per hook, so calls reuse keep-alive connections."""
        import requests

        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session

    def _send_once(self, request: _Request, timeouts: Timeouts) -> dict[str, Any]:
        import requests

        try:
            response = self.session.request(
                request.method,
                request.url,
                headers=request.headers,
                json=request.json_body,
                timeout=(timeouts.connect, timeouts.read),
                allow_redirects=False,
                stream=True,
            )
            content = _read_capped(request, response)
        except (requests.ConnectTimeout, requests.exceptions.SSLError) as exc:
            raise _transport_error(request, exc, request_sent=False) from None
        except requests.ConnectionError as exc:
            raise _transport_error(request, exc, request_sent=not _refused(exc)) from None
        except requests.RequestException as exc:  # read timeouts, chunked-encoding errors, ...
            raise _transport_error(request, exc, request_sent=True) from None
        return parse_response(request, response.status_code, response.headers, content)

    def _send(
        self,
        request: _Request,
        settings: EvolinkConnectionSettings,
        accept: Callable[[dict[str, Any]], T],
        deadline: float | None = None,
    ) -> T:
        """Send with retries; ``accept`` checks the answer inside the loop, so a malformed answer is
        retried like a garbled one."""
        for attempt in range(1, settings.retry.max_attempts + 1):
            try:
                return accept(self._send_once(request, settings.timeouts))
            except EvolinkError as error:
                delay = _delay_before_retry(
                    request, settings.retry, attempt, error, logging.WARNING, deadline
                )
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def create_video_task(
        self, payload: dict[str, Any], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a generation (``POST /v1/videos/generations``) and return the created task object.

        :param payload: the JSON body, ``model`` included (see :mod:`evolink_provider.models`).
        :param idempotency_key: 16-96 characters of ``[A-Za-z0-9._-]``; derive it from the work so that a
            repeat replays the original task. A random one is used when omitted.
        """
        settings = self.settings
        request = self._build_request(
            settings,
            "POST",
            CREATE_VIDEO_PATH,
            json_body=payload,
            idempotency_key=idempotency_key or new_idempotency_key(),
        )
        return self._send(request, settings, checked_task)

    def get_task(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """Read a task (``GET /v1/tasks/{task_id}``); the answer must be that task, well formed.

        :param deadline: epoch seconds; retries that would sleep past it give up with the last error.
        """
        settings = self.settings
        request = self._build_request(settings, "GET", _task_path(task_id))
        return self._send(request, settings, partial(checked_task, expected_id=task_id), deadline)

    def get_credits(self) -> dict[str, Any]:
        """Read the account's credits (``GET /v1/credits``; free)."""
        settings = self.settings
        return self._send(self._build_request(settings, "GET", CREDITS_PATH), settings, _as_is)

    def get_files_quota(self) -> dict[str, Any]:
        """The Files API quota (``GET /api/v1/files/quota``): ``user_group``, ``used_files``,
        ``max_files``, ``remain_files``, ``is_custom``, ``quota_reason``."""
        settings = self.settings
        request = self._build_request(settings, "GET", FILES_QUOTA_PATH, base_url=settings.files_base_url)
        data = self._send(request, settings, _as_is).get("data")
        if not isinstance(data, dict):
            raise EvolinkTransportError(
                f"{request.connection}: GET {FILES_QUOTA_PATH} answered without a data object",
                request_sent=True,
            )
        return data

    def upload_file(self, stream: BinaryIO, filename: str, content_type: str) -> dict[str, Any]:
        """Upload a file through EvoLink's Files API; returns its ``data`` (``file_url`` expires in 72 h).

        Uploads are not idempotent and are free, so only failures that cannot have stored the file
        (connection refused, 429, 503) are retried.
        """
        settings = self.settings
        request = self._build_request(settings, "POST", FILES_UPLOAD_PATH, base_url=settings.files_base_url)
        policy = settings.retry
        for attempt in range(1, policy.max_attempts + 1):
            stream.seek(0)
            try:
                answer = self._send_multipart(request, settings.timeouts, stream, filename, content_type)
                break
            except EvolinkError as error:
                safe = (isinstance(error, EvolinkTransportError) and not error.request_sent) or (
                    isinstance(error, EvolinkAPIError) and error.status_code in (429, 503)
                )
                if attempt == policy.max_attempts or not safe:
                    raise
                time.sleep(policy.delay(attempt, getattr(error, "retry_after", None)))
        data = answer.get("data")
        if not answer.get("success", True) or not isinstance(data, dict) or not data.get("file_url"):
            raise EvolinkTransportError(
                f"EvoLink Files API did not return a file_url for {filename!r}: {answer.get('msg')!r}",
                request_sent=True,
            )
        return data

    def _send_multipart(
        self, request: _Request, timeouts: Timeouts, stream: BinaryIO, filename: str, content_type: str
    ) -> dict[str, Any]:
        import requests

        body = _MultipartBody(stream, filename, content_type)
        try:
            response = self.session.post(
                request.url,
                headers={**request.headers, "Content-Type": body.content_type},
                data=body,
                timeout=(timeouts.connect, timeouts.read),
                allow_redirects=False,
                stream=True,
            )
            content = _read_capped(request, response)
        except requests.ConnectionError as exc:
            raise _transport_error(request, exc, request_sent=not _refused(exc)) from None
        except requests.RequestException as exc:
            raise _transport_error(request, exc, request_sent=True) from None
        return parse_response(request, response.status_code, response.headers, content)

    def test_connection(self) -> tuple[bool, str]:
        """Check the key with the free ``GET /v1/credits`` and report the remaining credits."""
        try:
            answer = self.get_credits()
        except EvolinkAuthenticationError as error:
            return False, f"EvoLink rejected the API key (HTTP 401: {error.api_message})."
        except EvolinkError as error:
            return False, str(error)
        user = (answer.get("data") or {}).get("user") or {}
        remaining = "unlimited" if user.get("unlimited_credits") is True else user.get("remaining_credits")
        return True, f"Connected to EvoLink at {self.settings.base_url}; remaining credits: {remaining}"

    def close(self) -> None:
        """Release the sync session's connections."""
        if "session" in self.__dict__:
            self.session.close()
            del self.__dict__["session"]

    # -- results (downloads) ----------------------------------------------------------------------

    @cached_property
    def _download_session(self) -> tuple[requests.Session, dict[tuple[str, int], str]]:
        """A session for result downloads whose connections go only to addresses that were checked,
        and the ``(host, port) -> address`` pins it connects by."""
        pins: dict[tuple[str, int], str] = {}
        return _pinned_session(pins), pins

    @contextmanager
    def open_result(self, url: str, deadline: float | None = None) -> Iterator[ResultStream]:
        """Open a result URL for streaming, following at most 5 redirects by hand.

        Result links are public signed URLs, so no ``Authorization`` header is sent (the key must not
        reach a third-party host). Every hop must be http(s), carry no credentials, and resolve to a
        public address, unless it is the connection's own host (the simulator on loopback); the connection
        is then made to the very address that was checked (no second DNS lookup to rebind). Transient
        failures of the first request are retried with the connection's policy. With a ``deadline``
        (epoch seconds) no retry sleeps past it and the body stops with an error once it has passed.
        """
        import requests

        settings = self.settings
        session, pins = self._download_session
        # Compressed bodies are refused (see ResultStream): ask for none, so the byte cap counts file bytes.
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        policy = settings.retry
        current = url
        for _hop in range(6):
            parts = urlsplit(current)
            pins[((parts.hostname or "").rstrip("."), _port(parts))] = check_download_url(
                current, own_base_url=settings.base_url
            )
            response = None
            for attempt in range(1, policy.max_attempts + 1):
                try:
                    response = session.get(
                        current,
                        headers=headers,
                        stream=True,
                        timeout=(settings.timeouts.connect, _time_left(settings.timeouts.read, deadline)),
                        allow_redirects=False,
                    )
                except requests.RequestException as exc:
                    error: EvolinkError = EvolinkTransportError(
                        f"downloading {_redact_query(current)}: {type(exc).__name__}", request_sent=True
                    )
                    if attempt == policy.max_attempts:
                        raise error from None
                    _sleep_before(deadline, policy.delay(attempt), error)
                    continue
                if response.status_code in (429, 500, 502, 503, 504) and attempt < policy.max_attempts:
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
                    response.close()
                    error = error_for_status(
                        response.status_code,
                        "downloading a result failed",
                        method="GET",
                        path=_redact_query(current),
                    )
                    _sleep_before(deadline, policy.delay(attempt, retry_after), error)
                    continue
                break
            assert response is not None
            if response.is_redirect:
                location = response.headers.get("Location", "")
                response.close()
                current = urljoin(current, location)
                continue
            try:
                if response.status_code in (403, 404, 410):
                    raise EvolinkNotFoundError(
                        "the result link is gone or expired (EvoLink keeps results for 24 h)",
                        status_code=response.status_code,
                        method="GET",
                        path=_redact_query(current),
                    )
                if response.status_code != 200:
                    raise error_for_status(
                        response.status_code,
                        "downloading a result failed",
                        method="GET",
                        path=_redact_query(current),
                    )
                encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise EvolinkTransportError(
                        f"the result {_redact_query(current)} came {encoding}-encoded although none was "
                        "asked for; refusing it (its size could not be bounded before decoding)",
                        request_sent=True,
                    )
                length = response.headers.get("Content-Length")
                yield ResultStream(
                    url=current,
                    content_type=response.headers.get("Content-Type", "").split(";")[0].strip().lower(),
                    content_length=int(length) if length and length.isdigit() else None,
                    chunks=_chunks(response, deadline),
                )
            finally:
                response.close()
            return
        raise EvolinkTransportError(f"too many redirects for {_redact_query(url)}", request_sent=True)

    # -- async client -----------------------------------------------------------------------------

    async def _asend_once(self, request: _Request, timeouts: Timeouts) -> dict[str, Any]:
        import httpx

        try:
            async with (
                (await _shared_pool(timeouts)).client() as client,
                client.stream(
                    request.method, request.url, headers=request.headers, json=request.json_body
                ) as response,
            ):
                content = await _aread_capped(request, response)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _transport_error(request, exc, request_sent=False) from None
        except httpx.HTTPError as exc:  # read timeouts, resets mid-answer, protocol errors
            raise _transport_error(request, exc, request_sent=True) from None
        return parse_response(request, response.status_code, response.headers, content)

    async def _asend(
        self,
        request: _Request,
        settings: EvolinkConnectionSettings,
        accept: Callable[[dict[str, Any]], T],
        deadline: float | None = None,
    ) -> T:
        for attempt in range(1, settings.retry.max_attempts + 1):
            try:
                return accept(await self._asend_once(request, settings.timeouts))
            except EvolinkError as error:
                # INFO, not WARNING: a trigger's poll failures are counted and reported by the trigger.
                delay = _delay_before_retry(request, settings.retry, attempt, error, logging.INFO, deadline)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    async def aget_task(self, task_id: str, deadline: float | None = None) -> dict[str, Any]:
        """Read a task without blocking the event loop (for triggers); the answer must be that task.

        With the connection's ``batch_polling`` on, the reads of all triggers on this event loop that use
        the same key are coalesced into batch calls (see :mod:`evolink_provider.hooks.task_batcher`).

        :param deadline: epoch seconds; the read gives up with its last error rather than wait past it.
        """
        settings = await self.aget_settings()
        if not settings.batch_polling:
            return await self._aread_task(settings, task_id, deadline)
        _task_path(task_id)  # refuse a malformed id before it joins a batch
        read = self._task_batcher(settings).read(task_id)
        if deadline is None:
            return await read
        try:
            return await asyncio.wait_for(read, timeout=max(0.0, deadline - time.time()))
        except asyncio.TimeoutError:
            raise EvolinkWaitTimeoutError(
                f"reading EvoLink task {task_id} in a batch did not finish before the wait's deadline"
            ) from None

    async def _aread_task(
        self, settings: EvolinkConnectionSettings, task_id: str, deadline: float | None = None
    ) -> dict[str, Any]:
        request = self._build_request(settings, "GET", _task_path(task_id))
        return await self._asend(request, settings, partial(checked_task, expected_id=task_id), deadline)

    def _task_batcher(self, settings: EvolinkConnectionSettings) -> TaskBatcher:
        batchers = _TASK_BATCHERS.setdefault(asyncio.get_running_loop(), {})
        batcher = batchers.get(settings.batch_owner)
        if batcher is None:

            async def read_batch(task_ids: list[str]) -> list[dict[str, Any]]:
                request = self._build_request(
                    settings, "POST", TASK_BATCH_PATH, json_body={"task_ids": task_ids}, read_only=True
                )
                return await self._asend(request, settings, _checked_batch)

            batcher = TaskBatcher(read_batch, partial(self._aread_task, settings))
            batchers[settings.batch_owner] = batcher
        return batcher


#: One batcher per event loop and (base URL, API key digest): a batch holds only tasks one key can see.
_TASK_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], TaskBatcher]] = (
    weakref.WeakKeyDictionary()
)


def _task_path(task_id: str) -> str:
    return f"/v1/tasks/{task_id_to_send(task_id)}"


def _as_is(answer: dict[str, Any]) -> dict[str, Any]:
    return answer


def _checked_batch(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Every task of a batch answer checked; one malformed task makes the whole answer untrusted."""
    return [checked_task(task) for task in tasks_in_batch_answer(answer)]


def _read_capped(request: _Request, response: requests.Response) -> bytes:
    """The body of a streamed ``requests`` answer, refused past :data:`MAX_ANSWER_BYTES`."""
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            response.close()  # the rest is never read: drop the connection
            raise _too_large(request)
    return bytes(body)


async def _aread_capped(request: _Request, response: httpx.Response) -> bytes:
    """The body of a streamed ``httpx`` answer, refused past :data:`MAX_ANSWER_BYTES`."""
    body = bytearray()
    async for chunk in response.aiter_bytes(64 * 1024):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise _too_large(request)
    return bytes(body)


def _too_large(request: _Request) -> EvolinkBadAnswerError:
    return EvolinkBadAnswerError(
        f"EvoLink {request.method} {request.path} answered more than {MAX_ANSWER_BYTES} bytes; "
        "a task answer is about a kilobyte, so it was not read further"
    )


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


def _time_left(read_timeout: float, deadline: float | None) -> float:
    """The read timeout of a request, shortened so that it cannot outlast ``deadline``."""
    if deadline is None:
        return read_timeout
    return max(0.1, min(read_timeout, deadline - time.time()))


def _sleep_before(deadline: float | None, delay: float, error: EvolinkError) -> None:
    """Sleep before a retry, or raise ``error`` when the sleep would end past ``deadline``."""
    if deadline is not None and time.time() + delay > deadline:
        raise error
    time.sleep(delay)


def _refused(exc: BaseException) -> bool:
    """Whether a ``requests`` connection error happened before the request could be sent."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    return any(isinstance(item, (NewConnectionError, ConnectTimeoutError)) for item in _exception_chain(exc))


def _transport_error(request: _Request, exc: BaseException, *, request_sent: bool) -> EvolinkTransportError:
    detail = transport_failure(exc)
    return EvolinkTransportError(
        f"{request.connection}: {request.method} {request.path}: {detail}",
        request_sent=request_sent,
        detail=detail,
    )


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (causes, contexts, urllib3 reasons, wrapped first args)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        reason = getattr(current, "reason", None)
        wrapped = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = (
            (reason if isinstance(reason, BaseException) else None)
            or current.__cause__
            or current.__context__
            or wrapped
        )


def transport_failure(exc: BaseException) -> str:
    """What a ``requests``/``httpx`` failure means, in a few words (their own texts repeat the URL and
    nest three exceptions deep)."""
    import socket
    import ssl

    chain = list(_exception_chain(exc))
    texts = " ".join(str(item) for item in chain).lower()
    names = " ".join(type(item).__name__.lower() for item in chain)
    if any(isinstance(item, ssl.SSLCertVerificationError) for item in chain) or "certificate_verify" in texts:
        return "TLS certificate verification failed (CERTIFICATE_VERIFY_FAILED)"
    if any(isinstance(item, ConnectionRefusedError) for item in chain) or "refused" in texts:
        return "connection refused"
    if any(isinstance(item, socket.gaierror) for item in chain) or "resolution" in names:
        return "host name not found"
    if "connecttimeout" in names or "connect timeout" in texts:
        return "connection timed out"
    if "timeout" in names or "timed out" in texts:
        return "no answer in time (read timeout)"
    if "ssl" in names:
        return "TLS handshake failed"
    if "reset" in texts or "aborted" in texts or "remotedisconnected" in names or "disconnected" in texts:
        return "the connection was closed before a complete answer"
    if "incomplete" in names or "chunked" in names or "incomplete" in texts:
        return "the answer was cut short"
    return type(exc).__name__


#: Digests of keys this process has registered with the secrets masker itself.
_MASKED_KEY_DIGESTS: set[str] = set()


def _needs_masking(api_key: _ApiKey, password: str | None) -> bool:
    """Whether the hook must register the key with Airflow's secrets masker.

    Airflow masks a connection's password every time it hands the connection out, so a key that *is* the
    password is masked already. Masking it again is not free: inside a task, every ``mask_secret`` call
    sends the secret to the supervisor, and at DEBUG level ``dag.test()`` logs that message, key and all.
    Only a key that differs from the password (surrounding whitespace stripped) is masked here, once per
    process.
    """
    value = api_key.reveal()
    if value == password:
        return False
    digest = hashlib.sha256(value.encode()).hexdigest()
    if digest in _MASKED_KEY_DIGESTS:
        return False
    _MASKED_KEY_DIGESTS.add(digest)
    return True


@dataclass(frozen=True)
class ResultStream:
    """An open result download: what the server says it is, and its body in chunks."""

    url: str
    content_type: str
    content_length: int | None
    chunks: Iterator[bytes]


DOWNLOAD_CHUNK = 1 << 20


def _chunks(response: requests.Response, deadline: float | None = None) -> Iterator[bytes]:
    """The body as it arrives, cut off once ``deadline`` (epoch seconds) has passed.

    ``read1`` returns what has arrived instead of waiting for a full chunk, so a server that trickles a
    few bytes at a time is noticed at the deadline (at worst one read timeout later), not after 1 MiB.
    """
    import requests
    import urllib3

    # Straight from urllib3 (iter_content adds a generator layer per chunk and costs ~30 % throughput).
    try:
        while chunk := response.raw.read1(DOWNLOAD_CHUNK, decode_content=False):
            yield chunk
            if deadline is not None and time.time() > deadline:
                raise EvolinkWaitTimeoutError(
                    f"downloading {_redact_query(response.url)} ran past the operator's timeout; "
                    "a retry of the Airflow task reattaches to the completed task and downloads again"
                )
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise EvolinkTransportError(
            f"the result download broke off: {type(exc).__name__}", request_sent=True
        ) from None


def _pinned_session(pins: dict[tuple[str, int], str]) -> requests.Session:
    """A ``requests`` session whose direct connections go to ``pins[(host, port)]``, the address that
    passed :func:`check_download_url`, and nowhere else; TLS still verifies (and SNI still names) the
    host. Without the pin a second DNS lookup at connect time could answer a private address (DNS
    rebinding). Connections through a proxy are the proxy's business and are not pinned."""
    import socket

    import requests
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import create_connection

    def new_pinned_conn(connection: HTTPConnection) -> socket.socket:
        address = pins.get((connection.host, connection.port or 80))
        if address is None:
            raise NewConnectionError(connection, f"{connection.host} was not checked before connecting")
        try:
            return create_connection(
                (address, connection.port),
                connection.timeout,
                source_address=connection.source_address,
                socket_options=connection.socket_options,
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(connection, f"connection to {connection.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(connection, f"failed to connect to {connection.host}: {exc}") from exc

    class PinnedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return new_pinned_conn(self)

    class PinnedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return new_pinned_conn(self)

    class PinnedHTTPPool(HTTPConnectionPool):
        ConnectionCls = PinnedHTTPConnection

    class PinnedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = PinnedHTTPSConnection

    class PinnedAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": PinnedHTTPPool, "https": PinnedHTTPSPool}

    session = requests.Session()
    adapter = PinnedAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _redact_query(url: str) -> str:
    """Signed URLs carry their signature in the query: keep it out of logs and errors."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


def check_download_url(url: str, *, own_base_url: str) -> str:
    """Refuse what a result URL must never be: another scheme, credentials, or a private address; return
    the checked address to connect to (connecting by name would resolve it again).

    The connection's own host is allowed even when private, so the bundled simulator works.
    """
    import ipaddress
    import socket

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EvolinkConfigurationError(
            f"refusing to download {parts.scheme or 'a'}: URL {_redact_query(url)}"
        )
    if parts.username or parts.password:
        raise EvolinkConfigurationError("refusing to download a result URL that carries credentials")
    own = urlsplit(own_base_url)
    port = _port(parts)
    try:
        addresses = [
            str(info[4][0]) for info in socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
        ]
    except OSError as exc:
        raise EvolinkTransportError(f"cannot resolve {parts.hostname}: {exc}", request_sent=False) from None
    if not addresses:
        raise EvolinkTransportError(f"cannot resolve {parts.hostname}", request_sent=False)
    if (parts.hostname, port) == (own.hostname, _port(own)):
        return addresses[0]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if not ip.is_global:
            raise EvolinkConfigurationError(
                f"refusing to download from {parts.hostname} ({ip}): a private address that is not the "
                "connection's own host"
            )
    return addresses[0]
