"""Bounds on what a slow or greedy HTTP client can hold (OWASP API4: unrestricted resource
consumption): a socket, a request head or body that never finishes, a response it never reads.

aiohttp provides part of it: header line, field and count limits (400 past them), and a
keep-alive timer armed when a connection opens, which closes a connection still waiting
for a complete request head when it fires (slowloris): that timer is the keep-alive timeout
the listeners are given. The body deadline is `serving.openai_http.read_body`'s. Added here,
with nothing per chunk: a watch on stalled writes, and a cap on connections.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proto.openai_compat import OpenAIError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096
"""Connections the kernel queues for a listener not yet accepting them (capped by
net.core.somaxconn). asyncio's default is 100 and aiohttp's 128: a burst of a few
thousand clients overflowed it, and the kernel dropped their SYNs, so they waited for
its 1 s and 3 s retries (one /healthz took 17.5 s) where the gateway answers a refusal
in milliseconds."""
KEEPALIVE_TIMEOUT_S = 75.0
"""nginx's keepalive_timeout, longer than the usual load balancer's idle timeout (60 s), so
a balancer never reuses a connection this side has just closed; aiohttp's own default is an
hour, which is also how long a slowloris connection could stay."""
BODY_TIMEOUT_S = 60.0
"""nginx's client_body_timeout, here for the whole body: a trickle cannot extend it."""
SEND_TIMEOUT_S = 60.0
"""nginx's send_timeout."""


class Sending:
    """A response being written; the writer adds one to `writes` after each write returns."""

    __slots__ = ("request", "request_id", "seen", "since", "writes")

    def __init__(self, request: web.BaseRequest, request_id: str, now: float) -> None:
        self.request = request
        self.request_id = request_id
        self.writes = 0
        self.seen = 0
        self.since = now
        """When the watch last saw a write return or the socket accept more."""


class SendWatch:
    """Closes responses whose client has stopped reading.

    A write waits while the socket's buffers are full; a client that never reads would
    hold it, its connection and its upstream call (still generating) until the request's
    deadline. One task, waking four times per `timeout_s` while any response is being
    written, aborts a connection whose transport has stayed paused with no write returning
    for `timeout_s`: handler cancellation then ends the handler, and with it the upstream
    call (without it, the next write fails as for any departed client). A client that reads
    slowly still lets writes return, and is left alone. No timer per chunk or per response.
    """

    def __init__(self, timeout_s: float = SEND_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        """0: no limit."""
        self.closed = 0
        """Responses closed because their client read nothing for `timeout_s`."""
        self._sending: set[Sending] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self, request: web.BaseRequest, request_id: str) -> Sending:
        s = Sending(request, request_id, time.monotonic())
        if self.timeout_s > 0:
            self._sending.add(s)
            if self._task is None or self._task.done():
                self._task = asyncio.get_running_loop().create_task(self._watch())
        return s

    def stop(self, s: Sending) -> None:
        self._sending.discard(s)

    async def _watch(self) -> None:
        while self._sending:
            await asyncio.sleep(self.timeout_s / 4)
            now = time.monotonic()
            for s in list(self._sending):
                protocol = s.request.protocol
                if s.writes != s.seen or protocol is None or not protocol.writing_paused:
                    s.seen, s.since = s.writes, now
                elif now - s.since >= self.timeout_s:
                    self._close(s)

    def _close(self, s: Sending) -> None:
        self._sending.discard(s)
        self.closed += 1
        log.info(
            "closing the response to request %s: its client has read nothing for %.0f s",
            s.request_id,
            self.timeout_s,
        )
        transport = s.request.transport
        if transport is not None:
            transport.abort()  # close() would wait for the unread buffer to drain


_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)


class ConnectionCap:
    """At most `limit` connections on a listener; one past it is answered 503 (an OpenAI
    error body) and closed as it arrives, so idle sockets cannot use up the process's file
    descriptors, which its upstream connections need too.

    aiohttp has no such limit; its server is told of each connection (`connection_made`)
    before any byte is read, which is where the count is kept.
    """

    def __init__(self, server: web.Server, limit: int) -> None:
        self.limit = limit
        self.refused = 0
        self._live: set[object] = set()
        body = orjson.dumps(
            OpenAIError(
                503,
                "too many connections to this gateway process; retry shortly",
                "service_unavailable",
                None,
                "overloaded",
                1000,
            ).body()
        )
        self.answer = _FULL % (len(body), body)
        """What a connection past the limit is told before it is closed."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            if not self.admit(handler, transport):
                handler.force_close()  # closes the transport once the answer is out
                return
            made(handler, transport)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            self.forget(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def admit(self, conn: object, transport: asyncio.Transport) -> bool:
        """Count a new connection in, or answer it 503 (the caller closes it)."""
        if len(self._live) >= self.limit:
            self.refused += 1
            transport.write(self.answer)
            return False
        self._live.add(conn)
        return True

    def forget(self, conn: object) -> None:
        self._live.discard(conn)

    @property
    def open(self) -> int:
        return len(self._live)


def fit_fd_limit(connections: int, reserve: int = 256) -> int:
    """The connection cap the file-descriptor limit allows for `connections`, raising the
    soft limit toward the hard one if that is needed: each connection may hold a second
    descriptor (its upstream), and `reserve` are kept for everything else."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * connections + reserve
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= want:
        return connections
    fitted = max(16, (soft - reserve) // 2)
    log.warning(
        "the file-descriptor limit (%d) allows %d connections, not %d", soft, fitted, connections
    )
    return fitted
