"""Async test helpers shared by the gateway tests (pytest-asyncio is not used)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Coroutine
from typing import Any

DEADLINE = 20.0
"""Generous on purpose: conditions usually hold in well under a second."""


RUN_LIMIT_S = 240.0
"""Under pytest-timeout's 300 s: a hung test fails here, with every task's stack to read."""


def run(coro: Coroutine[Any, Any, None], limit_s: float = RUN_LIMIT_S) -> None:
    asyncio.run(_bounded(coro, limit_s))


async def _bounded(coro: Coroutine[Any, Any, None], limit_s: float) -> None:
    main = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([main], timeout=limit_s)
    if main in done:
        return main.result()
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(file=stacks)
    main.cancel()
    raise AssertionError(f"the test's coroutine hung for {limit_s:g} s:\n{stacks.getvalue()}")


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = DEADLINE) -> float:
    """Poll ``cond`` until true; return the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start
