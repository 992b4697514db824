"""The EvoLink connection: what the hook reads from Airflow (base URLs, API key, timeouts, retry settings,
extras), checked once before any HTTP call, whether the key still has to be masked, the requests built
from it (:class:`ApiRequest`: the key only in its headers), and the ``requests`` session that waits for
their answers no longer than the caller's deadline (:func:`sync_session`, for the API and the downloads)."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from evolink_provider import __version__
from evolink_provider.exceptions import EvolinkConfigurationError
from evolink_provider.hooks.retry import Kind, RetryPolicy

if TYPE_CHECKING:
    import requests
    from airflow.sdk import Connection

DEFAULT_BASE_URL = "https://api.evolink.ai"
DEFAULT_FILES_BASE_URL = "https://files-api.evolink.ai"


@dataclass(frozen=True)
class Timeouts:
    """Connect and read timeouts in seconds, one policy for both clients."""

    connect: float = 10.0
    read: float = 60.0


class _ApiKey:
    """Holds the key so that no ``repr``, log line or traceback local can show it."""

    __slots__ = ("_value", "digest")

    def __init__(self, value: str) -> None:
        self._value = value
        #: Names the key where it must not be shown (batches per key, keys already masked).
        self.digest = hashlib.sha256(value.encode()).hexdigest()

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

    @property
    def batch_owner(self) -> tuple[str, str]:
        """Whose tasks a batch may hold: the base URL and a digest of the key (never the key itself)."""
        return self.base_url, self.api_key.digest


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
    """The ``upload_allowed_dirs`` extra: a list, or one string separated by commas (a part that is not a
    storage URI may hold several folders joined by ``os.pathsep``, whose ``:`` would cut a URI apart)."""
    import os

    if value in (None, ""):
        return ()
    if isinstance(value, str):
        items: list[Any] = [
            folder
            for part in value.split(",")
            for folder in ([part] if "://" in part else part.split(os.pathsep))
        ]
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


def settings_from_connection(
    conn: Connection, extra: dict[str, Any] | None = None
) -> EvolinkConnectionSettings:
    """Read and check the connection; raises before any HTTP call when the key is missing or malformed.

    ``extra``: the connection's extra already read (on an event loop it must be read asynchronously, see
    :func:`evolink_provider.compat.get_async_extra_dejson`); else ``conn.extra_dejson``.
    """
    key = (conn.password or "").strip()
    if not key:
        raise EvolinkConfigurationError(
            f"Airflow connection {conn.conn_id!r} has no EvoLink API key: put the key in its password "
            "field (shown as 'API key' in the UI)."
        )
    if not key.isascii() or not key.isprintable() or any(char.isspace() for char in key):
        # Never echo it: the key is a secret, and the HTTP libraries would put it in their error text.
        # Non-ASCII: an HTTP header carries bytes; requests would send it as Latin-1, the triggers' client
        # would fail while encoding it, after the (paid) submission was made by the worker.
        raise EvolinkConfigurationError(
            f"The EvoLink API key of Airflow connection {conn.conn_id!r} contains whitespace, control or "
            "non-ASCII characters (a line break or a typographic dash pasted with it?); the key itself is "
            "not shown. Re-enter it."
        )
    if extra is None:
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


#: Digests of keys this process has registered with the secrets masker itself.
_MASKED_KEY_DIGESTS: set[str] = set()


def needs_masking(api_key: _ApiKey, password: str | None) -> bool:
    """Whether the hook must register the key with Airflow's secrets masker: only once per process, and
    only when it is not the password (surrounding whitespace stripped), which Airflow masks already. Each
    ``mask_secret`` call in a task sends the secret to the supervisor, logged at DEBUG by ``dag.test()``."""
    if api_key.reveal() == password or api_key.digest in _MASKED_KEY_DIGESTS:
        return False
    _MASKED_KEY_DIGESTS.add(api_key.digest)
    return True


USER_AGENT = f"airflow-provider-evolink/{__version__}"


@dataclass(frozen=True)
class ApiRequest:
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
    def where(self) -> str:
        """Who was asked what, for error messages."""
        return f"{self.connection}: {self.method} {self.path}"

    @property
    def kind(self) -> Kind:
        """Its row of the retry table: a POST that creates is a submission when it carries an
        ``Idempotency-Key``, else an upload (only failures that cannot have stored anything repeat)."""
        if self.method != "POST" or self.read_only:
            return Kind.READ
        return Kind.SUBMISSION if "Idempotency-Key" in self.headers else Kind.UPLOAD


def headers_as_given(prepared: Any) -> Any:
    """The ``auth`` of every ``requests`` call: the headers stay as built (the API key, or none for a
    result host). Without one, ``requests`` adds a ``~/.netrc`` entry's Basic credentials for the host,
    which replace the key, or send another tool's secret to a result host."""
    return prepared


