"""What each Breakwater worker holds in its prefix cache, followed live over WatchCache.

Each worker in the registry gets one stream: a snapshot of its block keys, then every
change as its engine caches or evicts a block. gRPC workers send it over WatchCache; an
OpenAI upstream is asked for the same stream as JSON lines (GET /cache/watch, which a
Breakwater worker's own HTTP port serves). With these views the prefix-aware policy scores
those workers on what they hold, evictions included, instead of on what it has sent them.
A worker whose engine cannot report (UNIMPLEMENTED, 501), or an OpenAI server that is not
a Breakwater worker (404, or any other 4xx), has no view and is scored from the approximate
index as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import grpc

from gateway.registry.base import Registry
from gateway.upstream.http_client import HTTPError, HTTPPool, Response
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from serving import cache_watch
from serving.tls import ClientTLS, aio_channel

log = logging.getLogger(__name__)


@dataclass
class CacheView:
    block_size: int
    model_id: str
    tokenizer: str
    """The worker's tokenizer directory: this gateway may load it when it is local."""
    held: set[int] = field(default_factory=set)
    fingerprint: str = ""
    """The worker's tokenizer fingerprint: token ids the gateway made with a tokenizer of
    this fingerprint are forwarded to it, to be taken instead of tokenizing again."""
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
MAX_LINE_BYTES = 64 << 20
"""A snapshot line: 100k held keys are about 2 MB."""
MAX_HELD_KEYS = 2_000_000
"""Blocks a view may hold: 32M tokens of KV cache in 16-token blocks, past any one replica
(an H100 running an 8B model holds about 440k tokens); beyond it, an upstream is not
followed."""


