"""The configured registry plus upstreams an operator registered at run time, minus those
deregistered (the admin API's `/admin/upstreams`, shared through the admin overrides).

Registered upstreams get the embedded registry's active health checks, whatever the
configured backend: they are the ones that cannot register themselves (an OpenAI server,
a worker outside the Redis fleet). A deregistered replica leaves routing at once; calls
already on it finish. Operators drain first when they want no call cut short.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gateway.registry.base import Registry, WorkerInfo
from gateway.registry.embedded import EmbeddedRegistry
from gateway.registry.specs import check_address
from gateway.upstream.base import Upstream


class DynamicRegistry:
    def __init__(
        self, base: Registry, upstream_for: Callable[[WorkerInfo], Upstream], interval_s: float
    ) -> None:
        self.base = base
        self.extra = EmbeddedRegistry([], upstream_for, interval_s)
        self.removed: frozenset[str] = frozenset()

    async def start(self) -> None:
        await self.base.start()
        await self.extra.start()

    async def close(self) -> None:
        await self.extra.close()
        await self.base.close()

    def workers(self) -> list[WorkerInfo]:
        if not self.removed and not self.extra.specs:  # the usual case costs nothing more
            return self.base.workers()
        # an id an operator registered is at the address given, over the fleet's own (its
        # record was routed to, and the call answered with the new address)
        removed, registered = self.removed, self.extra.specs
        out = [
            w
            for w in self.base.workers()
            if w.worker_id not in removed and w.worker_id not in registered
        ]
        out += self.extra.workers()
        return out

    def apply(self, upstreams: Mapping[str, Mapping[str, Any]]) -> None:
        """The admin overrides' upstream entries: `{"address": ...}` registers a replica
        under that id, `{"removed": true}` hides a configured one."""
        self.removed = frozenset(w for w, e in upstreams.items() if e.get("removed"))
        specs: dict[str, str] = {}
        for worker_id, entry in upstreams.items():
            try:
                specs[worker_id] = check_address(entry.get("address"))
            except ValueError:
                continue
        self.extra.set_specs(specs)