#: When the answer to the exchange under way in this thread must have begun (epoch seconds).
_ANSWER_UNTIL: ContextVar[float | None] = ContextVar("evolink_answer_until", default=None)


@contextmanager
def answer_until(until: float) -> Iterator[None]:
    """Exchanges on a :func:`sync_session` in this block get their answer's headers by ``until``."""
    token = _ANSWER_UNTIL.set(until)
    try:
        yield
    finally:
        _ANSWER_UNTIL.reset(token)


def sync_session() -> requests.Session:
    """A ``requests`` session whose TLS handshakes and waits for an answer's headers end at
    :func:`answer_until`'s time. A socket timeout restarts with each byte and ``requests`` has no bound on
    the whole header phase, so a server trickling its headers would hold a call past its deadline: a timer
    shuts the socket down then, and the call fails as a read timeout would."""
    import requests

    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, deadline_adapter()())
    return session


@cache
def deadline_adapter() -> type[requests.adapters.HTTPAdapter]:
    """The ``HTTPAdapter`` of :func:`sync_session` (built on first use: DAG files never import requests)."""
    import ssl

    import requests
    import urllib3
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class DeadlineHTTPConnection(urllib3.connection.HTTPConnection):
        # connect: a proxy's answer to CONNECT is read there, before getresponse. The TCP connect the timer
        # cannot reach (no socket yet): the callers cap the connect timeout, which bounds it, at the time
        # left.
        def connect(self) -> None:
            with _cut_at_answer_until(self):
                super().connect()

        def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
            with _cut_at_answer_until(self):
                return super().getresponse()

    class DeadlineSSLSocket(ssl.SSLSocket):
        """Its handshake ends by :func:`answer_until`'s time: the timer cannot reach it (the plain socket
        is already handed to TLS, the TLS one not yet assigned), but one socket timeout bounds a whole
        handshake (after a late CONNECT answer, the connect timeout of the call's start would not)."""

        def do_handshake(self, block: bool = False) -> None:
            until = _ANSWER_UNTIL.get()
            if until is not None:
                left = max(0.001, until - time.time())
                timeout = self.gettimeout()
                self.settimeout(left if timeout is None else min(timeout, left))
            super().do_handshake(block)

    class DeadlineHTTPSConnection(DeadlineHTTPConnection, urllib3.connection.HTTPSConnection):
        """The same overrides, before HTTPSConnection's in the method order; its TLS context (the one
        urllib3 would build, or the one requests hands in) makes :class:`DeadlineSSLSocket` sockets
        (``SSLContext.sslsocket_class``). requests 2.32.0-2.32.4 hand every connection one shared context
        of theirs: it gets the class too, which acts only inside this provider's :func:`answer_until`."""

        def __init__(self, *args: Any, ssl_context: ssl.SSLContext | None = None, **kwargs: Any) -> None:
            if ssl_context is None:
                ssl_context = urllib3.util.create_urllib3_context()
            ssl_context.sslsocket_class = DeadlineSSLSocket
            super().__init__(*args, ssl_context=ssl_context, **kwargs)

    class DeadlineHTTPPool(HTTPConnectionPool):
        ConnectionCls = DeadlineHTTPConnection

    class DeadlineHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = DeadlineHTTPSConnection

    pools = {"http": DeadlineHTTPPool, "https": DeadlineHTTPSPool}

    class DeadlineAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> urllib3.ProxyManager:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):  # SOCKS proxies have pools of their own
                manager.pool_classes_by_scheme = pools
            return manager

    return DeadlineAdapter


@contextmanager
def _cut_at_answer_until(connection: Any) -> Iterator[None]:
    """Shut ``connection``'s socket at :func:`answer_until`'s time if this block still runs then (one timer
    thread per exchange: sync calls are few, and each is seconds of network anyway)."""
    until = _ANSWER_UNTIL.get()
    if until is None:
        yield
        return
    cut = threading.Event()

    def shut() -> None:
        cut.set()
        sock = connection.sock  # read now: connect() creates it, a tunnel through a TLS proxy wraps it
        while sock is not None and not isinstance(sock, socket.socket):
            sock = getattr(sock, "socket", None)  # urllib3's SSLTransport (TLS inside a TLS proxy)
        if sock is not None:
            with suppress(OSError):  # closed meanwhile: nothing to end
                # The plain socket's shutdown, also for TLS: the reading thread then sees the connection end.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, until - time.time()), shut)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception:
        if cut.is_set():
            raise TimeoutError("the answer's headers did not arrive in time") from None
        raise
    finally:
        timer.cancel()
    if cut.is_set():  # headers cut short parse as an answer: never hand one on
        raise TimeoutError("the answer's headers did not arrive in time")


def build_request(
    settings: EvolinkConnectionSettings,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    idempotency_key: str | None = None,
    base_url: str | None = None,
    read_only: bool = False,
) -> ApiRequest:
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
    return ApiRequest(method, f"{base}{path}", path, headers, json_body, read_only, connection)
