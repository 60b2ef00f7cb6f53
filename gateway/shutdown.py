"""Shutdown in bounded steps: a SIGTERM ends the process, whatever a step does.

A close that waits on a peer gone for good (a library's channel close, say) must not keep
a stopping gateway alive: once, one kept serving its admin port for minutes after SIGTERM
and a SIGINT. Each step runs as a task of its own and is waited on for its limit only,
however it treats cancellation (a step that swallows CancelledError would defeat
`asyncio.timeout`); one that does not finish is named in the log and left behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

log = logging.getLogger("breakwater.gateway")

DRAIN_S = 60.0
"""The default of --drain-timeout."""
STEP_S = 10.0
"""Any other shutdown step gets this long before it is passed over."""


def sibling_stop_s(drain_s: float = DRAIN_S) -> float:
    """How long to wait for a gateway process's own shutdown (its drain, then its other
    steps) before killing it."""
    return drain_s + 2 * STEP_S


Step = tuple[str, Callable[[], Awaitable[object]], float]
"""(name for the log, the close to call, seconds it may take)."""


async def run_steps(steps: Sequence[Step | list[Step]]) -> list[str]:
    """Run each step in turn (the steps of a list at once: the front doors drain together,
    not one drain after another); returns the names of those left unfinished (cancelled,
    but not awaited: they may never end, and the caller should not wait for the loop's own
    cleanup either). A step that fails is logged and the rest still run."""
    left: list[str] = []
    for entry in steps:
        group = entry if isinstance(entry, list) else [entry]
        results = await asyncio.gather(*(_run(*step) for step in group))
        left += [name for name in results if name is not None]
    return left


async def _run(name: str, step: Callable[[], Awaitable[object]], limit: float) -> str | None:
    task = asyncio.ensure_future(step())
    done, _ = await asyncio.wait({task}, timeout=limit)
    if not done:
        task.cancel()
        log.error("shutdown: %s did not stop within %g s; going on without it", name, limit)
        return name
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("shutdown: %s failed: %r", name, exc)
    return None
