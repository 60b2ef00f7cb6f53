"""The worker's cache feed against a real (sim) engine: snapshot, deltas and resyncs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from prompts.block_keys import block_key
from worker.backends.sim import build_sim_engine
from worker.cache_feed import MAX_BACKLOG, CacheFeed
from worker.engine import GenerateRequest, SamplingParams
from worker.engine.config import EngineConfig

CONFIG = EngineConfig(model="", served_model_name="sim", max_model_len=1024)


def truth(engine) -> set[int]:  # type: ignore[no-untyped-def]
    return {block_key(h) for h in engine.cached_hashes()}


@contextlib.asynccontextmanager
async def running(interval_s: float) -> AsyncIterator[tuple[Any, CacheFeed]]:
    """A sim engine with 1,024 KV tokens and its feed, polled every interval_s."""
    engine = build_sim_engine(CONFIG, "tiny", 1.0, 1024)
    feed = CacheFeed(engine, interval_s=interval_s)
    feed.start()
    try:
        yield engine, feed
    finally:
        await feed.close()
        engine.shutdown()


async def generate(engine, tag: str) -> None:  # type: ignore[no-untyped-def]
    prompt = f"[{tag}] a long enough prompt to fill several blocks of sixteen tokens " * 6
    req = GenerateRequest(tag, prompt=prompt, sampling=SamplingParams(max_tokens=2))
    async for _ in engine.generate(req):
        pass


def test_a_watcher_follows_the_engine_exactly() -> None:
    async def main() -> None:
        async with running(0.01) as (engine, feed):
            stream = feed.watch()
            first = await anext(stream)
            assert first.snapshot and first.block_size == 16 and first.model_id == "sim"
            mine = set(first.stored)
            for i in range(8):  # enough to evict the first prompts from 1,024 tokens
                await generate(engine, f"p{i}")
            feed.poll()
            while len(mine) != len(truth(engine)) or mine != truth(engine):
                update = await asyncio.wait_for(anext(stream), 10)
                assert not update.snapshot
                mine |= set(update.stored)
                mine -= set(update.removed)
            assert mine == feed.held and mine
            await stream.aclose()
            assert not feed._watchers

    asyncio.run(main())


def test_a_watcher_that_stops_reading_is_resynced_not_waited_for() -> None:
    async def main() -> None:
        async with running(3600) as (engine, feed):  # polled by hand
            stream = feed.watch()
            await anext(stream)
            for i in range(MAX_BACKLOG + 5):  # more batches than the watcher may queue
                await generate(engine, f"q{i % 12}-{i}")
                feed.poll()
            update = await anext(stream)
            assert update.snapshot and set(update.stored) == truth(engine)
            await stream.aclose()

    asyncio.run(main())


def test_a_block_evicted_and_cached_again_between_polls_is_sent_as_held() -> None:
    """The engine's change log can evict a key and cache it again before the feed reads it
    (a prompt pushed out, then sent again): the update says the key is held, once, so a
    gateway applying it as sets (add `stored`, drop `removed`) still matches the engine."""

    async def main() -> None:
        async with running(3600) as (engine, feed):  # polled by hand
            stream = feed.watch()
            mine = set((await anext(stream)).stored)
            await generate(engine, "again")
            feed.poll()
            first = await anext(stream)
            mine = (mine | set(first.stored)) - set(first.removed)
            again = set(first.stored)
            for i in range(8):  # evicts every block of "again" from 1,024 tokens ...
                await generate(engine, f"r{i}")
            await generate(engine, "again")  # ... and caches them again, all in one batch
            assert again <= truth(engine)
            feed.poll()
            update = await anext(stream)
            assert again <= set(update.stored) and not again & set(update.removed)
            assert not set(update.stored) & set(update.removed)
            mine = (mine | set(update.stored)) - set(update.removed)
            assert mine == truth(engine) == feed.held
            await stream.aclose()

    asyncio.run(main())
