"""A lean HTTP/1.1 keep-alive client for upstream calls, on asyncio protocols and httptools.

Why not aiohttp's client: on the gateway's hot path it was the largest single cost after
the per-chunk JSON work. Measured here (2 cores, uvloop, 32-chunk SSE through the gateway):
aiohttp's `ClientSession.post` plus line-by-line reading cost ~40% of the gateway's CPU per
stream; this client hands the caller whatever bytes one socket read produced, de-chunked
by llhttp (httptools, the parser uvicorn uses), so a 32-event stream that arrives in three
reads costs three wake-ups, not 32. It does only what an upstream call needs: POST/GET, a
body known in advance, keep-alive pooling, deadlines, and backpressure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import time

import httptools

MAX_BUFFER = 1 << 20
"""Unread body bytes at which we stop reading the socket (the client reads slower)."""
IDLE_KEEPALIVE_S = 4.0
"""Drop pooled connections idle this long: servers close theirs (uvicorn after 5 s)."""
MAX_HEADER_BYTES = 64 << 10
"""A response's status line and headers: more is not an upstream worth waiting for (and
httptools would hold an unfinished header line whole, copying it at every read)."""
MAX_BODY_BYTES = 16 << 20
"""A body read whole (`Response.read`): a non-streamed completion, even with logprobs."""


class HTTPError(Exception):
    """The connection failed, closed early, or sent something that is not HTTP."""


class ConnectError(HTTPError):
    """No connection could be made (refused, unreachable, timed out): nothing was sent."""


class _Connection(asyncio.Protocol):
    """One TCP connection; parses one response at a time into a `Response`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.keep_alive = False
        self.idle_since = 0.0
        self._header_bytes = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.response
        if resp is None:  # bytes nobody asked for: the connection is unusable
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            resp._fail(HTTPError(f"malformed response: {e}"))
            self.close()
            return
        if not resp.status:  # all of it was head: bounded here, whatever its lines
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                resp._fail(HTTPError(f"response head over {MAX_HEADER_BYTES} bytes"))
                self.close()
                return
        resp._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._fail(HTTPError(f"connection closed{f': {exc}' if exc else ''}"))

    def pause_writing(self) -> None:  # requests are small; nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self._header_bytes = 0  # per response, not per kept-alive connection

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.response is not None
        # llhttp forgets this once the message completes, so it is read here.
        self.keep_alive = self.parser.should_keep_alive()
        self.response.status = self.parser.get_status_code()
        self.response._headers_done()

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._pieces.append(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._complete = True

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An upstream response being read: status and headers, then the body in pieces."""

    __slots__ = (
        "_buffered",
        "_complete",
        "_conn",
        "_error",
        "_pieces",
        "_pool",
        "_waiter",
        "got_bytes",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection, pool: HTTPPool) -> None:
        self._conn = conn
        self._pool = pool
        self.status = 0
        self.headers: dict[str, str] = {}
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: HTTPError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.got_bytes = False

    # -- called by the connection
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _headers_done(self) -> None:
        self.got_bytes = True
        self._wake()

    def _flush(self) -> None:
        if self._pieces or self._complete:
            self._buffered = sum(map(len, self._pieces))
            if self._buffered > MAX_BUFFER and self._conn.transport is not None:
                self._conn.transport.pause_reading()
            self._wake()

    def _fail(self, error: HTTPError) -> None:
        if not self._complete and self._error is None:
            self._error = error
        self._wake()

    # -- the caller's side
    async def _wait(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        self._waiter = fut = loop.create_future()
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, _expire, fut)
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def start(self, deadline: float | None) -> None:
        """Wait for the status line and headers."""
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait(deadline)

    async def read_some(self, deadline: float | None = None) -> bytes:
        """The body bytes that have arrived (waiting for some), or b"" once it has ended."""
        while not self._pieces:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait(deadline)
        pieces = self._pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        if self._buffered > MAX_BUFFER and self._conn.transport is not None:
            self._conn.transport.resume_reading()
        self._buffered = 0
        return data

    async def read(self, deadline: float | None = None, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body; HTTPError past `limit` bytes (held in memory until then)."""
        parts = []
        size = 0
        while chunk := await self.read_some(deadline):
            size += len(chunk)
            if size > limit:
                raise HTTPError(f"response body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def drained(self) -> bool:
        """The whole body has arrived and been read."""
        return self._complete and not self._pieces

    def release(self) -> None:
        """Return the connection to the pool if the response was read whole, else close it."""
        conn = self._conn
        if conn.response is not self:
            return
        conn.response = None
        if self._complete and not conn.closed and self._error is None and conn.keep_alive:
            self._pool._put(conn)
        else:
            conn.close()


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class HTTPPool:
    """Keep-alive connections to one upstream (host, port)."""

    def __init__(
        self,
        host: str,
        port: int,
        connect_timeout: float = 2.0,
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.ssl = ssl
        """TLS (https://) when set: asyncio's SSL transport, verified against `host`."""
        self._host_header = f"Host: {host}:{port}\r\n".encode()
        self._idle: list[_Connection] = []

    def _put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_KEEPALIVE_S:
                return conn
            conn.close()
        return None

    async def _connect(self, deadline: float | None) -> _Connection:
        """A new connection, within the connect timeout and the caller's deadline (a
        TimeoutError when the deadline is what ran out: the upstream is not to blame)."""
        loop = asyncio.get_running_loop()
        limit, ours = self.connect_timeout, True
        if deadline is not None and (left := deadline - loop.time()) < limit:
            limit, ours = max(0.0, left), False
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    _Connection, self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            if not ours:
                raise
            raise ConnectError(
                f"cannot connect to {self.host}:{self.port}: timed out after {limit:g} s"
            ) from None
        except OSError as e:
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: {e}") from None
        return conn

    async def request(
        self,
        method: bytes,
        path: bytes,
        body: bytes = b"",
        headers: bytes = b"",
        deadline: float | None = None,
    ) -> Response:
        """Send a request and wait for the response's headers (by `deadline`, loop time).

        `headers` are raw `Name: value\\r\\n` lines. A pooled connection the server closed
        while idle is replaced once, transparently, when no response byte came back.
        """
        head = b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n%s\r\n" % (
            method,
            path,
            self._host_header,
            len(body),
            headers,
        )
        for retry in (False, True):
            conn = self._take()
            reused = conn is not None
            if conn is None:
                try:
                    conn = await self._connect(deadline)
                except ConnectError as e:
                    if retry:  # the request went out once, on the stale connection
                        raise HTTPError(str(e)) from None
                    raise
            resp = Response(conn, self)
            conn.response = resp
            assert conn.transport is not None
            conn.transport.write(head + body if len(body) < 16384 else head)
            if len(body) >= 16384:
                conn.transport.write(body)
            try:
                await resp.start(deadline)
                return resp
            except HTTPError:
                conn.response = None
                conn.close()
                if reused and not resp.got_bytes:
                    continue  # a stale keep-alive connection: try a fresh one
                raise
            except BaseException:  # timeout or cancellation mid-response: unusable
                conn.response = None
                conn.close()
                raise
        raise HTTPError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        with contextlib.suppress(Exception):
            await asyncio.sleep(0)
