"""Where the gateway learns which workers exist: embedded (static list) or Redis (a fleet)."""

from gateway.registry.base import Registry, WorkerInfo, WorkerState

__all__ = ["Registry", "WorkerInfo", "WorkerState"]
