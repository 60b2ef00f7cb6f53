"""Redis registry backend: several gateway replicas share one view of a worker fleet.

Workers heartbeat their record (see ``serving.registry_record`` for the key layout); this
side reads it. The gateway keeps its last known view while Redis is down (and, for a grace
period after it returns, until the fleet has re-heartbeated into a restarted, empty Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from serving.redis_client import OP_TIMEOUT, REDIS_ERRORS, SOCKET_TIMEOUT, OutageLog, make_client
from serving.registry_record import (
    DEFAULT_PREFIX,
    DEFAULT_TTL,
    RegistryKeys,
    WorkerInfo,
    WorkerState,
)

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 0.5

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
        probe: Callable[[WorkerInfo], Awaitable[object]] | None = None,
        probe_interval: float = 2.0,
    ) -> None:
        self.url = url
        self.probe = probe
        """Checks a replica's health itself (its upstream's probe), for use while Redis
        is out: a replica the gateway marked NOT_SERVING on a failed call would stay so
        until Redis answered again (refreshes replace the marked records), so a rolling
        restart during an outage took the replicas out one by one."""
        self.probe_interval = probe_interval
        self._probed_at = 0.0
        self.poll_interval = poll_interval
        self.op_timeout = op_timeout
        self.recovery_grace = recovery_grace
        """After an outage, keep known workers missing from Redis this long (see refresh)."""
        self.consecutive_failures = 0
        """Failed refreshes in a row (0 when healthy); for health checks and metrics."""
        self._keys = RegistryKeys(prefix)
        self._client = make_client(url, socket_timeout)
        self._prune = self._client.register_script(_PRUNE_LUA)
        self._view: list[WorkerInfo] = []
        self._bad: set[str] = set()
        self._outage = OutageLog("registry")
        self._grace_until = 0.0
        self._epoch: str | None = None
        """The Redis data set the view was read from (see RegistryKeys.epoch)."""
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
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
            except Exception:  # a bug or a hostile record must not end the refreshes
                self.consecutive_failures += 1
                log.exception("registry: refresh failed")

    async def refresh(self) -> None:
        """One refresh; on a Redis error keep the previous view and count the failure.

        For ``recovery_grace`` seconds after an outage, workers of the last view that Redis
        does not list are kept: a restarted Redis comes back empty, and the fleet needs a
        heartbeat to repopulate it, during which the gateway should not route to nobody.
        A restart between two polls fails none of them, so an empty Redis is also told by
        its epoch marker having gone (a failover to an empty replica, likewise).
        """
        try:
            async with asyncio.timeout(self.op_timeout):
                view, gone, lost_data = await self._read()
        except REDIS_ERRORS as exc:
            self.consecutive_failures += 1
            self._outage.failed(exc)
            await self._probe_marked()
            return
        now = time.monotonic()
        if self.consecutive_failures or lost_data:
            self._grace_until = now + self.recovery_grace
        if now < self._grace_until:
            fresh = {w.worker_id for w in view}
            view += [w for w in self._view if w.worker_id not in fresh]
            view.sort(key=lambda w: w.worker_id)
        self._view = view
        self.consecutive_failures = 0
        self._outage.ok()
        if gone:  # housekeeping: a failure here leaves the view current, so it is no outage
            keys = [self._keys.index, *(self._keys.worker(i) for i in gone)]
            try:
                async with asyncio.timeout(self.op_timeout):
                    await self._prune(keys=keys, args=gone)
            except REDIS_ERRORS as exc:
                log.debug("registry: prune failed: %s", exc)

    async def _probe_marked(self) -> None:
        """While Redis is out, ask the replicas marked NOT_SERVING whether they serve again
        (every `probe_interval`), as the embedded registry does for all of them."""
        now = time.monotonic()
        if self.probe is None or now - self._probed_at < self.probe_interval:
            return
        self._probed_at = now
        marked = [w for w in self._view if w.state == WorkerState.NOT_SERVING]
        for result in await asyncio.gather(*map(self.probe, marked), return_exceptions=True):
            if isinstance(result, Exception):  # the probe marked it; nothing else to do
                log.debug("registry: probe during the outage failed: %s", result)

    async def _read(self) -> tuple[list[WorkerInfo], list[str], bool]:
        """The records listed, the ids listed without a record, and whether Redis lost its
        data since the last read."""
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self._keys.epoch)
        pipe.smembers(self._keys.index)
        epoch, members = await pipe.execute()
        if epoch is None:  # a new Redis (or this fleet's first gateway): mark it
            await self._client.set(self._keys.epoch, uuid.uuid4().hex, nx=True)
            epoch = await self._client.get(self._keys.epoch)
        lost_data = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        ids = sorted(members)
        if not ids:
            return [], [], lost_data
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
            except (ValueError, TypeError, RecursionError) as exc:
                # A worker on an incompatible version: skip it, and say so once per worker.
                if worker_id not in self._bad:
                    self._bad.add(worker_id)
                    log.warning("registry: ignoring worker %r, bad entry: %s", worker_id, exc)
        return view, gone, lost_data
