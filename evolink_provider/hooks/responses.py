"""Reading what EvoLink answered, for both clients of :mod:`evolink_provider.hooks.transport`: the body
bounded, strict JSON, EvoLink's error bodies mapped to :mod:`evolink_provider.exceptions`, and transport
failures said in a few words (the clients' own texts repeat the URL, and aiohttp's reprs carry the key)."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

from evolink_provider.answers import MAX_ANSWER_BYTES, loads_strict
from evolink_provider.exceptions import (
    MAX_SERVER_NAME,
    EvolinkBadAnswerError,
    EvolinkConfigurationError,
    EvolinkRefusedError,
    EvolinkTransportError,
    error_for_status,
    server_text,
)
from evolink_provider.hooks.connection import ApiRequest
from evolink_provider.hooks.retry import parse_retry_after

log = logging.getLogger(__name__)


def parse_response(
    request: ApiRequest, status_code: int, headers: Mapping[str, str], content: bytes
) -> dict[str, Any]:
    """Decode a JSON answer or raise the typed error its status and body describe.

    The connection's own API key is replaced by ``***`` wherever the server put it (a string anywhere in
    the JSON, a body that is not JSON, the request-id header) before anything reads the answer: a server
    that echoes the key into an error body must not put it into an exception, a log or XCom.
    """
    key = _api_key(request)
    raw_id = without_key(headers.get("x-request-id") or headers.get("request-id"), key)
    request_id = server_text(raw_id, MAX_SERVER_NAME) if raw_id else None
    if status_code >= 400:
        try:
            body = without_key(loads_strict(content), key, content)
        except ValueError:
            body = None
        code, message, body_request_id = error_fields(body)
        if body is None:
            message = without_key(content.decode("utf-8", "replace"), key)[:200].strip()
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
    if not 200 <= status_code < 300:
        # A redirect (or an interim answer) on the API is not an answer, and is never followed: the request
        # carries the key. Not retried, a base URL that redirects (http to https, a moved host) must be fixed.
        location = without_key(headers.get("location"), key)
        raise EvolinkConfigurationError(
            f"{request.where} answered HTTP {status_code}, not an answer of the API (redirects are not "
            "followed; check the connection's base URL)"
            + (f", Location: {server_text(str(location))}" if location else "")
        )
    try:
        decoded = without_key(loads_strict(content), key, content)
    except ValueError as exc:
        reason = str(exc) if "JSON" in str(exc) else "not JSON"
        raise bad_answer(
            request,
            f"HTTP {status_code} with a body that is {reason} ({len(content)} bytes)"
            + (f", request_id={request_id}" if request_id else ""),
        ) from None
    if not isinstance(decoded, dict):
        raise bad_answer(request, f"a JSON {type(decoded).__name__}, not an object")
    _raise_if_refused(request, decoded, request_id)
    if headers.get("idempotency-replayed", "").lower() == "true":
        log.info("EvoLink replayed the original task for this Idempotency-Key (no new task was created).")
    return decoded


def _api_key(request: ApiRequest) -> str:
    """The key ``request`` carries (``Authorization: Bearer <key>``), to be found in what came back."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key if scheme == "Bearer" else ""


def without_key(value: Any, key: str, raw: bytes | None = None) -> Any:
    """``value`` (decoded JSON, or a text) with every occurrence of ``key`` in its strings, dict keys
    included, replaced by ``***``. Given the ``raw`` bytes it was decoded from, the walk is skipped when
    they can hold no copy of the key: neither the key itself nor a JSON escape (``\\u0073k-...``)."""
    if not key or (raw is not None and key.encode() not in raw and b"\\" not in raw):
        return value
    if isinstance(value, str):
        return value.replace(key, "***")
    if isinstance(value, dict):
        return {without_key(name, key): without_key(item, key) for name, item in value.items()}
    if isinstance(value, list):
        return [without_key(item, key) for item in value]
    return value


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


#: Where the Files API's paths start: its ``success: false`` answers carry an HTTP status as their code.
FILES_API_PREFIX = "/api/v1/files/"


