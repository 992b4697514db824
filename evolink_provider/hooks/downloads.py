"""Result downloads: result links streamed to storage, and the checks on every address they lead to.

Result links are public signed URLs on third-party hosts, so no ``Authorization`` header is sent. Every hop
must be http(s), carry no credentials, and resolve to a public address, unless it is the connection's own
host (the simulator on loopback); it is then sent to the very address that was checked, so no second DNS
lookup can answer another one (rebinding). Failures are repeated as the retry table's *download* row says;
a refused link (:data:`LINK_REFUSED`) is left to the caller.
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
from evolink_provider.hooks.connection import (
    USER_AGENT,
    EvolinkConnectionSettings,
    answer_until,
    deadline_adapter,
    headers_as_given,
    sync_session,
)
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
#: Requests sent to a checked address never go through a proxy (the environment's would apply by address).
_NO_PROXIES = {"http": None, "https": None, "all": None}


class ResultDownloads:
    """The result downloads of one hook, on a session of their own (it mounts an adapter per address). A hop
    the environment sends through a proxy (``HTTPS_PROXY``, ``NO_PROXY``) is the proxy's to connect, by
    name; any other is sent to its checked address, the ``Host`` header and TLS (SNI and the certificate
    check) naming the host."""

    def __init__(self) -> None:
        self.session = sync_session()

    @contextmanager
    def open(
        self, url: str, settings: EvolinkConnectionSettings, deadline: float | None = None
    ) -> Iterator[ResultStream]:
        """Open a result URL for streaming, following at most 5 redirects by hand, each hop checked; with a
        ``deadline`` (epoch seconds) no retry sleeps past it and the body stops once it has passed."""
        # A result host's headers are server text like an API answer's: the key, if echoed, is not kept.
        key = settings.api_key.reveal()
        current = url
        for _hop in range(6):
            address = check_download_url(current, own_base_url=settings.base_url)
            response = self._get(current, address, settings, deadline)
            if not response.is_redirect:
                break
            response.close()
            current = urljoin(current, without_key(response.headers.get("Location", ""), key))
        else:
            raise EvolinkTransportError(f"too many redirects for {_redact_query(url)}", request_sent=True)
        try:
            if response.status_code != 200:
                raise _odd_answer(response.status_code, current)
            if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
                raise EvolinkTransportError(
                    f"the result {_redact_query(current)} came with a Content-Encoding although none was "
                    "asked for; refusing it (its size could not be bounded before decoding)",
                    request_sent=True,
                )
            length = response.headers.get("Content-Length")
            content_type = without_key(response.headers.get("Content-Type", ""), key)
            yield ResultStream(
                url=current,
                content_type=content_type.split(";")[0].strip().lower(),
                # isascii: "²".isdigit() is True, int("²") raises.
                content_length=int(length) if length and length.isascii() and length.isdigit() else None,
                chunks=_chunks(current, response, deadline),
            )
        finally:
            response.close()

    def _get(
        self, url: str, address: str, settings: EvolinkConnectionSettings, deadline: float | None
    ) -> requests.Response:
        """One hop's answer (a redirect, or a 2xx to stream), repeated as the *download* row says."""
        import requests

        target, host, proxies = self._target(url, address)
        # A compressed body is refused (see open): ask for none, so the byte cap counts file bytes.
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **host}

        def attempt() -> requests.Response:
            read_timeout, connect_timeout = settings.timeouts.read, settings.timeouts.connect
            if deadline is not None:  # no socket wait (a connect, a TLS handshake, a read) outlasts it
                left = max(0.1, deadline - time.time())
                read_timeout, connect_timeout = min(read_timeout, left), min(connect_timeout, left)
            try:
                with answer_until(time.time() + read_timeout):  # the header phase too (see sync_session)
                    response = self.session.get(
                        target,
                        headers=headers,
                        proxies=proxies,
                        stream=True,
                        timeout=(connect_timeout, read_timeout),
                        allow_redirects=False,
                        auth=headers_as_given,
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
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise _odd_answer(response.status_code, url, retry_after)

        return settings.retry.retrying(Kind.DOWNLOAD, deadline, log, logging.WARNING)(attempt)

    def _target(self, url: str, address: str) -> tuple[str, dict[str, str], Any]:
        """Where ``url`` is sent: the URL, the extra headers and the proxies of its request."""
        import requests

        parts = urlsplit(url)
        proxies = requests.utils.get_environ_proxies(url)
        if parts.scheme in proxies or "all" in proxies:
            return url, {}, None
        netloc = f"[{address}]:{_port(parts)}" if ":" in address else f"{address}:{_port(parts)}"
        if parts.scheme == "https":
            hostname = parts.hostname or ""

            class HostnameAdapter(deadline_adapter()):  # type: ignore[misc]
                def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
                    super().init_poolmanager(
                        *args, server_hostname=hostname, assert_hostname=hostname, **kwargs
                    )

            prefix = f"https://{netloc}/"
            if prefix in self.session.adapters:
                self.session.adapters[prefix].close()
            self.session.mount(prefix, HostnameAdapter(pool_connections=1, pool_maxsize=4, max_retries=0))
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        return target, {"Host": parts.netloc.rpartition("@")[2]}, _NO_PROXIES


def _chunks(url: str, response: requests.Response, deadline: float | None = None) -> Iterator[bytes]:
    """The body as it arrives, straight from urllib3 (``iter_content`` adds a generator layer per chunk).
    ``read1`` returns what has arrived, so a trickling server is noticed at ``deadline``, not after 1 MiB."""
    import requests
    import urllib3

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


def _odd_answer(status: int, url: str, retry_after: float | None = None) -> EvolinkAPIError:
    """A result host's answer that is neither the file nor a refused link (a 408, a CDN's 421 or 451, a 206,
    a redirect without ``Location``) says nothing about the paid result: retried, and retryable at the end."""
    error = error_for_status(
        status, "downloading a result failed", retry_after=retry_after, method="GET", path=_redact_query(url)
    )
    error.retryable = True
    return error


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _redact_query(url: str) -> str:
    """Signed URLs carry their signature in the query: keep it out of logs and errors."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")


def check_download_url(url: str, *, own_base_url: str) -> str:
    """Refuse what a result URL must never be: another scheme, credentials, or a private address other than
    the connection's own host (the simulator); return the checked address to connect to."""
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
