"""Redis registry backend: several gateway replicas share one view of a worker fleet.

Layout under a prefix (default ``breakwater:``):

- ``{prefix}worker:{worker_id}``: the worker's ``WorkerInfo`` JSON, written with a TTL on
  every heartbeat. A worker that dies without withdrawing (SIGKILL, lost node) simply
  stops refreshing it, and Redis expires it: liveness needs no clocks shared between hosts.
- ``{prefix}workers``: a set of worker ids, so gateways can list the fleet without SCAN.
  Ids whose key has expired are removed lazily by the gateways that notice.

Redis is a dependency we must survive, not one we wait on: every client fails fast (short
socket timeouts, no retries, an overall deadline per operation), the gateway keeps its last
known view while Redis is down (and, for a grace period after it returns, until the fleet
has re-heartbeated into a restarted, empty Redis), and a worker keeps serving if it cannot
heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.registry.base import WorkerInfo

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "breakwater:"
DEFAULT_TTL = 3.0
"""Seconds a heartbeat stays valid: three missed 1 s heartbeats mark a worker gone."""
DEFAULT_POLL_INTERVAL = 0.5
SOCKET_TIMEOUT = 0.25
"""Per connect and per reply. Redis on the same network answers in well under 1 ms."""
OP_TIMEOUT = 1.0
"""Upper bound on one whole operation (connect, commands, replies), whatever the socket does."""

# Drop ids from the index only if their key is still absent when the script runs: a worker
# that re-published between our MGET and this cleanup must not be unlisted. The publisher
# writes key and index in one MULTI, so the check and the removal cannot interleave with it.
_PRUNE_LUA = """
local removed = 0
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i - 1])
  end
end
return removed
"""


def make_client(url: str, socket_timeout: float = SOCKET_TIMEOUT) -> aioredis.Redis:
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
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class _Keys:
    def __init__(self, prefix: str) -> None:
        self.index = f"{prefix}workers"
        self._worker = f"{prefix}worker:"

    def worker(self, worker_id: str) -> str:
        return self._worker + worker_id


class _OutageLog:
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


class RedisPublisher:
    """Worker side: heartbeats this worker's ``WorkerInfo`` (with its stats) into Redis."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        socket_timeout: float = SOCKET_TIMEOUT,
        op_timeout: float = OP_TIMEOUT,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.op_timeout = op_timeout
        self._keys = _Keys(prefix)
        self._client = make_client(url, socket_timeout)
        self._outage = _OutageLog("registry publisher")

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisPublisher:
        return cls(url, **kwargs)

    async def publish(self, info: WorkerInfo) -> None:
        """Write ``info`` with a fresh TTL and index it; never raises on Redis errors.

        ``updated_at`` is stamped here so that it always means "time of this heartbeat".
        """
        info = dataclasses.replace(info, updated_at=time.time())
        try:
            async with asyncio.timeout(self.op_timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.set(
                        self._keys.worker(info.worker_id),
                        info.to_json(),
                        px=max(1, round(self.ttl * 1000)),
                    )
                    pipe.sadd(self._keys.index, info.worker_id)
                    await pipe.execute()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
        else:
            self._outage.ok()

    async def withdraw(self, worker_id: str) -> None:
        """Remove the worker now (drain or clean exit) rather than waiting for its TTL."""
        try:
            async with asyncio.timeout(self.op_timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.delete(self._keys.worker(worker_id))
                    pipe.srem(self._keys.index, worker_id)
                    await pipe.execute()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._outage.failed(exc)
        else:
            self._outage.ok()

    async def close(self) -> None:
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self._client.aclose()


class RedisRegistry:
    """Gateway side: a view of the fleet, refreshed from Redis in the background.

    ``workers()`` never does I/O: the request path reads the last refreshed view, which is
    kept as is while Redis is unreachable (a stale view beats routing to nobody).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        socket_timeout: float = SOCKET_TIMEOUT,
        op_timeout: float = OP_TIMEOUT,
        recovery_grace: float = DEFAULT_TTL,
    ) -> None:
        self.url = url
        self.poll_interval = poll_interval
        self.op_timeout = op_timeout
        self.recovery_grace = recovery_grace
        """After an outage, keep known workers missing from Redis this long (see refresh)."""
        self.consecutive_failures = 0
        """Failed refreshes in a row (0 when healthy); for health checks and metrics."""
        self._keys = _Keys(prefix)
        self._client = make_client(url, socket_timeout)
        self._prune = self._client.register_script(_PRUNE_LUA)
        self._view: list[WorkerInfo] = []
        self._bad: set[str] = set()
        self._outage = _OutageLog("registry")
        self._grace_until = 0.0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisRegistry:
        return cls(url, **kwargs)

    @property
    def healthy(self) -> bool:
        """Whether the last refresh reached Redis (the view is current, not just last known)."""
        return self.consecutive_failures == 0

    def workers(self) -> list[WorkerInfo]:
        return list(self._view)

    async def start(self) -> None:
        """Load the view once (so a new gateway routes at once), then refresh in background.

        Does not raise if Redis is down: the gateway starts with an empty view and fills it
        when Redis comes back.
        """
        if self._task is not None:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="redis-registry-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self._client.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            await self.refresh()

    async def refresh(self) -> None:
        """One refresh; on a Redis error keep the previous view and count the failure.

        For ``recovery_grace`` seconds after an outage, workers of the last view that Redis
        does not list are kept: a restarted Redis comes back empty, and the fleet needs a
        heartbeat to repopulate it, during which the gateway should not route to nobody.
        """
        try:
            async with asyncio.timeout(self.op_timeout):
                view, gone = await self._read()
                now = time.monotonic()
                if self.consecutive_failures:
                    self._grace_until = now + self.recovery_grace
                if now < self._grace_until:
                    fresh = {w.worker_id for w in view}
                    view += [w for w in self._view if w.worker_id not in fresh]
                    view.sort(key=lambda w: w.worker_id)
                self._view = view
                if gone:
                    keys = [self._keys.index, *(self._keys.worker(i) for i in gone)]
                    await self._prune(keys=keys, args=gone)
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self.consecutive_failures += 1
            self._outage.failed(exc)
            return
        self.consecutive_failures = 0
        self._outage.ok()

    async def _read(self) -> tuple[list[WorkerInfo], list[str]]:
        ids = sorted(await self._client.smembers(self._keys.index))
        if not ids:
            return [], []
        blobs = await self._client.mget([self._keys.worker(i) for i in ids])
        view: list[WorkerInfo] = []
        gone: list[str] = []
        for worker_id, blob in zip(ids, blobs, strict=True):
            if blob is None:
                gone.append(worker_id)
                continue
            try:
                view.append(WorkerInfo.from_json(blob))
                self._bad.discard(worker_id)
            except (ValueError, TypeError) as exc:
                # A worker on an incompatible version: skip it, and say so once per worker.
                if worker_id not in self._bad:
                    self._bad.add(worker_id)
                    log.warning("registry: ignoring worker %r, bad entry: %s", worker_id, exc)
        return view, gone
