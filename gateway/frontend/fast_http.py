"""The gateway's front door for its two hot routes, on asyncio protocols and httptools.

aiohttp's server costs about 50 us of CPU per small JSON request and 100 us per relayed
stream on this machine (a bare uvloop + httptools proxy: 27.5 us; the same proxy behind
aiohttp's server: 78 us JSON, 131 us SSE; `loadtest.peer_bench`), a quarter to a third of
the gateway's whole cost per request. So the common case is served here: a
`POST /v1/completions` or `/v1/chat/completions`, HTTP/1.1, framed by Content-Length, that
arrives whole soon after its head. The handlers are the same OpenAI routes aiohttp calls;
they see a `FastRequest` with what they read of a request.

Anything else is aiohttp's, on the same connection: another path or method, a chunked or
oversized body, `Expect`, an upgrade, a head that does not arrive whole in one read or
that httptools rejects, a body still missing after `HANDOFF_AFTER_S`. The bytes of that
request, from its first, go to a fresh aiohttp `RequestHandler` that takes the connection
over for good, so its limits, errors and timeouts (header sizes, 400s, 408, slowloris)
apply exactly as before. A connection is only handed over between responses.

Kept from aiohttp's behaviour for these routes: a handler is cancelled when its client
disconnects; a connection idle for the keep-alive timeout is closed; writes wait while
the client's socket is full (and the send watch aborts a client that reads nothing);
pipelined requests are answered in order; shutdown lets requests in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from serving.slow_clients import LISTEN_BACKLOG, ConnectionCap

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[web.StreamResponse]]

MAX_HEAD = 8190
"""aiohttp's own line limit: a longer head goes to aiohttp, which answers it as before."""
HANDOFF_AFTER_S = 0.5
"""A body not whole this long after its head goes to aiohttp (its body deadline, 408)."""
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_HOP_BY_HOP = frozenset(("content-length", "transfer-encoding", "connection", "date"))


class _Date:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, formatdate(now, usegmt=True).encode()
        return self._value


_date = _Date()


