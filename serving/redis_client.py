"""Redis clients that fail fast, for every part that keeps shared state in Redis.

Redis is a dependency we must survive, not one we wait on: every client fails fast (short
socket timeouts, no retries, an overall deadline per operation), and its users keep working
on what they last knew while Redis is down.
"""

from __future__ import annotations

import logging

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

SOCKET_TIMEOUT = 0.25
"""Per connect and per reply. Redis on the same network answers in well under 1 ms."""
OP_TIMEOUT = 1.0
"""Upper bound on one whole operation (connect, commands, replies), whatever the socket does."""

REDIS_ERRORS = (aioredis.RedisError, OSError, TimeoutError)


def make_client(
    url: str, socket_timeout: float = SOCKET_TIMEOUT, decode_responses: bool = True
) -> aioredis.Redis:
    """A client that fails fast.

    redis-py's own defaults (5 s timeouts; ten retries with backoff in ``Redis()``) would
    stall a heartbeat or a refresh for tens of seconds during an outage; we would rather
    fail now and try again on the next tick. RESP2 because redis-py 8's RESP3 default turns
    on maintenance notifications, which cost a handshake round trip (failing on Redis < 8)
    and skip the pool's check for connections the server closed: after a Redis restart,
    each stale pooled connection would fail one more heartbeat or refresh.
    """
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        decode_responses=decode_responses,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class OutageLog:
    """Logs the first failure of an outage and the recovery, not every failed tick."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.healthy = True

    def failed(self, exc: BaseException) -> None:
        if self.healthy:
            self.healthy = False
            log.warning("%s: Redis unavailable (%s: %s)", self.what, type(exc).__name__, exc)

    def ok(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.info("%s: Redis reachable again", self.what)
