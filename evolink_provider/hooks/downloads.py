"""Result downloads: result links streamed to storage, and the checks on every address they lead to.

Result links are public signed URLs on third-party hosts, so no ``Authorization`` header is sent (the key
must not reach them). Every hop must be http(s), carry no credentials, and resolve to a public address,
unless it is the connection's own host (the simulator on loopback); the request is then sent to the very
address that was checked (no second DNS lookup to rebind; see :class:`ResultDownloads`). Transient failures
are repeated as the retry policy's *download* row says; a link that answers 403, 404 or 410 (or a
signature refused with 400 or 401: :data:`LINK_REFUSED`) has expired or was refused, and is left to the
caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

from evolink_provider.exceptions import (
    EvolinkAPIError,
    EvolinkConfigurationError,
    EvolinkNotFoundError,
    EvolinkTransportError,
    EvolinkWaitTimeoutError,
    error_for_status,
)
from evolink_provider.hooks.connection import USER_AGENT, EvolinkConnectionSettings
from evolink_provider.hooks.responses import without_key
from evolink_provider.hooks.retry import Kind, parse_retry_after

if TYPE_CHECKING:
    import requests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultStream:
    """An open result download: what the server says it is, and its body in chunks."""

    url: str
    content_type: str
    content_length: int | None
    chunks: Iterator[bytes]


DOWNLOAD_CHUNK = 1 << 20
#: Statuses of a refused result link: 403, 404, 410, and a signature refused as 400 (Google Cloud Storage's
#: expired or not-yet-valid signed URL) or 401 (a CDN's check). No key is sent to result hosts, so none of
#: them is about the account; the ledger decides between "refused" and "expired" (rows R25-R28).
LINK_REFUSED = (400, 401, 403, 404, 410)


def _chunks(url: str, response: requests.Response, deadline: float | None = None) -> Iterator[bytes]:
    """The body as it arrives, cut off once ``deadline`` (epoch seconds) has passed.

    ``read1`` returns what has arrived instead of waiting for a full chunk, so a server that trickles a
    few bytes at a time is noticed at the deadline (at worst one read timeout later), not after 1 MiB.
    """
    import requests
    import urllib3

    # Straight from urllib3: iter_content adds a generator layer per chunk (docs/benchmarks.md, download).
    try:
        while chunk := response.raw.read1(DOWNLOAD_CHUNK, decode_content=False):
            yield chunk
            if deadline is not None and time.time() > deadline:
                raise EvolinkWaitTimeoutError(
                    f"downloading {_redact_query(url)} ran past the operator's timeout; "
                    "a retry of the Airflow task reattaches to the completed task and downloads again"
                )
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise EvolinkTransportError(
            f"the result download broke off: {type(exc).__name__}", request_sent=True
        ) from None


def _hostname_adapter(hostname: str) -> requests.adapters.HTTPAdapter:
    """An adapter for connections made to an address: TLS names (SNI) and verifies ``hostname``."""
    import requests

    class HostnameAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args: Any, **pool_kwargs: Any) -> None:
            super().init_poolmanager(*args, server_hostname=hostname, assert_hostname=hostname, **pool_kwargs)

    return HostnameAdapter(pool_connections=1, pool_maxsize=4, max_retries=0)


#: Requests sent to a checked address never go through a proxy (the environment's would apply by address).
_NO_PROXIES = {"http": None, "https": None, "all": None}


class ResultDownloads:
    """The result downloads of one hook. Each hop is sent to the address :func:`check_download_url`
    returned: the URL names the address, the ``Host`` header and TLS (SNI and certificate check) the host,
    so no second DNS lookup can answer another address (DNS rebinding). A hop the environment sends
    through a proxy (``HTTPS_PROXY``, ``NO_PROXY``) is the proxy's to connect, by name."""

    def __init__(self) -> None:
        import requests

        self.session = requests.Session()

    @contextmanager
    def open(
        self, url: str, settings: EvolinkConnectionSettings, deadline: float | None = None
    ) -> Iterator[ResultStream]:
        """Open a result URL for streaming, following at most 5 redirects by hand, each hop checked
        (``deadline``: see ``EvolinkHook.open_result``)."""
        # A result host's headers are server text like an API answer's: the key, if echoed, is not kept.
        key = settings.api_key.reveal()
        current = url
        for _hop in range(6):
            address = check_download_url(current, own_base_url=settings.base_url)
            response = self._get(current, address, settings, deadline)
            if response.is_redirect:
                location = without_key(response.headers.get("Location", ""), key)
                response.close()
                current = urljoin(current, location)
                continue
            try:
                yield _result_stream(current, response, deadline, key)
            finally:
                response.close()
            return
        raise EvolinkTransportError(f"too many redirects for {_redact_query(url)}", request_sent=True)

    def _target(self, url: str, address: str) -> tuple[str, dict[str, str], Any]:
        """Where ``url`` is sent: the URL, the extra headers and the proxies of its request."""
        import requests

        parts = urlsplit(url)
        proxies = requests.utils.get_environ_proxies(url)
        if parts.scheme in proxies or "all" in proxies:
            return url, {}, None
        netloc = f"[{address}]:{_port(parts)}" if ":" in address else f"{address}:{_port(parts)}"
        if parts.scheme == "https":
            prefix = f"https://{netloc}/"
            previous = self.session.adapters.get(prefix)
            if previous is not None:
                previous.close()
            self.session.mount(prefix, _hostname_adapter(parts.hostname or ""))
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        return target, {"Host": parts.netloc.rpartition("@")[2]}, _NO_PROXIES

    def _get(
        self, url: str, address: str, settings: EvolinkConnectionSettings, deadline: float | None
    ) -> requests.Response:
        """One hop's answer (a redirect, or a 2xx to stream), repeated as the policy's download row
        says; raises the error it ends with."""
        import requests

        # Compressed bodies are refused (see _result_stream): ask for none, so the byte cap counts file bytes.
        target, host, proxies = self._target(url, address)
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **host}

        def attempt() -> requests.Response:
            try:
                response = self.session.get(
                    target,
                    headers=headers,
                    proxies=proxies,
                    stream=True,
                    timeout=(settings.timeouts.connect, _time_left(settings.timeouts.read, deadline)),
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                raise EvolinkTransportError(
                    f"downloading {_redact_query(url)}: {type(exc).__name__}", request_sent=True
                ) from None
            if response.status_code < 400:
                return response
            response.close()
            if response.status_code in LINK_REFUSED:
                raise EvolinkNotFoundError(
                    "the result link is gone or expired (EvoLink keeps results for 24 h)",
                    status_code=response.status_code,
                    method="GET",
                    path=_redact_query(url),
                )
            raise _odd_answer(
                response.status_code, url, parse_retry_after(response.headers.get("Retry-After"))
            )

        return settings.retry.retrying(Kind.DOWNLOAD, deadline, log, logging.WARNING)(attempt)


def _result_stream(url: str, response: requests.Response, deadline: float | None, key: str) -> ResultStream:
    """The stream of a hop that answered; anything but a plain 200 is refused."""
    if response.status_code != 200:
        raise _odd_answer(response.status_code, url)
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise EvolinkTransportError(
            f"the result {_redact_query(url)} came with a Content-Encoding although none was "
            "asked for; refusing it (its size could not be bounded before decoding)",
            request_sent=True,
        )
    length = response.headers.get("Content-Length")
    return ResultStream(
        url=url,
        content_type=without_key(response.headers.get("Content-Type", ""), key).split(";")[0].strip().lower(),
        # isascii: "²".isdigit() is True, int("²") raises.
        content_length=int(length) if length and length.isascii() and length.isdigit() else None,
        chunks=_chunks(url, response, deadline),
    )


def _odd_answer(status: int, url: str, retry_after: float | None = None) -> EvolinkAPIError:
    """A result host's answer that is neither the file nor a refused link (:data:`LINK_REFUSED`): a 408, a
    421 or 451 of a CDN, a 206, a redirect without ``Location``. It says nothing about the paid result, so
    it is retried, and the try ends retryably, never for good."""
    error = error_for_status(
        status, "downloading a result failed", retry_after=retry_after, method="GET", path=_redact_query(url)
    )
    error.retryable = True
    return error


def _time_left(read_timeout: float, deadline: float | None) -> float:
    """The read timeout of a request, shortened so that it cannot outlast ``deadline``."""
    if deadline is None:
        return read_timeout
    return max(0.1, min(read_timeout, deadline - time.time()))


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
