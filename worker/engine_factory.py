"""Pick the engine a worker hosts; heavy or optional engines are imported only if chosen."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from worker.settings import WorkerSettings


def build_engine(settings: WorkerSettings) -> Any:
    """An object with the AsyncEngine interface: generate() (generate_async() optional, see
    open_stream), stats(), tokenizer, shutdown()."""
    if settings.engine == "torch":
        from worker.engine import AsyncEngine

        return AsyncEngine.from_config(settings.engine_config)
    if settings.engine == "sim":
        from worker.backends.sim import build_sim_engine

        return build_sim_engine(
            settings.engine_config, settings.sim_preset, settings.sim_speed, settings.sim_kv_tokens
        )
    if settings.engine == "vllm":
        from worker.backends.vllm_engine import VLLMEngine

        return VLLMEngine(settings.engine_config)
    raise ValueError(f"unknown engine {settings.engine!r} (torch, sim or vllm)")


async def open_stream(engine: Any, request: Any) -> AsyncIterator[Any]:
    """The engine's delta stream: `generate_async` where the engine has one (a long prompt
    tokenized off the event loop, see AsyncEngine), else `generate`."""
    start = getattr(engine, "generate_async", None)
    return await start(request) if start is not None else engine.generate(request)