def _stop_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and the cancel was swallowed below
    (by a library's read or close): a follow must not outlive its cancel."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class CacheWatcher:
    """Keeps one cache stream per worker of the registry; `views` is the result."""

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
        self.on_snapshot: Callable[[CacheView], object] | None = None
        """Called with each worker's view as its snapshot arrives (the gateway loads the
        tokenizer it names)."""
        self._follows: dict[str, tuple[tuple[str, str], asyncio.Task[None]]] = {}
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
        """Follow new workers, stop following departed (or moved) ones."""
        wanted = {w.worker_id: (w.kind, w.address) for w in self.registry.workers()}
        for wid, (where, task) in list(self._follows.items()):
            if wanted.get(wid) != where:
                task.cancel()
                del self._follows[wid]
                self.views.pop(wid, None)
        for wid, (kind, address) in wanted.items():
            if wid not in self._follows:
                follow = self._follow if kind == "grpc" else self._follow_http
                task = asyncio.create_task(follow(wid, address))
                self._follows[wid] = ((kind, address), task)

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
                    while True:
                        # Not asyncio.wait_for (3.11), which dropped this task's cancel here:
                        # a gateway stopped just after starting waited 10 s for the follow,
                        # still looping on its backoff (and sync() can cancel one too).
                        async with asyncio.timeout(cache_watch.SILENCE_S):
                            update = await stream.read()
                        if update is grpc.aio.EOF:
                            break
                        self._apply(worker_id, update)
                        backoff = 0.5
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("worker %s does not report its cache: %s", worker_id, e.details())
                    self.views.pop(worker_id, None)
                    return
            except TimeoutError:
                log.info(
                    "worker %s: cache stream silent for %.0f s", worker_id, cache_watch.SILENCE_S
                )
            except _TooBig as e:
                log.warning("worker %s: not following its cache: %s", worker_id, e)
                return
            finally:
                self.views.pop(worker_id, None)  # whatever it held is unknown until resynced
            _stop_if_cancelled()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _follow_http(self, worker_id: str, base_url: str) -> None:
        try:
            url = urlsplit(base_url.rstrip("/"))
            host, port = url.hostname, url.port
        except ValueError as e:  # a port out of range, say: nothing to follow
            log.info("worker %s: cannot follow its cache at %s: %s", worker_id, base_url, e)
            return
        if not host:
            return
        context = None
        if url.scheme == "https":  # trusted as the relay to it is (OpenAIHTTPUpstream)
            context = (self.tls or ClientTLS()).ssl_context(True)
        pool = HTTPPool(host, port or (443 if context else 80), ssl=context)
        path = url.path.encode() + cache_watch.PATH.encode()
        backoff = 0.5
        try:
            while True:
                try:
                    deadline = asyncio.get_running_loop().time() + 10.0  # for the headers
                    resp = await pool.request(b"GET", path, b"", b"", deadline)
                    try:
                        media = resp.headers.get("content-type", "")
                        if _never_reports(resp.status, media):
                            log.info(
                                "worker %s does not report its cache (GET %s: %d)",
                                worker_id,
                                path.decode(),
                                resp.status,
                            )
                            return
                        if resp.status == 200:
                            await self._read_lines(worker_id, resp)
                            backoff = 0.5
                    finally:
                        resp.release()
                except _TooBig as e:
                    log.warning("worker %s: not following its cache: %s", worker_id, e)
                    return
                except (HTTPError, TimeoutError, ValueError, TypeError, KeyError) as e:
                    log.debug("cache stream of %s broke: %s", worker_id, e)
                finally:
                    self.views.pop(worker_id, None)  # unknown until resynced
                _stop_if_cancelled()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
        finally:
            await pool.close()

    async def _read_lines(self, worker_id: str, resp: Response) -> None:
        """Apply each line of a /cache/watch body until it ends. A worker writes an empty
        line every cache_watch.HEARTBEAT_S while its cache is still: cache_watch.SILENCE_S
        without a byte means a peer gone without a word (a host lost), and the stream is
        dropped."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        while chunk := await resp.read_some(loop.time() + cache_watch.SILENCE_S):
            start = len(buf)
            buf += chunk
            end = buf.rfind(b"\n", start)  # only the new bytes can end a line
            if end < 0:
                if len(buf) > MAX_LINE_BYTES:
                    raise _TooBig(f"a line over {MAX_LINE_BYTES} bytes")
                continue
            lines = bytes(buf[:end]).split(b"\n")
            del buf[: end + 1]
            for line in lines:
                if line:
                    self._apply(worker_id, cache_watch.decode(line))

    def _apply(self, worker_id: str, update: pb.CacheUpdate) -> None:
        if cache_watch.is_heartbeat(update):
            return
        self.updates += 1
        if update.snapshot:
            if update.block_size <= 0:  # nothing could be matched against it
                self.views.pop(worker_id, None)
                return
            if len(update.stored) > MAX_HELD_KEYS:
                raise _TooBig(f"a snapshot of {len(update.stored)} blocks")
            self.views[worker_id] = view = CacheView(
                update.block_size,
                update.model_id,
                update.tokenizer,
                set(update.stored),
                update.tokenizer_fingerprint,
            )
            if self.on_snapshot is not None:
                self.on_snapshot(view)
            return
        view = self.views.get(worker_id)
        if view is not None:
            view.apply(list(update.stored), list(update.removed), time.monotonic())
            if len(view.held) > MAX_HELD_KEYS:
                raise _TooBig(f"{len(view.held)} blocks held")


class _TooBig(ValueError):
    """A cache report past any real KV cache's size: not followed (it will not shrink)."""


def _never_reports(status: int, media: str) -> bool:
    """A /cache/watch answer that will not change by asking again: no such route (404), a
    worker whose engine cannot report (501), a refusal (401, 403, 405), or a 200 that is
    not a cache stream. 408, 429 and 5xx (a proxy, a worker starting or draining) may."""
    if status == 200:
        return not media.startswith(cache_watch.MEDIA_TYPE)
    return status == 501 or (400 <= status < 500 and status not in (408, 429))
