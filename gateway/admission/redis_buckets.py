"""Cluster-wide token buckets in Redis: every gateway charges the same buckets.

One Lua script refills and takes, all or nothing, over all the buckets of a request, in one
round trip and atomically; time is Redis server time (``TIME``), so gateway clocks never
matter. Keys: ``{prefix}tenant:{name}:{requests|tokens}`` and ``{prefix}global:{kind}``, hashes
``{l: level, t: stamp in µs}`` that expire once they would have refilled anyway.

Redis is a dependency we must survive, not one we wait on: short socket timeouts and no
retries, an overall deadline per call, and after a failure the request path stops calling
Redis at all (``take`` returns ``None`` at once and the caller uses local buckets) while a
background probe waits for Redis to answer again. So an outage costs at most one timeout
for the calls in flight when it starts, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis

from gateway.admission.buckets import ALLOWED, BucketSpec, TakeResult
from gateway.admission.tenants import (
    REDIS_OP_TIMEOUT_S,
    REDIS_PROBE_INTERVAL_S,
    REDIS_SOCKET_TIMEOUT_S,
)
from serving.redis_client import make_client

log = logging.getLogger(__name__)

# ARGV holds rate (per second), burst and cost for each key in turn; time is Redis's.
_LUA_BUCKETS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- bucket i refilled to now: its rate, burst, cost, level (at most the burst) and stamp
local function refilled(i)
  local rate = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local s = redis.call('HMGET', KEYS[i], 'l', 't')
  local level, stamp = tonumber(s[1]), tonumber(s[2])
  if level == nil or stamp == nil then
    level, stamp = burst, now
  end
  if now > stamp then
    level = level + (now - stamp) * rate / 1000000
    stamp = now
  end
  return rate, burst, cost, math.min(burst, level), stamp
end
-- write bucket i, to expire once it would have refilled anyway: the burst plus any debt;
-- whole ms as digits (a huge burst made it "1e+18", which PEXPIRE refuses), at most ~30 years
local function store(i, rate, burst, level, stamp)
  local ttl = math.min(math.ceil((burst - math.min(level, 0)) * 1000 / rate) + 1000, 1e12)
  redis.call('HSET', KEYS[i], 'l', string.format('%.17g', level), 't', string.format('%d', stamp))
  redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl))
end
"""

# Returns {1, 0, 0} when taken, else {0, wait_ms, 1-based index of the slowest bucket}.
TAKE_LUA = (
    _LUA_BUCKETS
    + """
local rates, bursts, levels, stamps = {}, {}, {}, {}
local wait, worst = 0, 0
for i = 1, #KEYS do
  local rate, burst, cost, level, stamp = refilled(i)
  rates[i], bursts[i], levels[i], stamps[i] = rate, burst, level - cost, stamp
  local need = math.min(cost, burst)  -- more than a burst: a full bucket, then a debt
  if level < need then
    local w = math.ceil((need - level) * 1000 / rate)
    if w > wait then
      wait, worst = w, i
    end
  end
end
if wait > 0 then
  return {0, wait, worst}
end
for i = 1, #KEYS do
  store(i, rates[i], bursts[i], levels[i], stamps[i])
end
return {1, 0, 0}
"""
)

# The cost taken whatever the level (a debt) or, negative, given back up to the burst
# (LocalBuckets.adjust).
ADJUST_LUA = (
    _LUA_BUCKETS
    + """
for i = 1, #KEYS do
  local rate, burst, cost, level, stamp = refilled(i)
  store(i, rate, burst, math.min(burst, level - cost), stamp)
end
return 1
"""
)

_ERRORS = (aioredis.RedisError, OSError, TimeoutError)


class RedisBuckets:
    """Shared buckets; ``take`` answers ``None`` when Redis cannot be used right now."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        socket_timeout: float = REDIS_SOCKET_TIMEOUT_S,
        op_timeout: float = REDIS_OP_TIMEOUT_S,
        backoff_s: float = REDIS_PROBE_INTERVAL_S,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.backoff_s = backoff_s
        self.max_backoff_s = 8 * backoff_s
        """So a recovered Redis is back in use within about this long."""
        self.available = True
        """False from a failure until a probe succeeds; the request path reads only this."""
        self.failures = 0
        """Calls that failed (timeouts, refused connections, errors), for metrics and tests."""
        self._client = make_client(url, socket_timeout)
        self._script = self._client.register_script(TAKE_LUA)
        self._adjust = self._client.register_script(ADJUST_LUA)
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Check Redis once, so a gateway started during an outage goes local at once."""
        if not await self._probe():
            self._mark_down(None)

    async def close(self) -> None:
        self._closed = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        with contextlib.suppress(*_ERRORS):
            await self._client.aclose()

    async def take(self, specs: Sequence[BucketSpec]) -> TakeResult | None:
        """Charge every spec or none, cluster-wide; ``None``: Redis unusable, go local."""
        if not self.available or self._closed:
            return None
        try:
            async with asyncio.timeout(self.op_timeout):
                reply = await self._call(specs)
        except _ERRORS as exc:
            self._mark_down(exc)
            return None
        allowed, wait_ms, worst = (int(x) for x in reply)
        if allowed:
            return ALLOWED
        return TakeResult(wait_ms / 1000, worst - 1)

    async def adjust(self, specs: Sequence[BucketSpec]) -> bool:
        """`LocalBuckets.adjust`, cluster-wide; False if Redis could not take it."""
        if not self.available or self._closed:
            return False
        keys = [self.prefix + s.key for s in specs]
        args = [repr(float(x)) for s in specs for x in (s.rate, s.burst, s.cost)]
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._adjust(keys=keys, args=args)
        except _ERRORS as exc:
            self._mark_down(exc)
            return False
        return True

    async def _call(self, specs: Sequence[BucketSpec]) -> list[int]:
        keys = [self.prefix + s.key for s in specs]
        args = [repr(float(x)) for s in specs for x in (s.rate, s.burst, s.cost)]
        return await self._script(keys=keys, args=args)  # type: ignore[no-any-return]

    def _mark_down(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.failures += 1
        if self.available:
            self.available = False
            log.warning(
                "admission: Redis unavailable, using local buckets (%s)",
                f"{type(exc).__name__}: {exc}" if exc else "no answer at start",
            )
        if not self._closed and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.get_running_loop().create_task(
                self._probe_until_up(), name="admission-redis-probe"
            )

    async def _probe(self) -> bool:
        """Run the real script on a probe key (cost 0): checks the whole path, writes included."""
        try:
            async with asyncio.timeout(self.op_timeout):
                await self._call([BucketSpec("probe", 1.0, 1.0, 0.0)])
        except _ERRORS:
            return False
        return True

    async def _probe_until_up(self) -> None:
        delay = self.backoff_s
        while not self._closed:
            await asyncio.sleep(delay)
            if await self._probe():
                self.available = True
                log.info("admission: Redis reachable again, cluster-wide buckets back in use")
                return
            delay = min(delay * 2, self.max_backoff_s)
