"""The triggers' HTTP client: keep-alive HTTP/1.1 connections on asyncio streams, spoken through ``h11``
(the protocol engine under httpx, installed with it).

Why not httpx: a triggerer shares one event loop with every deferred task of a deployment, so the CPU of
a poll is taken from all of them. Measured side by side (``bench/transports.py``, 500 reads in flight over
32 connections): httpx 0.87-1.0 ms of CPU per read, httpcore directly 0.8 ms, aiohttp 0.09-0.11 ms (a new
dependency), this client 0.08 ms. httpx spends it in layers a poll does not need (request and header
models, auth and redirect loops, anyio streams, a pool that examines every connection per request).

One :class:`Http11Connection` carries one exchange at a time; the pool in
:mod:`evolink_provider.hooks.transport` lends them out. Every exchange is bounded in time by one timer
that closes the connection when it fires (see :meth:`Http11Connection.exchange`), and in size by
:class:`~evolink_provider.hooks.responses.AnswerBody`, which is fed the raw bytes as they arrive (at most
one gzip/deflate layer undone, never more than 1 MiB held).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import h11

from evolink_provider.hooks.responses import AnswerBody, answer_out_of_time

if TYPE_CHECKING:
    from evolink_provider.hooks.transport import _Request

#: ``(scheme, host, port)``: where a connection goes.
Origin = tuple[str, str, int]
#: Bytes asked of the socket per read; an answer is about a kilobyte (a batch of 50 about 50 KB).
READ_SIZE = 64 * 1024


class _TimeUp(Exception):
    """The exchange's timer closed the connection before the answer was complete."""


class Http11Connection:
    """A TCP (or TLS) connection to one origin and its HTTP/1.1 state."""

    def __init__(
        self, origin: Origin, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host_header: str
    ) -> None:
        self.origin = origin
        self._reader = reader
        self._writer = writer
        self._host_header = host_header
        self._state = h11.Connection(h11.CLIENT)
        self._timed_out = False
        self.idle_since = time.monotonic()

    @classmethod
    async def open(
        cls, origin: Origin, ssl_context: ssl.SSLContext | None, connect_timeout: float
    ) -> Http11Connection:
        """Connect to ``(scheme, host, port)`` (and shake hands) within ``connect_timeout`` seconds."""
        scheme, host, port = origin
        ssl_context = ssl_context if scheme == "https" else None
        default_port = 443 if ssl_context else 80
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ssl_context, limit=READ_SIZE), connect_timeout
            )
        except asyncio.TimeoutError:
            raise TimeoutError(f"connect timeout after {connect_timeout:g}s") from None
        named = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets in Host
        return cls(origin, reader, writer, named if port == default_port else f"{named}:{port}")

    @property
    def reusable(self) -> bool:
        """Whether another exchange may be sent: the last one ended cleanly and the peer has not closed."""
        return (
            self._state.our_state is h11.IDLE and not self._writer.is_closing() and not self._reader.at_eof()
        )

    async def exchange(
        self, request: _Request, target: str, body: bytes | None, until: float
    ) -> tuple[int, dict[str, str], bytes]:
        """Send ``request`` and read its answer: the status, the headers (lower-case names, repeated ones
        joined by ``, ``) and the body, decoded and bounded by :class:`AnswerBody`.

        The whole answer must arrive by ``until`` (epoch seconds: one read timeout after the request, or
        the wait's deadline if sooner): one timer closes the connection then, so a stalled or trickling
        server cannot hold the read. Any failure leaves the connection closed.
        """
        timer = asyncio.get_running_loop().call_later(max(0.0, until - time.time()), self._time_up)
        try:
            fields = [("Host", self._host_header), *request.headers.items()]
            if body is not None:
                fields.append(("Content-Length", str(len(body))))
            data = self._state.send(h11.Request(method=request.method, target=target, headers=fields))
            if body is not None:
                data += self._state.send(h11.Data(data=body))
            self._writer.write(data + self._state.send(h11.EndOfMessage()))
            response = await self._next(h11.Response)
            assert isinstance(response, h11.Response)
            headers = _joined(response.headers)
            answer = AnswerBody(request, headers.get("content-encoding"), until)
            while not isinstance(event := await self._next(h11.Data, h11.EndOfMessage), h11.EndOfMessage):
                assert isinstance(event, h11.Data)
                answer.add(event.data)
        except _TimeUp:
            self.close()
            raise answer_out_of_time(request) from None
        except BaseException:
            self.close()
            raise
        finally:
            timer.cancel()
        if self._state.our_state is h11.DONE and self._state.their_state is h11.DONE:
            self._state.start_next_cycle()
            self.idle_since = time.monotonic()
        else:  # the server closes after this answer (Connection: close, or a body read to EOF)
            self.close()
        return response.status_code, headers, answer.content()

    async def _next(self, *wanted: type[h11.Event]) -> h11.Event:
        """The next event of the answer (informational 1xx answers skipped), reading as needed."""
        while True:
            event = self._state.next_event()
            if event is h11.NEED_DATA:
                data = await self._reader.read(READ_SIZE)
                if self._timed_out:
                    raise _TimeUp
                self._state.receive_data(data)
            elif isinstance(event, wanted):
                return event
            elif not isinstance(event, h11.InformationalResponse):
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in an answer")

    def _time_up(self) -> None:
        self._timed_out = True
        self.close()

    def close(self) -> None:
        """Drop the connection at once (no TLS close_notify to wait for: nothing more is sent on it)."""
        self._writer.transport.abort()


def _joined(fields: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Answer headers by lower-case name (as h11 gives them), a repeated one joined by ``, ``."""
    headers: dict[str, str] = {}
    for name, value in fields:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers
