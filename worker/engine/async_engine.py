"""Async face of the engine: `generate()` streams deltas; the step loop runs on its own thread.

The model forward releases the GIL inside torch kernels, so a server's event loop stays
responsive while the engine thread computes. Commands (add, abort) reach the thread through
a queue and are applied between steps; deltas come back through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from prompts.tokenizer import LONG_TEXT_CHARS, Tokenizer, prompt_chars
from worker.engine.config import EngineConfig
from worker.engine.engine_core import EngineCore
from worker.engine.errors import EngineDeadError, InvalidRequestError
from worker.engine.outputs import Delta, EngineStats
from worker.engine.request import GenerateRequest, Request

log = logging.getLogger(__name__)

_STOP = object()


class AsyncEngine:
    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Delta]]] = {}
        self._stats = core.stats()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(EngineCore(config))

    @property
    def model_name(self) -> str:
        return self.core.config.model_name

    @property
    def prompt_fingerprint(self) -> str:
        """Token ids a router made with this fingerprint are taken as the prompt's."""
        return self.core.tokenizer.fingerprint

    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    @property
    def block_size(self) -> int:
        return self.core.config.block_size

    def cache_events(self) -> tuple[list[tuple[bool, bytes]], int]:
        """Prefix-cache changes since the last call ((stored?, block hash)), and how many
        were dropped unread so far; callable from any thread (see BlockPool.cache_events)."""
        return self.core.kv.pool.cache_events()

    def cached_hashes(self) -> list[bytes]:
        """Every block hash in the prefix cache now."""
        return self.core.kv.pool.cached_hashes()

    @property
    def alive(self) -> bool:
        """Whether the step loop still runs: health reports NOT_SERVING once it does not."""
        return self._dead is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """Latest snapshot, published by the step thread (never stale by more than a step)."""
        return self._stats

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Validate now (raising InvalidRequestError) and return the request's delta stream.

        Closing or cancelling the iterator before it finishes aborts the request and frees its
        KV blocks.
        """
        self._admissible(request)
        return self._submit(self.core.prepare(request))

    async def generate_async(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """`generate`, with a long prompt checked and tokenized in a thread.

        Tokenizing 2 MB of text took 2.7 s here: on the event loop it stalled every other
        request's stream and the health checks, and a gateway took the worker for dead.
        A short one costs less than the thread hop, and stays on the loop.
        """
        if prompt_chars(request.prompt, request.messages) <= LONG_TEXT_CHARS:
            return self.generate(request)
        self._admissible(request)
        return self._submit(await asyncio.to_thread(self.core.prepare, request))

    def _admissible(self, request: GenerateRequest | Request) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine stopped: {self._dead}")
        if request.request_id in self._streams:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}", "request_id")

    def _submit(self, prepared: Request) -> AsyncIterator[Delta]:
        # again: the step thread may have died, or the same id come, while a thread prepared it
        self._admissible(prepared)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Delta] = asyncio.Queue()
        self._streams[prepared.request_id] = (loop, q)
        self._commands.put(("add", prepared))
        return self._stream(prepared, q)

    async def _stream(self, request: Request, q: asyncio.Queue[Delta]) -> AsyncIterator[Delta]:
        finished = False
        try:
            while True:
                delta = await q.get()
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:
                self._commands.put(("abort", request.request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop; a request submitted afterwards gets EngineDeadError at once
        instead of queuing to a thread that will never run it."""
        if self._dead is None:
            self._dead = EngineDeadError("engine shut down")
        self._commands.put(_STOP)
        self._thread.join(timeout)

    # -- step thread -------------------------------------------------------------------------

    def _apply(self, command: Any, out: list[Delta]) -> bool:
        if command is _STOP:
            return False
        kind, arg = command
        if kind == "add":
            try:
                self.core.add(arg)
            except InvalidRequestError as e:
                out.append(Delta(arg.request_id, finish_reason="error", error=e.message))
            except Exception as e:  # one request's failure, not the engine loop's end
                log.exception("adding request %s failed", arg.request_id)
                with contextlib.suppress(Exception):
                    self.core.abort(arg.request_id)
                out.append(Delta(arg.request_id, finish_reason="error", error=f"engine error: {e}"))
        elif kind == "abort":
            delta = self.core.abort(arg)
            if delta is not None:
                out.append(delta)
        return True

    def _run(self) -> None:
        running = True
        try:
            while running:
                out: list[Delta] = []
                # Block for the next command only when idle; otherwise just drain.
                if not self.core.has_work:
                    self._stats = self.core.stats()
                    running = self._apply(self._commands.get(), out)
                while running:
                    try:
                        running = self._apply(self._commands.get_nowait(), out)
                    except queue.Empty:
                        break
                if running and self.core.has_work:
                    try:
                        self.core.step(out)  # deltas made before a failure still go out
                    except Exception as e:
                        # step() has taken this step's blocks out of the prefix cache
                        log.exception("engine step failed; failing its requests")
                        for rid in list(self.core.live):
                            d = self.core.abort(rid, reason=f"engine error: {e}")
                            if d is not None:
                                out.append(d)
                self._stats = self.core.stats()
                self._deliver(out)
        except BaseException as e:  # pragma: no cover - last resort, keeps callers from hanging
            log.exception("engine loop died")
            self._dead = e
        finally:
            for rid in list(self._streams):
                self._deliver([Delta(rid, finish_reason="error", error="engine stopped")])

    def _deliver(self, deltas: list[Delta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Delta], Delta]]] = {}
        for d in deltas:
            target = self._streams.get(d.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], d))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue[Delta], Delta]]) -> None:
    for q, d in items:
        q.put_nowait(d)
