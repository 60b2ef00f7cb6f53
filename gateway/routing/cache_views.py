"""What each Breakwater worker holds in its prefix cache, followed live over WatchCache.

Each gRPC worker in the registry gets one stream: a snapshot of its block keys, then every
change as its engine caches or evicts a block. With these views the prefix-aware policy
scores those workers on what they hold, evictions included, instead of on what it has
sent them. A worker whose engine cannot report (UNIMPLEMENTED), or an OpenAI upstream, has
no view and is scored from the approximate index as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from gateway.registry.base import Registry
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from serving.tls import ClientTLS, aio_channel

log = logging.getLogger(__name__)


@dataclass
class CacheView:
    block_size: int
    model_id: str
    tokenizer: str
    """The worker's tokenizer directory: this gateway may load it when it is local."""
    held: set[int] = field(default_factory=set)
    evicted: dict[int, float] = field(default_factory=dict)
    """Key -> when (monotonic) the worker reported evicting it, while that is recent: a
    request routed here before that moment no longer vouches for the block."""

    def digest(self) -> str:
        """XOR of the held keys: equal sets, equal digests (compare with a worker's report)."""
        x = 0
        for key in self.held:
            x ^= key
        return f"{x:016x}"

    def apply(self, stored: list[int], removed: list[int], now: float) -> None:
        self.held.update(stored)
        self.held.difference_update(removed)
        evicted = self.evicted
        for key in stored:
            evicted.pop(key, None)
        for key in removed:
            evicted[key] = now
        if len(evicted) > 4 * len(self.held) + 4096:  # bounded: old evictions are moot
            cutoff = now - EVICTION_MEMORY_S
            self.evicted = {k: t for k, t in evicted.items() if t > cutoff}


EVICTION_MEMORY_S = 60.0
"""How long an eviction is remembered; longer than any 'recently routed' window."""


class CacheWatcher:
    """Keeps one WatchCache stream per gRPC worker of the registry; `views` is the result."""

    def __init__(
        self,
        registry: Registry,
        sync_s: float = 1.0,
        max_backoff_s: float = 10.0,
        tls: ClientTLS | None = None,
    ):
        self.registry = registry
        self.tls = tls
        """The credentials the gateway's calls to workers use (None: plaintext)."""
        self.sync_s = sync_s
        self.max_backoff_s = max_backoff_s
        self.views: dict[str, CacheView] = {}
        self.updates = 0
        self._follows: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._sync_loop())

    async def close(self) -> None:
        tasks = [t for _, t in self._follows.values()]
        if self._task is not None:
            tasks.append(self._task)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._follows.clear()

    def sync(self) -> None:
        """Follow new gRPC workers, stop following departed (or moved) ones."""
        wanted = {w.worker_id: w.address for w in self.registry.workers() if w.kind == "grpc"}
        for wid, (address, task) in list(self._follows.items()):
            if wanted.get(wid) != address:
                task.cancel()
                del self._follows[wid]
                self.views.pop(wid, None)
        for wid, address in wanted.items():
            if wid not in self._follows:
                self._follows[wid] = (address, asyncio.create_task(self._follow(wid, address)))

    async def _sync_loop(self) -> None:
        while True:
            try:
                self.sync()
            except Exception:
                log.exception("cache watcher sync failed")
            await asyncio.sleep(self.sync_s)

    async def _follow(self, worker_id: str, address: str) -> None:
        backoff = 0.5
        while True:
            try:
                async with aio_channel(address, self.tls) as channel:
                    stream = pb_grpc.InferenceStub(channel).WatchCache(pb.WatchCacheRequest())
                    async for update in stream:
                        self._apply(worker_id, update)
                        backoff = 0.5
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker %s does not report its cache: %s", worker_id, e.details())
                    self.views.pop(worker_id, None)
                    return
            finally:
                self.views.pop(worker_id, None)  # whatever it held is unknown until resynced
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    def _apply(self, worker_id: str, update: pb.CacheUpdate) -> None:
        self.updates += 1
        if update.snapshot:
            self.views[worker_id] = CacheView(
                update.block_size, update.model_id, update.tokenizer, set(update.stored)
            )
            return
        view = self.views.get(worker_id)
        if view is not None:
            view.apply(list(update.stored), list(update.removed), time.monotonic())
