"""Share ejections between gateways through Redis, off the request path.

Each gateway publishes the replicas it has ejected (with the time left) and honours the
others' ejections, so one gateway's discovery that a replica is sick protects the whole
fleet. Redis being down only means each gateway decides alone until it is back.

The ejections live in one hash, written and read by one script a sync: a SCAN for
per-replica keys walked the whole keyspace of a shared Redis twice a second. The script
times them by the Redis server's clock, so gateways' clocks need not agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable

import orjson

from gateway.resilience.breaker import OPEN, BreakerBoard
from serving.redis_client import make_client

log = logging.getLogger(__name__)

# KEYS[1]: the hash (replica -> "<gateway> <until ms, server clock>").
# ARGV: this gateway's id, then (replica, ms left) pairs it has ejected.
# Returns (replica, ms left) pairs ejected by other gateways; drops expired or unreadable
# entries. A write never shortens another gateway's longer ejection of the same replica.
_SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
for i = 2, #ARGV - 1, 2 do
  local left = tonumber(ARGV[i + 1])
  if left and left > 0 then
    local untl = now + math.floor(left)
    local old = redis.call('HGET', KEYS[1], ARGV[i])
    local by, u = nil, nil
    if old then by, u = string.match(old, '^(%S+) (%d+)$') end
    if not u or by == me or tonumber(u) < untl then
      redis.call('HSET', KEYS[1], ARGV[i], me .. ' ' .. untl)
    end
  end
end
local out, last = {}, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local by, u = string.match(all[i + 1], '^(%S+) (%d+)$')
  u = tonumber(u)
  if not u or u <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    if u > last then last = u end
    if by ~= me then
      out[#out + 1] = all[i]
      out[#out + 1] = tostring(u - now)
    end
  end
end
if last > now then redis.call('PEXPIRE', KEYS[1], last - now + 1000) end
return out
"""


class BreakerSync:
    def __init__(
        self,
        url: str,
        board: BreakerBoard,
        prefix: str = "breakwater:",
        interval_s: float = 0.5,
        pools: Callable[[str], Iterable[list[str]]] | None = None,
    ) -> None:
        """`pools(worker_id)`: the pools (ready replicas of each of its models) that an
        ejection from another gateway must keep within the share cap; none: no cap."""
        self.board = board
        self.redis = make_client(url)
        self.key = f"{prefix}ejections"
        self.interval_s = interval_s
        self.pools = pools
        self.gateway_id = uuid.uuid4().hex[:12]
        self._script = self.redis.register_script(_SYNC)
        self._task: asyncio.Task[None] | None = None
        self._healthy = True

    async def sync_once(self) -> None:
        now = time.monotonic()
        args: list[str] = [self.gateway_id]
        for worker_id, r in self.board.replicas().items():
            if r.breaker.current_state == OPEN and r.ejected_at is not None:
                left = r.ejected_at + r.breaker.reset_timeout - now
                if left > 0.05:
                    args += [worker_id, str(int(left * 1000))]
        async with asyncio.timeout(1.0):
            out = await self._script(keys=[self.key], args=args)
        for worker_id, left_ms in zip(out[::2], out[1::2], strict=True):  # decoded strings
            pools = self.pools(worker_id) if self.pools is not None else ()
            self.board.force_open(worker_id, int(left_ms) / 1000.0, pools)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
                if not self._healthy:
                    log.info("breaker sync: Redis reachable again")
                self._healthy = True
            except Exception as e:
                if self._healthy:
                    log.warning("breaker sync: Redis unavailable (%s); deciding alone", e)
                self._healthy = False
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        await _stopped(self._task)
        with contextlib.suppress(Exception):
            await self.redis.aclose()


async def _stopped(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class SiblingBreakerSync:
    """Share ejections between the processes of one gateway without Redis, through the
    directory they share (gateway/shared_dir.py): each writes its own ejections to a file of
    its own, with the monotonic time each ends (one clock for every process of a host), and
    honours its siblings'. Without it each process found a dead replica alone: 21 failed
    attempts in 12 s at three processes, against 7 at one (retries hid them from clients)."""

    def __init__(
        self,
        directory: str,
        index: int,
        processes: int,
        board: BreakerBoard,
        interval_s: float = 0.1,
        pools: Callable[[str], Iterable[list[str]]] | None = None,
    ) -> None:
        self.path = _file(directory, index)
        self.siblings = [_file(directory, i) for i in range(processes) if i != index]
        """Only this run's processes (an operator's own directory outlives runs)."""
        self.board = board
        self.interval_s = interval_s
        self.pools = pools
        self._written: dict[str, float] | None = None
        self._task: asyncio.Task[None] | None = None

    def own(self) -> dict[str, float]:
        """This process's own ejections (not its siblings'), each with when it ends."""
        return {
            worker_id: r.ejected_at + r.breaker.reset_timeout
            for worker_id, r in self.board.replicas().items()
            if r.breaker.current_state == OPEN and r.ejected_at is not None
        }

    async def sync_once(self) -> None:
        own = self.own()
        if own != self._written:
            await asyncio.to_thread(_write_json, self.path, own)
            self._written = own
        theirs = await asyncio.to_thread(_read, self.siblings)
        self._honour(theirs)

    def _honour(self, ejections: list[tuple[str, float]]) -> None:
        now = time.monotonic()
        longest = self.board.config.max_ejection_s + 1.0
        for worker_id, until in ejections:
            # past any live ejection's length: another boot's clock, a stale file
            if 0.05 < until - now <= longest:
                pools = self.pools(worker_id) if self.pools is not None else ()
                self.board.force_open(worker_id, until - now, pools)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception as e:  # a full disk, a removed directory: decide alone
                log.debug("breaker sync between processes: %s", e)
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        # a restarted process takes on its predecessor's ejections (same index, same file)
        self._honour(await asyncio.to_thread(_read, [self.path]))
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        await _stopped(self._task)
        with contextlib.suppress(OSError):
            os.remove(self.path)


EJECTIONS = "ejections-"
"""File name prefix of a process's ejections in the shared directory."""


def _write_json(path: str, data: dict[str, float]) -> None:
    staged = path + ".new"
    with open(staged, "wb") as f:
        f.write(orjson.dumps(data))
    os.replace(staged, path)  # whole or not at all, for a sibling reading it


def _file(directory: str, index: int) -> str:
    return os.path.join(directory, f"{EJECTIONS}{index}.json")


def _read(paths: list[str]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for path in paths:
        with contextlib.suppress(
            OSError, orjson.JSONDecodeError, AttributeError, ValueError, TypeError
        ):
            with open(path, "rb") as f:
                data = orjson.loads(f.read())
            out += [(str(w), float(u)) for w, u in data.items()]
    return out
