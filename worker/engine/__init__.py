"""Paged-KV, continuous-batching inference engine.

The engine knows no network and no wire format: a worker server adapts it. Names are
imported lazily so that light modules (config, errors) can be used without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.engine.async_engine import AsyncEngine as AsyncEngine
    from worker.engine.config import EngineConfig as EngineConfig
    from worker.engine.errors import EngineError as EngineError
    from worker.engine.errors import InvalidRequestError as InvalidRequestError
    from worker.engine.outputs import Delta as Delta
    from worker.engine.outputs import EngineStats as EngineStats
    from worker.engine.outputs import Usage as Usage
    from worker.engine.request import GenerateRequest as GenerateRequest
    from worker.engine.request import SamplingParams as SamplingParams

_EXPORTS = {
    "AsyncEngine": "worker.engine.async_engine",
    "EngineConfig": "worker.engine.config",
    "EngineError": "worker.engine.errors",
    "InvalidRequestError": "worker.engine.errors",
    "Delta": "worker.engine.outputs",
    "EngineStats": "worker.engine.outputs",
    "Usage": "worker.engine.outputs",
    "GenerateRequest": "worker.engine.request",
    "SamplingParams": "worker.engine.request",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'worker.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
