"""The cyclic collector's settings for a long-running server process, once it has started.

A full collection walks every object the collector tracks. A gateway holds about 66k of
them once its libraries are imported (aiohttp, grpc, redis, protobuf, prometheus), a
worker about 220k (torch, transformers): 17-22 ms and ~80 ms of CPU per full collection
on this machine, with the event loop (or the engine's step) stopped meanwhile. Serving
small JSON at 7k req/s, the gateway ran 12 of them in 10 s and 1,800 young collections,
7 us of CPU per request in all, and none of them freed anything (gc.get_stats:
0 collected). So, as servers that fork workers do (CPython's `gc.freeze` docs, Instagram):
what startup built is moved out of the collector's sight, and young objects are collected
after 10,000 net allocations instead of 700. In-flight requests' objects (64 connections'
worth) no longer trip it; cyclic garbage still does, as it accumulates.
`python -m loadtest.peer_bench`: GC CPU per JSON request 7.0 us -> 0.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000
"""Net allocations of tracked objects between young collections (CPython's default: 700)."""


def settle() -> None:
    """Collect what startup left over, freeze the rest, collect young objects less often.

    Call once the process is ready to serve (its imports, models and clients built); never
    in a process that is still loading, nor in a test runner's.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def heap_view() -> dict[str, object]:
    """What an operator checks: how much is frozen, how often each generation ran."""
    return {
        "frozen_objects": gc.get_freeze_count(),
        "thresholds": list(gc.get_threshold()),
        "collections": [g["collections"] for g in gc.get_stats()],
    }
