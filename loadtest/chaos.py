"""Chaos scenarios: the production incident script, step by step, against real processes.

    python -m loadtest.chaos <scenario>|all [--quick] [--json] [--grpc-only]

Each scenario starts its own fleet on 127.0.0.1 (sim workers, each with its OpenAI port as
`breakwater up` starts them unless --grpc-only, a gateway, Redis where it needs one),
drives bounded open-loop traffic, injects its fault, and prints one JSON object
last: {"scenario": ..., "passed": true|false, "figures": {...}}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from loadtest.fleet import (
    Proc,
    admin_json,
    free_port,
    start_gateway,
    start_sim_worker,
    wait_for,
)
from loadtest.loadgen import Schedule, Target, run_closed_loop, run_open_loop, simple_requests
from loadtest.records import RequestRecord
from loadtest.report import summarize

MODEL = "sim"


@dataclass
class Options:
    relay: bool = True
    """Workers serve their own OpenAI port too, as `breakwater up` starts them, so the
    gateway relays HTTP streams there; False (--grpc-only): every call over gRPC."""


OPTIONS = Options()


@dataclass
class Fleet:
    workers: list[Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    worker_args: list[list[str]] = field(default_factory=list)
    gateway: Proc | None = None
    extra: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.ready["http"]

    def admin(self) -> dict[str, dict[str, Any]]:
        assert self.gateway is not None
        workers = admin_json(self.gateway, "/admin/workers")["workers"]
        return {w["worker_id"]: w for w in workers}

    def worker_id(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    def routable(self, i: int) -> bool:
        w = self.admin().get(self.worker_id(i), {})
        return w.get("state") == "SERVING" and w.get("breaker", {}).get("state") != "open"

    def restart(self, i: int) -> None:
        self.workers[i].stop()  # already gone (killed, drained): closes and removes its log
        self.workers[i] = start_sim_worker(*self.worker_args[i], grpc_port=self.ports[i])


@contextmanager
def fleet(
    n: int,
    preset: str = "llama3-8b-h100",
    worker_extra: Callable[[int], list[str]] | None = None,
    gateway_args: tuple[str, ...] = (),
    redis_url: str | None = None,
) -> Iterator[Fleet]:
    f = Fleet()
    try:
        for i in range(n):
            port = free_port()
            args = ["--sim-preset", preset, *(worker_extra(i) if worker_extra else [])]
            if OPTIONS.relay:
                args += ["--http-port", "0"]
            if redis_url:
                args += ["--redis-url", redis_url, "--worker-id", f"127.0.0.1:{port}"]
            f.ports.append(port)
            f.worker_args.append(args)
        # Start in parallel: each sim worker imports torch, a few seconds on 2 cores.
        procs: list[Proc | None] = [None] * n

        def start(i: int) -> None:
            procs[i] = start_sim_worker(*f.worker_args[i], grpc_port=f.ports[i])

        threads = [threading.Thread(target=start, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(p is None for p in procs):
            raise RuntimeError("a worker failed to start")
        f.workers = [p for p in procs if p is not None]
        specs = (
            ["--redis-url", redis_url]
            if redis_url
            else [a for i in range(n) for a in ("--worker", f.worker_id(i))]
        )
        f.gateway = start_gateway(*specs, "--health-interval", "0.25", *gateway_args)
        wait_for(lambda: all(f.routable(i) for i in range(n)), timeout=30)
        yield f
    finally:
        for p in [f.gateway, *f.workers, *f.extra]:
            if p is not None:
                p.stop()


STALL_PROBE_S = 0.01
STALL_LIMIT_MS = 150.0
"""A load-generator stall past this is the machine's, not the gateway's: three unloaded
TTFTs of the overload fleet (~45 ms), so by itself it puts every request then in flight
over a 2x TTFT check."""
STEAL_LIMIT_MS = 250.0
"""CPU time the hypervisor took (all CPUs) within one run past which it is remeasured."""


def _steal_ms() -> float:
    """CPU time stolen by the hypervisor since boot, summed over CPUs (/proc/stat, in
    USER_HZ ticks of 10 ms); 0 where there is no /proc."""
    try:
        with open("/proc/stat") as fh:
            return float(fh.readline().split()[8]) * 10.0
    except (OSError, IndexError, ValueError):
        return 0.0


@dataclass
class MachineWatch:
    """What the machine, not the system under test, did during a run: the load
    generator's longest event-loop stall (a 10 ms timer's lateness) and the CPU time the
    hypervisor stole. On a shared 2-core VM a host hiccup of a second stalls every
    process at once; a latency check made through it measures the host."""

    max_stall_ms: float = 0.0
    steal_ms: float = 0.0

    @property
    def disturbed(self) -> bool:
        return self.severity > 1.0

    @property
    def severity(self) -> float:
        """The disturbance against its limits (over 1: disturbed)."""
        return max(self.max_stall_ms / STALL_LIMIT_MS, self.steal_ms / STEAL_LIMIT_MS)

    def figures(self) -> dict[str, float]:
        return {"max_stall_ms": round(self.max_stall_ms, 1), "steal_ms": round(self.steal_ms)}

    async def probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + STALL_PROBE_S
            await asyncio.sleep(STALL_PROBE_S)
            self.max_stall_ms = max(self.max_stall_ms, (loop.time() - due) * 1000)


def drive(
    url: str,
    rate: float,
    duration: float,
    max_tokens: int = 48,
    events: list[tuple[float, Callable[[], None]]] = (),  # type: ignore[assignment]
    poisson: bool = True,
    watch: MachineWatch | None = None,
) -> list[RequestRecord]:
    """Open-loop traffic (Poisson, or a constant arrival rate) while `events` fire; `watch`
    collects what the machine did meanwhile."""

    async def main() -> list[RequestRecord]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = [
            loop.call_at(t0 + at, lambda fn=fn: loop.run_in_executor(None, fn)) for at, fn in events
        ]
        if watch is not None:
            steal0 = _steal_ms()
            probe = loop.create_task(watch.probe())
        try:
            return await run_open_loop(
                Target(url=url, model=MODEL),
                Schedule(rate=rate, seed=1, poisson=poisson),
                simple_requests(max_tokens, prompt="chaos", ignore_eos=True),
                duration_s=duration,
                max_requests=int(rate * duration * 3),
            )
        finally:
            for t in tasks:
                t.cancel()
            if watch is not None:
                probe.cancel()
                watch.steal_ms = _steal_ms() - steal0

    return asyncio.run(main())


def lost(records: list[RequestRecord]) -> int:
    """Requests that failed without ever streaming: these must be zero."""
    return sum(1 for r in records if not r.ok and not r.aborted_after_first_token)


def lost_how(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """What each lost request ended with, so that a failed run says why."""
    return [
        {
            "at_s": round(r.start_s, 2),
            "status": r.status,
            "code": r.error_code,
            "attempts": r.attempts,
        }
        for r in records
        if not r.ok and not r.aborted_after_first_token
    ]


def result(name: str, passed: bool, figures: dict[str, Any]) -> dict[str, Any]:
    return {"scenario": name, "passed": bool(passed), "figures": figures}


def _time_until(cond: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    wait_for(cond, timeout=timeout, interval=0.02)
    return time.monotonic() - t0


# -- scenarios -------------------------------------------------------------------------------


def kill_worker(quick: bool) -> dict[str, Any]:
    duration, rate = (6.0, 10.0) if quick else (15.0, 20.0)
    with fleet(4) as f:
        eject: dict[str, float] = {}

        def kill() -> None:
            f.workers[0].signal(signal.SIGKILL)
            eject["s"] = _time_until(lambda: not f.routable(0), timeout=20)

        records = drive(f.url, rate, duration, events=[(duration / 3, kill)])
    s = summarize(records)
    figures = {
        "requests": len(records),
        "lost_requests": lost(records),
        "aborted_after_first_token": sum(r.aborted_after_first_token for r in records),
        "time_to_eject_s": round(eject.get("s", float("inf")), 3),
        "ttft_p99_ms": s["ttft_ms"]["p99"],
    }
    return result(
        "kill-worker", figures["lost_requests"] == 0 and figures["time_to_eject_s"] < 2.0, figures
    )


def hang_worker(quick: bool) -> dict[str, Any]:
    ttft_timeout = 1.0
    duration, rate = (8.0, 8.0) if quick else (16.0, 15.0)
    with fleet(4, gateway_args=("--ttft-timeout", str(ttft_timeout), "--idle-timeout", "1.0")) as f:
        times: dict[str, float] = {}

        def hang() -> None:
            f.workers[0].signal(signal.SIGSTOP)
            times["eject"] = _time_until(lambda: not f.routable(0), timeout=20)

        def resume() -> None:
            f.workers[0].signal(signal.SIGCONT)
            times["readmit"] = _time_until(lambda: f.routable(0), timeout=60)

        records = drive(
            f.url, rate, duration, events=[(duration * 0.25, hang), (duration * 0.6, resume)]
        )
        if "readmit" not in times:
            times["readmit"] = _time_until(lambda: f.routable(0), timeout=60) + duration * 0.4
    s = summarize(records)
    worst_ttft = max((r.ttft_s for r in records if r.ttft_s is not None), default=0.0)
    figures = {
        "requests": len(records),
        "lost_requests": lost(records),
        "aborted_after_first_token": sum(r.aborted_after_first_token for r in records),
        "max_ttft_ms": round(worst_ttft * 1000, 1),
        "time_to_eject_s": round(times.get("eject", float("inf")), 3),
        "time_to_readmit_s": round(times["readmit"], 3),
        "ttft_p99_ms": s["ttft_ms"]["p99"],
    }
    # Nothing waits longer than the TTFT timeout plus one retry (a normal attempt: < 1 s).
    passed = lost(records) == 0 and worst_ttft <= ttft_timeout + 1.0
    return result("hang-worker", passed, figures)


def slow_worker(quick: bool) -> dict[str, Any]:
    duration, rate = (6.0, 10.0) if quick else (15.0, 20.0)
    with fleet(4, worker_extra=lambda i: ["--sim-speed", "0.2"] if i == 0 else []) as f:
        records = drive(f.url, rate, duration)
        slow_id = f.worker_id(0)
        ejected = f.admin()[slow_id]["breaker"].get("times_ejected", 0)
    s = summarize(records)
    share = sum(1 for r in records if r.worker == slow_id) / max(1, len(records))
    figures = {
        "requests": len(records),
        "lost_requests": lost(records),
        "slow_worker_share": round(share, 3),
        "slow_worker_ejections": ejected,
        "ttft_p99_ms": s["ttft_ms"]["p99"],
    }
    return result("slow-worker", lost(records) == 0 and (share < 0.25 or ejected > 0), figures)


def rolling_restart(quick: bool) -> dict[str, Any]:
    n = 3
    duration, rate = (12.0, 8.0) if quick else (24.0, 15.0)
    with fleet(n) as f:

        def roll() -> None:
            for i in range(n):
                f.workers[i].stop(60)  # SIGTERM: drains, then exits
                f.restart(i)
                wait_for(lambda i=i: f.routable(i), timeout=30)

        records = drive(f.url, rate, duration, events=[(1.0, roll)])
    figures = {
        "requests": len(records),
        "lost_requests": lost(records),
        "lost": lost_how(records),
        "aborted_after_first_token": sum(r.aborted_after_first_token for r in records),
    }
    return result(
        "rolling-restart",
        figures["lost_requests"] == 0 and figures["aborted_after_first_token"] == 0,
        figures,
    )


def retry_storm(quick: bool) -> dict[str, Any]:
    """Every worker fails every call; 50 SDK clients keep asking. Load must not multiply."""
    from breakwater.client import AsyncClient
    from breakwater.errors import APIError

    clients_n, duration = (50, 4.0) if quick else (50, 10.0)
    with fleet(3, worker_extra=lambda i: ["--fault-fail-rate", "1.0"]) as f:
        calls = 0

        async def user(i: int) -> None:
            nonlocal calls
            async with AsyncClient(f.url, max_retries=3, timeout=10.0) as client:
                end = time.monotonic() + duration
                while time.monotonic() < end:
                    calls += 1
                    with contextlib.suppress(APIError):
                        await client.completions.create(model=MODEL, prompt=f"u{i}", max_tokens=4)
                    await asyncio.sleep(0.05)

        async def main() -> None:
            await asyncio.gather(*(user(i) for i in range(clients_n)))

        asyncio.run(main())
        attempts = sum(worker_attempts(f, i) for i in range(len(f.workers)))
    figures = {
        "client_requests": calls,
        "upstream_attempts": attempts,
        "retry_amplification": round(attempts / max(1, calls), 3),
    }
    return result("retry-storm", figures["retry_amplification"] <= 1.2, figures)


def drive_closed(url: str, users: int, duration: float, max_tokens: int) -> list[RequestRecord]:
    """`users` back-to-back users: exactly as many as the fleet runs at once saturates it
    without a queue anywhere, so their completion rate is the fleet's capacity."""
    return asyncio.run(
        run_closed_loop(
            Target(url=url, model=MODEL),
            users,
            simple_requests(max_tokens, prompt="chaos", ignore_eos=True),
            duration_s=duration,
        )
    )