def _raise_if_refused(request: ApiRequest, answer: dict[str, Any], request_id: str | None) -> None:
    """An HTTP 200 saying ``"success": false`` (credits, Files API) is a refusal, not an answer.

    The Files API's ``code`` is an HTTP status and is classified as one, as EvoLink's CLI and MCP server
    do: 429 and 5xx are transient (the typed error of that status), anything else is a final
    :class:`EvolinkRefusedError`. A credits refusal stays final: nothing documents its code.
    """
    if answer.get("success") is not False:
        return
    code, message, body_request_id = error_fields(answer)
    status = int(code) if code and code.isascii() and code.isdigit() and len(code) == 3 else None
    if request.path.startswith(FILES_API_PREFIX) and status is not None and (status == 429 or status >= 500):
        raise error_for_status(
            status,
            f"{message or 'success: false'} (HTTP 200 with success: false)",
            code=code,
            request_id=body_request_id or request_id,
            method=request.method,
            path=request.path,
            connection=request.connection,
        )
    raise EvolinkRefusedError(
        message or "success: false",
        status_code=200,
        code=code,
        request_id=body_request_id or request_id,
        method=request.method,
        path=request.path,
        connection=request.connection,
    )


class AnswerBody:
    """One answer's body as it arrives, bounded: at most one ``gzip``/``deflate`` layer is undone, never more
    than :data:`MAX_ANSWER_BYTES` is held (however well the bytes compress), and no chunk is taken after
    ``until`` (epoch seconds), so a server that trickles its answer cannot hold a worker or a trigger. The
    clients hand it raw bytes: what they would unpack at once has no such bound.
    """

    def __init__(self, request: ApiRequest, content_encoding: str | None, until: float) -> None:
        self.request = request
        self.until = until
        encodings = [name.strip().lower() for name in (content_encoding or "").split(",") if name.strip()]
        encodings = [name for name in encodings if name != "identity"]
        if len(encodings) > 1 or (encodings and encodings[0] not in ("gzip", "x-gzip", "deflate")):
            raise bad_answer(  # the header's value is not shown: it is server text
                request,
                "with a Content-Encoding other than one gzip or deflate layer (it was asked for those only)",
            )
        # wbits 47: a gzip or a zlib header, detected (HTTP's "deflate" is zlib-wrapped).
        self._inflate = zlib.decompressobj(wbits=47) if encodings else None
        self._body = bytearray()

    def add(self, raw: bytes) -> None:
        if time.time() > self.until:
            raise answer_out_of_time(self.request)
        if self._inflate is None:
            self._body += raw
        else:
            try:
                self._body += self._inflate.decompress(raw, MAX_ANSWER_BYTES + 1 - len(self._body))
            except zlib.error:
                raise bad_answer(self.request, "a compressed body that does not decompress") from None
        if len(self._body) > MAX_ANSWER_BYTES or (self._inflate and self._inflate.unconsumed_tail):
            raise bad_answer(
                self.request,
                f"more than {MAX_ANSWER_BYTES} bytes; a task answer is about a kilobyte, so it was not "
                "read further",
            )

    def content(self) -> bytes:
        if self._inflate is not None and not self._inflate.eof and self._body:
            raise bad_answer(self.request, "a compressed body cut short")
        return bytes(self._body)


def bad_answer(request: ApiRequest, what: str) -> EvolinkBadAnswerError:
    return EvolinkBadAnswerError(f"{request.where} answered {what}")


def answer_out_of_time(request: ApiRequest) -> EvolinkTransportError:
    return EvolinkTransportError(
        f"{request.where}: no complete answer when its time ran out (a slow or trickling server, or the "
        "wait's deadline)",
        request_sent=True,
    )


def refused(exc: BaseException) -> bool:
    """Whether a ``requests`` connection error happened before the request could be sent: no connection,
    or a server certificate refused (only a handshake checks one). Any other TLS error may come after the
    request was sent (a bad record, an alert from a proxy), so its outcome is unknown."""
    import ssl

    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    before_sending = (NewConnectionError, ConnectTimeoutError, ssl.SSLCertVerificationError)
    return any(isinstance(item, before_sending) for item in _exception_chain(exc))


def transport_error(request: ApiRequest, exc: BaseException, *, request_sent: bool) -> EvolinkTransportError:
    detail = transport_failure(exc)
    return EvolinkTransportError(
        f"{request.where}: {detail}",
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
    """What a ``requests``/``aiohttp`` failure means, in a few words (their own texts repeat the URL and
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
    if "connecttimeout" in names or "connectiontimeout" in names or "connect timeout" in texts:
        return "connection timed out"
    if "timeout" in names or "timed out" in texts:
        return "no answer in time (read timeout)"
    if "ssl" in names:
        return "TLS error"
    if "reset" in texts or "aborted" in texts or "remotedisconnected" in names or "disconnected" in texts:
        return "the connection was closed before a complete answer"
    if "incomplete" in names or "chunked" in names or "payload" in names or "incomplete" in texts:
        return "the answer was cut short"
    return type(exc).__name__
