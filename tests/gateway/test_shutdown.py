"""Shutdown steps are bounded whatever a step does with cancellation."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.shutdown import run_steps


def test_a_step_that_ignores_cancellation_is_left_behind_and_the_rest_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    async def main() -> tuple[list[str], float]:
        release = asyncio.Event()

        async def stubborn() -> None:
            # swallows every cancellation (as `suppress(CancelledError)` around an await of
            # a task that never ends does), so `asyncio.timeout` alone would not bound it
            while not release.is_set():
                try:
                    await release.wait()
                except asyncio.CancelledError:
                    ran.append("cancelled")

        async def failing() -> None:
            raise RuntimeError("peer gone")

        async def fine() -> None:
            ran.append("fine")

        start = time.monotonic()
        left = await run_steps(
            [("stubborn", stubborn, 0.2), ("failing", failing, 5), ("fine", fine, 5)]
        )
        took = time.monotonic() - start
        release.set()  # lets the loop close in this test
        await asyncio.sleep(0)
        return left, took

    with caplog.at_level(logging.WARNING, "breakwater.gateway"):
        left, took = asyncio.run(main())
    assert left == ["stubborn"]
    assert took < 5  # 0.2 s, and the others at once; generous for a loaded machine
    assert "fine" in ran and "cancelled" in ran
    assert "stubborn did not stop within 0.2 s" in caplog.text
    assert "failing failed: RuntimeError('peer gone')" in caplog.text