def completion_rate(records: list[RequestRecord], start: float, end: float) -> float:
    """Requests completed per second within [start, end] of the run: a steady-state rate
    that cannot count the first service time's worth twice (everything admitted at once
    into an idle fleet), which made goodput exceed 1.0 when it was requests admitted per
    window."""
    done = sum(1 for r in records if r.ok and start <= r.end_s <= end)
    return done / (end - start)


UNJUDGED_P90_BOUND = 100.0
"""The admitted TTFT p90 bound, against the unloaded one, on a level the machine disturbed
(judged levels: 3x): host stalls read 6.8x and, once in CI, 31.6x; a queueing gateway reads
hundreds (881x before the adaptive limits)."""


def overload(quick: bool) -> dict[str, Any]:
    """Offered load from 0.5x to 10x capacity on the gateway's defaults (no admission
    config): the adaptive limits start what will start within the TTFT objective and refuse
    the rest at once; goodput is measured against a closed-loop capacity."""
    step = 5.0 if quick else 10.0
    levels = [0.5, 1.0, 2.0, 5.0, 10.0]
    workers, slots, max_tokens = 2, 16, 64
    with fleet(
        workers,
        preset="llama3-70b-4xh100",
        worker_extra=lambda i: ["--max-num-seqs", str(slots)],
    ) as f:
        assert f.gateway is not None
        rss0 = _rss_mb(f.gateway.pid)
        # Capacity: the fleet saturated with no queue, repeated for its spread. The first
        # service time of each run (the fleet filling) is left out of the window.
        caps = []
        for _ in range(2 if quick else 3):
            recs = drive_closed(f.url, workers * slots, step, max_tokens)
            service = statistics.median(r.e2e_s or 0.0 for r in recs if r.ok)
            caps.append(completion_rate(recs, service, step))
        capacity = statistics.mean(caps)
        # Constant arrival rate per level (k6's constant-arrival-rate): at 1x, Poisson
        # bursts with no queue would measure blocking probability, not shedding.
        runs, machine, remeasured, unjudged = {}, {}, {}, []
        for lv in levels:
            # A run the machine disturbed (a host stall, stolen CPU) is measured again, at
            # most twice; the disturbance is kept as a figure. A gateway's own stalls do not
            # stall the load generator, which runs in another process. When every try was
            # disturbed, the least disturbed is kept and its latencies are judged loosely
            # (a CI run kept a third try with a 1,038 ms host stall in it: 6.8x at the
            # p90, where the tries before it had stalls of 124 and 68 ms).
            tries = []
            for _ in range(3):
                watch = MachineWatch()
                rate = max(1.0, lv * capacity)
                recs = drive(f.url, rate, step, max_tokens, poisson=False, watch=watch)
                tries.append((recs, watch))
                if not watch.disturbed:
                    break
                remeasured.setdefault(f"{lv}x", []).append(watch.figures())
            runs[lv], watch = min(tries, key=lambda t: (t[1].disturbed, t[1].severity))
            machine[f"{lv}x"] = watch.figures()
            if watch.disturbed:
                unjudged.append(lv)
        rss1 = _rss_mb(f.gateway.pid)
    base = summarize(runs[0.5])["ttft_ms"]
    base_p99, base_p90 = base["p99"] or 1.0, base["p90"] or 1.0
    goodput, ttft_ratio, ttft_p90_ratio, rejects = {}, {}, {}, []
    for lv, recs in runs.items():
        # one service time left out at the start (at most half the run: a gateway that
        # queues makes the service time itself grow)
        service = min(step / 2, statistics.median([r.e2e_s or 0.0 for r in recs if r.ok] or [0]))
        offered = len([r for r in recs if service <= r.start_s <= step]) / (step - service)
        served = completion_rate(recs, service, step)
        # against the best saturated run: what the fleet did, not an average of it
        goodput[f"{lv}x"] = round(served / min(offered, max(caps)), 3)
        ttft = summarize(recs)["ttft_ms"]
        ttft_ratio[f"{lv}x"] = round(ttft["p99"] / base_p99, 2)
        ttft_p90_ratio[f"{lv}x"] = round(ttft["p90"] / base_p90, 2)
        rejects += [(lv, r) for r in recs if r.rejected]
    judged = [r.e2e_s * 1000 for lv, r in rejects if lv not in unjudged]
    reject_p50 = statistics.median(judged) if judged else 0.0
    with_retry_after = all(r.retry_after_s is not None for _, r in rejects)
    if 0.5 in unjudged:  # the ratios' base itself: none of them is judged closely
        unjudged = list(levels)
    judged_p90 = [ttft_p90_ratio[f"{lv}x"] for lv in runs if lv not in unjudged]
    figures = {
        "capacity_rps": round(capacity, 2),
        "capacity_runs_rps": [round(c, 2) for c in caps],
        "capacity_spread": round((max(caps) - min(caps)) / capacity, 3),
        "goodput_ratio": goodput,
        "admitted_ttft_p99_ratio": ttft_ratio,
        "admitted_ttft_p90_ratio": ttft_p90_ratio,
        "unloaded_ttft_p99_ms": round(base_p99, 1),
        "reject_p50_ms": round(reject_p50, 2),
        "rejects": len(rejects),
        "rejects_with_retry_after": with_retry_after,
        "gateway_rss_mb": [round(rss0, 1), round(rss1, 1)],
        "machine": machine,
        "remeasured": remeasured,
        "latency_unjudged": [f"{lv}x" for lv in unjudged],
    }
    # A queue shifts every admitted request's TTFT, so the check is on the p90: each level
    # admits 60-250 requests in a quick run, where the p99 is the slowest one or two, and
    # one stall of a loaded 2-core machine moved it from 1.1x to 1.6x here (a queueing
    # gateway reads hundreds of times, 881x before the adaptive limits). The p99 is kept
    # as a figure.
    checks = {
        "goodput": min(goodput[f"{lv}x"] for lv in (2.0, 5.0, 10.0)) >= 0.9,
        # 3x: at 10x the gateway answers ~250 refusals a second on a core it shares with the
        # fleet and the load generator; a clean CI run read 2.19x there (1.09x at 5x). A
        # queue reads hundreds of times.
        "admitted_ttft": max(judged_p90, default=0.0) <= 3.0
        # a level the machine disturbed still cannot hide a queue
        and max(ttft_p90_ratio.values()) <= UNJUDGED_P90_BOUND,
        # and a gateway that sheds refuses some of 10x its capacity
        "sheds": any(lv == 10.0 for lv, _ in rejects),
        "reject_p50": reject_p50 < 5.0,
        "retry_after": with_retry_after,
        "gateway_rss": rss1 - rss0 < 200,
    }
    figures["failed_checks"] = [name for name, ok in checks.items() if not ok]
    return result("overload", all(checks.values()), figures)


