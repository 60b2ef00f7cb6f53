"""Async test helpers shared by the gateway tests (pytest-asyncio is not used)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

DEADLINE = 20.0
"""Generous on purpose: conditions usually hold in well under a second."""


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> float:
    """Poll ``cond`` until true; return the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
