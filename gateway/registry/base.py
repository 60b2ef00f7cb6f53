"""The registry interface shared by the embedded and Redis backends.

A registry answers "which workers are there and how loaded are they" from memory, with no
I/O on the request path: backends refresh their view in the background, and when their
source (Redis) is unreachable they keep serving the last known view. The record itself
(``WorkerInfo``) is shared with the workers, in ``serving.registry_record``.
"""

from __future__ import annotations

from typing import Protocol

from serving.registry_record import UpstreamKind, WorkerInfo, WorkerState

__all__ = ["Registry", "UpstreamKind", "WorkerInfo", "WorkerState", "ready_workers"]


class Registry(Protocol):
    """Gateway side: a live view of the pool."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def workers(self) -> list[WorkerInfo]:
        """The last known view, every worker in any state (no I/O)."""
        ...


def ready_workers(registry: Registry, model: str | None = None) -> list[WorkerInfo]:
    return [w for w in registry.workers() if w.ready and w.serves(model)]