def overload_retry_storm(quick: bool) -> dict[str, Any]:
    """2x overload while 30% of upstream calls fail, with real retrying clients (ours and
    the openai SDK, half each): retries must not multiply the load at the gateway's door
    (requests received / logical requests) or at the workers (attempts / admitted)."""
    import openai

    from breakwater.client import AsyncClient
    from breakwater.errors import APIError

    step = 6.0 if quick else 12.0
    workers, slots, max_tokens = 2, 16, 32
    with fleet(
        workers,
        preset="llama3-70b-4xh100",
        worker_extra=lambda i: [
            *("--max-num-seqs", str(slots), "--fault-fail-rate", "0.3"),
            *("--fault-code", "INTERNAL"),  # up, but failing calls: not taken out of routing
        ],
    ) as f:
        # Capacity from the service time of a few requests alone (a closed loop would
        # spin on the fast failures): the fleet's slots over it.
        probe = drive(f.url, 2.0, 2.0, max_tokens=max_tokens, poisson=False)
        service = statistics.median([r.e2e_s or 0.0 for r in probe if r.ok])
        capacity = workers * slots / service
        before = _gateway_counts(f)
        attempts0 = sum(worker_attempts(f, i) for i in range(workers))
        outcomes: collections.Counter[str] = collections.Counter()

        async def main() -> int:
            ours = AsyncClient(f.url, max_retries=3, timeout=30.0)
            theirs = openai.AsyncOpenAI(base_url=f.url + "/v1", api_key="-", max_retries=2)
            rate = 2.0 * capacity
            tasks = []

            async def logical(i: int) -> None:
                try:
                    if i % 2:
                        await ours.completions.create(
                            model=MODEL, prompt=f"u{i}", max_tokens=max_tokens
                        )
                    else:
                        await theirs.completions.create(
                            model=MODEL, prompt=f"u{i}", max_tokens=max_tokens, timeout=30.0
                        )
                    outcomes["ok"] += 1
                except APIError as e:
                    outcomes[f"sdk {e.status}"] += 1
                except openai.APIStatusError as e:
                    outcomes[f"openai {e.status_code}"] += 1
                except openai.APIError as e:
                    outcomes[f"openai {type(e).__name__}"] += 1

            t0 = time.monotonic()
            i = 0
            while (now := time.monotonic() - t0) < step:
                while i < rate * now:  # constant arrival rate of logical requests
                    tasks.append(asyncio.create_task(logical(i)))
                    i += 1
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            await ours.close()
            await theirs.close()
            return i

        logical_n = asyncio.run(main())
        after = wait_for(lambda: _settled(f, before), timeout=30)
        attempts = sum(worker_attempts(f, i) for i in range(workers)) - attempts0
    received = after["received"] - before["received"]
    admitted = after["admitted"] - before["admitted"]
    figures = {
        "capacity_rps": round(capacity, 2),
        "logical_requests": logical_n,
        "gateway_requests": received,
        "door_amplification": round(received / max(1, logical_n), 3),
        "admitted": admitted,
        "worker_attempts": attempts,
        "worker_amplification": round(attempts / max(1, admitted), 3),
        "told_not_to_retry": after["told_not_to_retry"] - before["told_not_to_retry"],
        "outcomes": dict(outcomes),
    }
    passed = figures["door_amplification"] <= 1.2 and figures["worker_amplification"] <= 1.2
    return result("overload-retry-storm", passed, figures)


