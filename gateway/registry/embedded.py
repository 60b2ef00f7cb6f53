"""A static worker list with active health checks: a single gateway, no other process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.registry.base import WorkerInfo, WorkerState
from gateway.registry.specs import parse_worker_spec
from gateway.upstream.base import Upstream

log = logging.getLogger(__name__)


class EmbeddedRegistry:
    def __init__(
        self,
        specs: list[str],
        upstream_for: Callable[[WorkerInfo], Upstream],
        interval_s: float = 1.0,
    ) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self.specs: dict[str, str] = {}
        """worker id -> the spec it was given as."""
        self._upstream_for = upstream_for
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._logged: dict[str, WorkerState] = {}
        """The state last logged per worker: the dispatcher also marks one NOT_SERVING on
        a failed call, which a probe's before-and-after took for a recovery each time."""
        self.set_specs({parse_worker_spec(spec)[1]: spec for spec in specs})

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def set_specs(self, specs: dict[str, str]) -> None:
        """Replace the list (worker id -> spec). Unchanged workers keep their health state;
        a new one is probed at once, so it takes traffic as soon as it answers."""
        workers: dict[str, WorkerInfo] = {}
        for worker_id, spec in specs.items():
            kind, address = parse_worker_spec(spec)
            old = self._workers.get(worker_id)
            if old is not None and (old.address, old.kind) == (address, kind):
                workers[worker_id] = old
                continue
            workers[worker_id] = info = WorkerInfo(worker_id=worker_id, address=address, kind=kind)
            if self._task is not None:  # started: don't wait for the next round
                probe = asyncio.get_running_loop().create_task(self._probe(info))
                self._probes.add(probe)
                probe.add_done_callback(self._probes.discard)
        self._workers = workers
        self.specs = dict(specs)

    async def _probe(self, info: WorkerInfo) -> None:
        try:
            await self._upstream_for(info).probe(info)
        except Exception as e:  # a probe must never kill the loop
            log.debug("probe of %s failed: %s", info.address, e)
        before = self._logged.get(info.worker_id, WorkerState.STARTING)
        if info.state != before:  # an unreachable --worker said nothing in the log
            self._logged[info.worker_id] = info.state
            serving = info.state == WorkerState.SERVING
            log.log(
                logging.INFO if serving else logging.WARNING,
                "worker %s: %s -> %s%s",
                info.address,
                before,
                info.state,
                "" if serving else " (not routed to until it answers health checks)",
            )

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(w) for w in self.workers()))

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.interval_s)

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        for task in [self._task, *self._probes]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
