"""The worker's prefix cache as block keys, followed live: what WatchCache streams.

One loop drains the engine's cache events a few times a second into the set of keys the
worker holds, and fans each batch of changes out to the watchers (gateways). A watcher
starts from a snapshot of that set; one that falls behind is dropped to a fresh snapshot
rather than slowing the feed. An engine without cache events (vLLM) has no feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from prompts.block_keys import block_key
from proto import inference_pb2 as pb
from worker.proto_convert import fingerprint_of

log = logging.getLogger(__name__)

MAX_BACKLOG = 64
"""Update batches a watcher may have unread before it is resynced with a snapshot."""


_RESYNC = pb.CacheUpdate(snapshot=True)
"""Queued for a watcher whose backlog was dropped: it sends a fresh snapshot next."""

HEARTBEAT = pb.CacheUpdate()
"""An update with nothing in it, sent while the cache is still: the reader can tell a quiet
worker from one gone without a word (a lost host), and drop that one's view."""


class _Watcher:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[pb.CacheUpdate | None] = asyncio.Queue(MAX_BACKLOG)

    def resync(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_RESYNC)


class CacheFeed:
    def __init__(self, engine: Any, interval_s: float = 0.05) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.held: set[int] = set()
        self._dropped = 0
        self._watchers: set[_Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        """Closed feeds end their streams, and a watch started after that ends at once."""
        tokenizer = getattr(engine, "tokenizer", None)
        self._about = {
            "block_size": int(engine.block_size),
            "model_id": str(engine.model_name),
            "tokenizer": str(getattr(tokenizer, "source_dir", "") or ""),
            "tokenizer_fingerprint": fingerprint_of(engine),
        }

    @staticmethod
    def supported(engine: Any) -> bool:
        return hasattr(engine, "cache_events") and hasattr(engine, "cached_hashes")

    def start(self) -> None:
        # Changes before this point are in the snapshot; later ones arrive as events (an
        # event also reflected in the snapshot re-applies harmlessly, in order).
        _, self._dropped = self.engine.cache_events()
        self.held = {block_key(h) for h in self.engine.cached_hashes()}
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for w in self._watchers:
            w.resync()  # makes room
            w.queue.get_nowait()
            w.queue.put_nowait(None)

    def poll(self) -> None:
        """Apply the engine's changes since the last poll and tell every watcher."""
        events, dropped = self.engine.cache_events()
        if dropped != self._dropped:  # the engine's buffer overflowed: start over
            self._dropped = dropped
            self.held = {block_key(h) for h in self.engine.cached_hashes()}
            for w in self._watchers:
                w.resync()
            return
        if not events:
            return
        # A key changed twice in one batch (evicted, then cached again by the next request)
        # is sent once, as it stands now: a reader applies `stored` and `removed` as sets,
        # so one in both lists would be read as gone while the engine holds it.
        last: dict[int, bool] = {}
        for stored, h in events:
            last[block_key(h)] = stored
        update = pb.CacheUpdate()
        for key, stored in last.items():
            if stored:
                self.held.add(key)
                update.stored.append(key)
            else:
                self.held.discard(key)
                update.removed.append(key)
        for w in self._watchers:
            try:
                w.queue.put_nowait(update)
            except asyncio.QueueFull:
                w.resync()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.poll()
            except Exception:  # the feed is a routing hint: never take the worker down
                log.exception("cache feed poll failed")

    def snapshot(self) -> pb.CacheUpdate:
        self.poll()  # current to the engine's last step, not to the last tick
        return pb.CacheUpdate(snapshot=True, stored=sorted(self.held), **self._about)

    async def watch(self, heartbeat_s: float | None = None) -> AsyncIterator[pb.CacheUpdate]:
        """A snapshot, then each change batch, until the feed closes; HEARTBEAT after each
        `heartbeat_s` without a change, where given."""
        if self.closed:
            return
        w = _Watcher()
        self._watchers.add(w)
        try:
            yield self.snapshot()
            while True:
                try:  # not wait_for, which can drop a cancel (see gateway cache_views)
                    async with asyncio.timeout(heartbeat_s):
                        update = await w.queue.get()
                except TimeoutError:
                    yield HEARTBEAT
                    continue
                if update is None:
                    return
                yield self.snapshot() if update is _RESYNC else update
        finally:
            self._watchers.discard(w)
