"""`breakwater up --autoscale`: local workers started and retired from queue depth, the
policy deploy/'s HorizontalPodAutoscaler applies to `vllm:num_requests_waiting`.

Desired workers = ceil(requests waiting across the fleet / target per worker), within
[min, max]. Up is fast: as soon as the desired count is higher, the missing workers start
at once (each warms up before it says it is ready, and only then joins the gateway's
pool). Down is slow: only after the desired count has stayed lower for the whole
stabilization window, one worker at a time, drained first (the gateway sends it nothing
new; its calls finish), then deregistered and stopped. As Kubernetes' HPA does: scale up
on the first reading, scale down on the highest reading of the window.

The gateway is driven through its admin API (the same calls an operator would make), so
this loop holds no state the gateway does not also show at `/admin/workers`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class AutoscalePolicy:
    min_workers: int = 1
    max_workers: int = 4
    target_queue: float = 4.0
    """Requests waiting per worker that the fleet is sized for."""
    scale_down_window_s: float = 60.0
    """The desired count must stay lower this long before a worker is retired."""
    interval_s: float = 1.0

    def desired(self, waiting: float) -> int:
        want = math.ceil(waiting / self.target_queue) if waiting > 0 else 0
        return max(self.min_workers, min(self.max_workers, want))


class Recommender:
    """Turns readings of the fleet's queue into a worker count (pure, for tests)."""

    def __init__(self, policy: AutoscalePolicy) -> None:
        self.policy = policy
        self._window: list[tuple[float, int]] = []

    def recommend(self, now: float, current: int, waiting: float) -> int:
        desired = self.policy.desired(waiting)
        self._window.append((now, desired))
        cutoff = now - self.policy.scale_down_window_s
        while self._window and self._window[0][0] < cutoff:
            self._window.pop(0)
        if desired > current:
            return desired
        # down: the highest recommendation of the window, and one worker at a time
        covered = self._window[0][0] <= cutoff + self.policy.interval_s
        highest = max(d for _, d in self._window)
        if covered and highest < current:
            return current - 1
        return current


Spawn = Callable[[int], Awaitable[tuple[Any, dict[str, str]]]]
"""Start worker number n; returns (handle, its READY fields: grpc, http, ...)."""
Stop = Callable[[Any], Awaitable[None]]


class Autoscaler:
    def __init__(
        self,
        policy: AutoscalePolicy,
        admin_url: str,
        admin_token: str,
        spawn: Spawn,
        stop: Stop,
        registered_by_gateway: bool = True,
    ) -> None:
        self.policy = policy
        self.admin_url = admin_url
        self._headers = {"Authorization": f"Bearer {admin_token}", "X-Operator": "autoscaler"}
        self._spawn = spawn
        self._stop = stop
        self.registered_by_gateway = registered_by_gateway
        """True: new workers join through the admin API; False: they register themselves
        (Redis) and only leave through it."""
        self.recommender = Recommender(policy)
        self.scaled: list[tuple[str, Any]] = []
        """Workers this loop started (worker id, handle), newest last: retired first."""
        self._next = 0
        self._last_shed: tuple[float, float] | None = None

    async def run(self, session: aiohttp.ClientSession, initial: int, first_index: int) -> None:
        self._next = first_index
        current = initial
        while True:
            await asyncio.sleep(self.policy.interval_s)
            try:
                workers = await self._admin(session, "GET", "/admin/workers")
            except (aiohttp.ClientError, TimeoutError):
                continue  # the gateway is busy or restarting: next reading
            waiting = self._waiting(workers, time.monotonic())
            target = self.recommender.recommend(time.monotonic(), current, waiting)
            if target > current:
                print(
                    f"autoscale: {current} -> {target} workers ({waiting:g} waiting, "
                    f"target {self.policy.target_queue:g} per worker)",
                    flush=True,
                )
                started = await asyncio.gather(
                    *(self._add(session) for _ in range(target - current)), return_exceptions=True
                )
                current += sum(1 for s in started if s is True)
            elif target < current and self.scaled:
                print(f"autoscale: {current} -> {target} workers ({waiting:g} waiting)", flush=True)
                await self._retire(session)
                current -= 1

    def _waiting(self, view: dict[str, Any], now: float) -> float:
        """Demand not being served now: the replicas' own queues, the gateway's admission
        queue, and what it shed since the last reading (by Little's law, refusals per
        second x how long a request holds a slot: the queue they would have formed). With
        the gateway shedding at its door, the replicas' queues alone stay near zero."""
        live = [w for w in view["workers"] if w.get("admin") is None]
        waiting = sum(float(w.get("stats", {}).get("queue_depth", 0)) for w in live)
        adm = view.get("admission") or {}
        processes = max(1, int(view.get("process", {}).get("processes", 1)))
        shed = float(adm.get("counts", {}).get("overloaded", 0))
        last = self._last_shed
        self._last_shed = (now, shed)
        rate = (shed - last[1]) / (now - last[0]) if last and now > last[0] else 0.0
        hold = float(adm.get("mean_hold_s", 0.0))
        return waiting + processes * (float(adm.get("queued", 0)) + max(0.0, rate) * hold)

    async def _add(self, session: aiohttp.ClientSession) -> bool:
        index = self._next
        self._next += 1
        handle, ready = await self._spawn(index)  # the worker warms up before READY
        worker_id = ready["grpc"]
        if self.registered_by_gateway:
            await self._admin(session, "POST", "/admin/upstreams", {"address": worker_id})
        self.scaled.append((worker_id, handle))
        return True

    async def _retire(self, session: aiohttp.ClientSession) -> None:
        worker_id, handle = self.scaled.pop()
        quoted = urllib.parse.quote(worker_id, safe="")
        await self._admin(session, "POST", f"/admin/workers/{quoted}/drain")
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:  # its calls finish before it leaves
            view = await self._admin(session, "GET", "/admin/workers")
            mine = [w for w in view["workers"] if w["worker_id"] == worker_id]
            if not mine or not mine[0].get("outstanding"):
                break
            await asyncio.sleep(0.2)
        if self.registered_by_gateway:
            await self._admin(session, "DELETE", f"/admin/upstreams/{quoted}")
        await self._stop(handle)  # SIGTERM: the worker drains what it still holds
        await self._admin(session, "POST", f"/admin/workers/{quoted}/undrain")

    async def _admin(
        self, session: aiohttp.ClientSession, method: str, path: str, body: Any = None
    ) -> Any:
        async with session.request(
            method,
            self.admin_url + path,
            headers=self._headers,
            data=json.dumps(body) if body is not None else None,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            resp.raise_for_status()
            return await resp.json()
