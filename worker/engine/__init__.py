"""Paged-KV, continuous-batching inference engine.

The engine knows no network and no wire format: a worker server adapts it.
"""

from worker.engine.async_engine import AsyncEngine
from worker.engine.config import EngineConfig
from worker.engine.errors import EngineError, InvalidRequestError
from worker.engine.outputs import Delta, EngineStats, Usage
from worker.engine.request import GenerateRequest, SamplingParams

__all__ = [
    "AsyncEngine",
    "Delta",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "GenerateRequest",
    "InvalidRequestError",
    "SamplingParams",
    "Usage",
]