def _settled(f: Fleet, before: dict[str, float]) -> dict[str, float] | None:
    """The gateway's counts once its metrics (synced each second) stop moving."""
    first = _gateway_counts(f)
    time.sleep(1.5)
    second = _gateway_counts(f)
    return second if second == first and second != before else None


def _gateway_counts(f: Fleet) -> dict[str, float]:
    """Requests the gateway answered (any status), admitted, and refusals it said not to
    retry, from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"received": 0.0, "admitted": 0.0, "told_not_to_retry": 0.0}
    wanted = {
        ("breakwater_admission_total", "outcome", "admitted"): "admitted",
        ("breakwater_retry_advice_total", "advice", "told_not_to_retry"): "told_not_to_retry",
    }
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "breakwater_requests_total":
                out["received"] += sample.value
            for (name, label, value), key in wanted.items():
                if sample.name == name and sample.labels.get(label) == value:
                    out[key] += sample.value
    return out


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def redis_down(quick: bool) -> dict[str, Any]:
    """Kill Redis under load: serving goes on from the last view and local buckets."""
    from loadtest.redis_server import RedisServer

    duration, rate = (9.0, 10.0) if quick else (18.0, 20.0)
    with RedisServer() as redis, fleet(3, redis_url=redis.url) as f:
        kill_at = duration / 3
        records = drive(f.url, rate, duration, max_tokens=8, events=[(kill_at, redis.kill)])
    # What the gateway adds shows in the time to first token.
    before = [r.ttft_s for r in records if r.ok and r.ttft_s and r.scheduled_s < kill_at]
    after = [r.ttft_s for r in records if r.ok and r.ttft_s and r.scheduled_s >= kill_at + 0.5]
    p50_before = statistics.median(before) * 1000 if before else 0.0
    p50_after = statistics.median(after) * 1000 if after else 0.0
    figures = {
        "requests": len(records),
        "lost_requests": lost(records),
        "ttft_p50_before_ms": round(p50_before, 2),
        "ttft_p50_redis_down_ms": round(p50_after, 2),
        "added_p50_ms": round(p50_after - p50_before, 2),
    }
    return result("redis-down", lost(records) == 0 and p50_after - p50_before < 5.0, figures)


def worker_attempts(f: Fleet, i: int) -> int:
    """Calls to generate worker `i` received, on its gRPC port and its OpenAI port (where
    the gateway relays streams)."""
    import grpc

    from proto import inference_pb2 as pb
    from proto import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f.worker_id(i)) as ch:
        stats = pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10)
    return int(stats.generate_calls + stats.http_generate_calls)


SCENARIOS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "kill-worker": kill_worker,
    "hang-worker": hang_worker,
    "slow-worker": slow_worker,
    "rolling-restart": rolling_restart,
    "overload": overload,
    "retry-storm": retry_storm,
    "overload-retry-storm": overload_retry_storm,
    "redis-down": redis_down,
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=[*SCENARIOS, "all"])
    ap.add_argument("--quick", action="store_true", help="reduced durations (as in CI)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument(
        "--grpc-only",
        action="store_true",
        help="workers without their OpenAI port: every call over gRPC (by default they have "
        "one, as `breakwater up` starts them, and the gateway relays HTTP streams there)",
    )
    args = ap.parse_args(argv)
    OPTIONS.relay = not args.grpc_only
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    results = []
    for name in names:
        t0 = time.monotonic()
        res = SCENARIOS[name](args.quick)
        res["elapsed_s"] = round(time.monotonic() - t0, 1)
        results.append(res)
        print(
            f"{name:<18} {'PASS' if res['passed'] else 'FAIL'}  {res['figures']}",
            file=sys.stderr if args.json else sys.stdout,
            flush=True,
        )
    if args.json:
        out = (
            results[0]
            if len(results) == 1
            else {
                "scenario": "all",
                "passed": all(r["passed"] for r in results),
                "figures": {r["scenario"]: r["figures"] for r in results},
                "results": results,
            }
        )
        print(json.dumps(out))
    sys.exit(0 if all(r["passed"] for r in results) else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