class _WholeBody:
    """`request.content` for a body already in memory (what read_body asks of it)."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes) -> None:
        self._data = data

    def is_eof(self) -> bool:
        return True

    def read_nowait(self, n: int = -1) -> bytes:
        data, self._data = self._data, b""
        return data

    async def readexactly(self, n: int) -> bytes:
        if len(self._data) < n:
            raise asyncio.IncompleteReadError(self._data, n)
        return self.read_nowait()

    async def iter_chunked(self, n: int) -> Any:
        if self._data:
            yield self.read_nowait()


class FastRequest:
    """What the OpenAI routes read of an aiohttp request, for a request parsed here."""

    __slots__ = (
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "path",
        "protocol",
        "transport",
    )

    def __init__(
        self,
        protocol: FastProtocol,
        path: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.protocol = protocol
        self.transport = protocol.transport
        self.path = path
        self.headers = headers
        self.content_length: int | None = len(body)
        self.content = _WholeBody(body)
        self.keep_alive = keep_alive

    def stream_response(self, headers: dict[str, str]) -> FastStreamResponse:
        if not self.keep_alive:
            headers = {**headers, "Connection": "close"}
        return FastStreamResponse(self.protocol, headers)


class FastStreamResponse:
    """A chunked 200 response written straight to the transport; its head leaves with the
    first bytes (one send fewer per stream, as serving.openai_http's aiohttp one does)."""

    status = 200

    def __init__(self, protocol: FastProtocol, headers: dict[str, str]) -> None:
        self.protocol = protocol
        self.headers = headers
        self.finished = False
        self._head: bytes | None = None

    async def prepare(self, request: Any) -> None:
        self._head = _head(200, self.headers.items(), b"Transfer-Encoding: chunked\r\n")

    async def write(self, data: bytes) -> None:
        if data:
            await self.protocol.send(self._take_head() + b"%x\r\n%s\r\n" % (len(data), data))

    async def write_eof(self, data: bytes = b"") -> None:
        chunk = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
        self.finished = True
        await self.protocol.send(self._take_head() + chunk + b"0\r\n\r\n")

    def _take_head(self) -> bytes:
        head, self._head = self._head or b"", b""
        if head:
            self.protocol.streaming = self
        return head


def serialize(resp: web.StreamResponse, keep_alive: bool) -> bytes:
    """A whole aiohttp Response as bytes (our handlers build them: bytes bodies)."""
    assert isinstance(resp, web.Response)
    body = resp.body
    if not isinstance(body, (bytes, bytearray)):
        body = b"" if body is None else bytes(body)  # pragma: no cover - not built here
    headers = ((k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP)
    framing = b"Content-Length: %d\r\n" % len(body)
    if not keep_alive:
        framing += b"Connection: close\r\n"
    return _head(resp.status, headers, framing) + body


def _head(status: int, headers: Iterable[tuple[str, str]], framing: bytes) -> bytes:
    """A response head: status line, the given headers, `framing` lines, Date."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))]
    for k, v in headers:
        lines.append(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")))
    lines.append(b"%sDate: %s\r\n\r\n" % (framing, _date()))
    return b"".join(lines)


SINGLETONS = frozenset(
    (
        "content-length",
        "content-location",
        "content-range",
        "content-type",
        "etag",
        "host",
        "max-forwards",
        "server",
        "transfer-encoding",
        "user-agent",
    )
)
"""Headers aiohttp refuses twice (400), so a proxy in front and we cannot disagree."""
MAX_HEADERS = 128
"""aiohttp's max_headers: more is its 400."""
_ITS_OWN = frozenset(("expect", "content-encoding", "upgrade"))
"""Headers whose request aiohttp serves (100-continue, decompression, upgrades)."""


class _Head:
    """httptools callbacks for one request head; `ours` is False for a request aiohttp
    must answer (its rules on hosts, repeats, encodings), as it would have."""

    __slots__ = ("has_host", "headers", "keep_alive", "names", "ours", "parser", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.names: set[str] = set()
        self.ours = True
        self.has_host = False
        self.parser: httptools.HttpRequestParser | None = None
        self.keep_alive = True

    def on_headers_complete(self) -> None:
        # Read here, not after feed_data: a head with no body (Content-Length: 0) completes
        # its message in that call, and the parser, reset, then says keep-alive whatever
        # the request's Connection header said.
        if self.parser is not None:
            self.keep_alive = self.parser.should_keep_alive()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        n = name.decode("latin-1")
        lower = n.lower()
        if lower in _ITS_OWN or (lower in SINGLETONS and lower in self.names):
            self.ours = False
        self.names.add(lower)
        self.has_host = self.has_host or lower == "host"
        # As aiohttp reads a value: trailing blanks dropped, UTF-8 (a session key or a
        # request id must be the same whichever server parsed it).
        self.headers.append((n, value.rstrip(b" \t").decode("utf-8", "surrogateescape")))


class FastFront:
    """The listener's shared parts: the routes, aiohttp's server for handovers, the cap."""

    def __init__(
        self,
        routes: dict[bytes, Handler],
        aiohttp_server: web.Server,
        cap: ConnectionCap,
        keepalive_timeout_s: float,
        max_body_bytes: int,
    ) -> None:
        self.routes = routes
        self.aiohttp_server = aiohttp_server
        self.cap = cap
        self.keepalive_timeout_s = keepalive_timeout_s
        self.max_body_bytes = max_body_bytes
        self.connections: set[FastProtocol] = set()
        self.handed_over = 0
        """Connections given to aiohttp (not a hot request, or not whole in time)."""
        self._sweeper: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None

    def __call__(self) -> FastProtocol:
        return FastProtocol(self)

    async def start(self, host: str, port: int, reuse_port: bool | None) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self, host, port, reuse_port=reuse_port, backlog=LISTEN_BACKLOG
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Closes connections idle past the keep-alive timeout (one task, not a timer per
        request)."""
        period = max(0.05, min(1.0, self.keepalive_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            cutoff = time.monotonic() - self.keepalive_timeout_s
            for c in list(self.connections):
                if c.idle_since and c.idle_since < cutoff:
                    c.close()

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Stop listening, close idle connections, let requests in flight finish."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for c in list(self.connections):
            c.closing = True
            if c.waiting_for_body:
                c._hand_over()  # its head is in: aiohttp's shutdown waits for it
            elif c.task is None:
                c.close()
        busy = {c.task: c for c in self.connections if c.task is not None}
        if busy:
            _done, pending = await asyncio.wait(busy, timeout=timeout)
            for t in pending:
                busy[t].cut = True  # the drain ended it, not its client (a 503, not a 499)
                t.cancel()
        for c in list(self.connections):
            c.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


class FastProtocol(asyncio.Protocol):
    """One client connection, until it closes or is handed to aiohttp."""

    def __init__(self, front: FastFront) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.idle_since = 0.0
        self.writing_paused = False
        self.closing = False
        self.cut = False
        """Its request was cancelled by the drain's end (shutdown)."""
        self._drain: asyncio.Future[None] | None = None
        self._lost = False
        self._waiting: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self.streaming: FastStreamResponse | None = None
        """The stream whose head has gone out for the request being served."""
        self._after_drain = False
        self._most = MAX_HEAD + front.max_body_bytes
        """Bytes buffered before reading pauses: one whole request of the largest kind."""

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if not self.front.cap.admit(self, transport):
            self._lost = True
            transport.close()  # after the 503 the cap wrote
            return
        self.front.connections.add(self)
        self.idle_since = time.monotonic()

    def data_received(self, data: bytes) -> None:
        if self._lost:
            return
        self.buf += data
        if len(self.buf) > self._most and self.transport and not self._reading_paused:
            # Pipelined past one whole request: read on once the buffer is back under it.
            # Also while nothing is served because the client reads nothing (writing
            # paused): a client that only sends would otherwise grow it without end.
            self.transport.pause_reading()
            self._reading_paused = True
        if self.task is None:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.front.connections.discard(self)
        self.front.cap.forget(self)
        if self._waiting is not None:
            self._waiting.cancel()
        if self.task is not None:
            self.task.cancel()  # aiohttp's handler_cancellation: the upstream call ends too
        self._wake(ConnectionResetError("the client closed the connection"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake(None)
        if self._after_drain and self.task is None and not self._lost:
            self._after_drain = False
            self._next()

    # -- writing -----------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        if self._lost or self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)
        if self.writing_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def _wake(self, exc: Exception | None) -> None:
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            if exc is None:
                d.set_result(None)
            else:
                d.set_exception(exc)

    @property
    def waiting_for_body(self) -> bool:
        return self._waiting is not None

    def close(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.close()

    # -- requests ----------------------------------------------------------------------

    def _next(self) -> None:
        """Serve the request at the head of the buffer if it is whole and ours; wait for
        more of it; or hand the connection to aiohttp."""
        if self.writing_paused:  # the client has not read our last answer yet: wait
            self._after_drain = True
            return
        buf = self.buf
        if not buf:
            self.idle_since = time.monotonic()
            if self.closing:
                self.close()
            return
        self.idle_since = 0.0
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if end < 0:
            self._hand_over()  # a head not whole in one read, or too long: aiohttp's
            return
        head_len = end + 4
        parser_head = _Head()
        parser = httptools.HttpRequestParser(parser_head)
        parser_head.parser = parser
        try:
            parser.feed_data(bytes(buf[:head_len]))
        except (httptools.HttpParserUpgrade, httptools.HttpParserError):
            self._hand_over()  # aiohttp answers what httptools will not parse
            return
        finally:
            parser_head.parser = None  # no cycle for the collector
        route = self.front.routes.get(parser_head.url)
        length = _content_length(parser_head.headers)
        if (
            route is None
            or not parser_head.ours
            or not parser_head.has_host
            or len(parser_head.headers) > MAX_HEADERS
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or length is None
            or length > self.front.max_body_bytes
        ):
            self._hand_over()
            return
        if len(buf) < head_len + length:
            if self._waiting is None:  # from the head on: a trickle does not extend it
                loop = asyncio.get_running_loop()
                self._waiting = loop.call_later(HANDOFF_AFTER_S, self._hand_over)
            return
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        body = bytes(buf[head_len : head_len + length])
        del buf[: head_len + length]
        headers = CIMultiDictProxy(CIMultiDict(parser_head.headers))
        path = parser_head.url.decode("latin-1")
        request = FastRequest(self, path, headers, body, parser_head.keep_alive)
        self.task = asyncio.get_running_loop().create_task(self._serve(route, request))

    async def _serve(self, route: Handler, request: FastRequest) -> None:
        keep_alive = request.keep_alive
        self.streaming = None
        try:
            resp = await route(request)
            if self.streaming is not None:  # a stream's head went out: no other answer
                if resp is not self.streaming or not self.streaming.finished:
                    self.close()  # an unfinished stream: its client sees it end
                    return
            elif isinstance(resp, FastStreamResponse):  # prepared, never written
                await self.send(serialize(web.Response(status=500), False))
                self.close()
                return
            else:  # a whole answer waits for the client like a stream's writes do
                await self.send(serialize(resp, keep_alive and not self.closing))
        except (ConnectionError, asyncio.CancelledError):
            self.close()
            return
        except Exception:
            log.exception("unhandled error serving %s", request.path)
            if self.streaming is None and not self._lost and self.transport is not None:
                self.transport.write(_INTERNAL_ERROR)
            self.close()
            return
        finally:
            self.task = None
            self._resume_reading()
        if not keep_alive or self.closing:
            self.close()
        elif not self._lost:
            self._next()

    def _resume_reading(self) -> None:
        """Read again once what is buffered is under the bound (not after each answer: a
        read per request served let a client that sends faster than it is answered grow
        the buffer by a socket read each time, 360 MB in 8 s)."""
        if (
            self._reading_paused
            and len(self.buf) <= self._most
            and not self._lost
            and self.transport is not None
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def _hand_over(self) -> None:
        """aiohttp takes this connection over, starting with the buffered request."""
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if self._lost or self.transport is None or self.task is not None:
            return
        self.front.handed_over += 1
        self.front.connections.discard(self)
        self.front.cap.forget(self)
        self._lost = True  # nothing more arrives here
        handler = self.front.aiohttp_server()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        if self._reading_paused:  # aiohttp pauses and resumes reading by its own measure
            self._reading_paused = False
            self.transport.resume_reading()
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            handler.data_received(data)


_ERROR_BODY = b'{"error":{"message":"internal server error","type":"server_error"}}'
_INTERNAL_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_ERROR_BODY), _ERROR_BODY)
)


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    """The one Content-Length of a request with no Transfer-Encoding, else None."""
    length: int | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == "transfer-encoding":
            return None
        if lower == "content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
    return length
