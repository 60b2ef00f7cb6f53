"""The chaos runs' machine watch: a stall of the load generator's own loop is seen, and a
run without one is not called disturbed."""

from __future__ import annotations

import asyncio
import time

from loadtest.chaos import STALL_LIMIT_MS, MachineWatch, _steal_ms


def test_a_blocked_loop_is_a_disturbed_run() -> None:
    async def main() -> MachineWatch:
        watch = MachineWatch()
        probe = asyncio.get_running_loop().create_task(watch.probe())
        await asyncio.sleep(0.05)
        time.sleep(2 * STALL_LIMIT_MS / 1000)  # what a host stall does to every process
        await asyncio.sleep(0.05)
        probe.cancel()
        return watch

    watch = asyncio.run(main())
    assert watch.max_stall_ms >= 1.5 * STALL_LIMIT_MS
    assert watch.disturbed


def test_a_quiet_run_is_not_disturbed() -> None:
    watch = MachineWatch(max_stall_ms=5.0, steal_ms=10.0)
    assert not watch.disturbed
    assert watch.figures() == {"max_stall_ms": 5.0, "steal_ms": 10}


def test_steal_reads_a_count() -> None:
    assert _steal_ms() >= 0.0
