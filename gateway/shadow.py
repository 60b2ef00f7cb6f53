"""Shadow traffic: mirror a share of a model's requests to another version, compare the
two answers, and never return the shadow's to the client.

A new version meets real prompts before it meets real users: the operator mirrors, say,
5% of `m-v1`'s requests to `m-v2` (admin API, `/admin/shadows/m-v1`), and reads how often
the answers agree (exact match, and a similarity ratio) in `/admin/shadows` and in the
`breakwater_shadow` metric. The mirror is sampled deterministically (every 20th request at
5%, as the traffic split is), runs beside the client's request, not after it, and is
bounded: past `max_in_flight` mirrors a sampled request is not mirrored (`dropped`), so a
slow shadow version can never hold up, or pile work behind, the primary. Mirrors skip
admission (the client's request was admitted; its copy charges nobody's quota) but use
routing, breakers and retries like any request.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import logging
from collections import Counter
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.dispatch import Dispatcher
from proto import inference_pb2 as pb
from serving.calls import UpstreamError

log = logging.getLogger(__name__)

COMPARE_CHARS = 8_192
"""Compare at most this much of each answer (difflib is quadratic in the worst case)."""
CAPTURE_BYTES = 1 << 20
"""Keep at most this much of a relayed primary answer to compare."""


class Mirror:
    """One mirrored request: the front end hands in the primary's answer when it is known."""

    __slots__ = ("answer", "raw", "size")

    def __init__(self) -> None:
        self.answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.raw: list[bytes] = []
        """A relayed primary's bytes as they passed (JSON body or SSE), up to CAPTURE_BYTES."""
        self.size = 0

    def keep(self, data: bytes) -> None:
        if self.size < CAPTURE_BYTES:
            self.raw.append(data[: CAPTURE_BYTES - self.size])
            self.size += len(data)

    def done(self, text: str | None = None) -> None:
        """The primary ended: its text (or None: it failed or the client left); with no
        text, what `keep` collected is parsed instead."""
        if self.answer.done():
            return
        if text is None and self.raw:
            text = text_of_openai(b"".join(self.raw))
        self.answer.set_result(text)


def text_of_openai(body: bytes) -> str | None:
    """The generated text of an OpenAI answer: a JSON body, or an SSE stream's events."""
    try:
        if not body.lstrip().startswith(b"data:"):
            return _choice_text(orjson.loads(body), "message")
        parts = []
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                parts.append(_choice_text(orjson.loads(line[6:]), "delta") or "")
        return "".join(parts)
    except (orjson.JSONDecodeError, TypeError, AttributeError, IndexError, KeyError):
        return None


def _choice_text(obj: Any, kind: str) -> str | None:
    choices = obj.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if "text" in choice:
        return str(choice["text"] or "")
    return str((choice.get(kind) or {}).get("content") or "")


class Shadows:
    def __init__(self, dispatcher: Dispatcher, max_in_flight: int = 16) -> None:
        self.dispatcher = dispatcher
        self.max_in_flight = max_in_flight
        self.config: dict[str, tuple[str, float]] = {}
        """model -> (shadow version, percent mirrored)."""
        self._credit: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.counts: Counter[str] = Counter()
        """mirrored, matched, mismatched, failed (the shadow), skipped (the primary failed,
        nothing to compare), dropped (too many mirrors in flight)."""
        self.similarity_sum = 0.0

    def configure(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        """The admin overrides' shadow entries: model -> {"target", "percent"}."""
        config: dict[str, tuple[str, float]] = {}
        for model, entry in entries.items():
            target, percent = entry.get("target"), entry.get("percent")
            if isinstance(target, str) and isinstance(percent, int | float) and percent > 0:
                config[model] = (target, min(100.0, float(percent)))
        self.config = config
        self._credit = {m: c for m, c in self._credit.items() if m in config}

    def mirror(self, request: pb.GenerateRequest, timeout: float) -> Mirror | None:
        """Start mirroring `request` if its model is shadowed and its turn has come."""
        entry = self.config.get(request.model)
        if entry is None:
            return None
        target, percent = entry
        credit = self._credit.get(request.model, 0.0) + percent
        if credit < 100.0:
            self._credit[request.model] = credit
            return None
        self._credit[request.model] = credit - 100.0
        if len(self._tasks) >= self.max_in_flight:
            self.counts["dropped"] += 1
            return None
        copy = pb.GenerateRequest()
        copy.CopyFrom(request)
        copy.model = target
        copy.request_id = f"{request.request_id}-shadow"
        mirror = Mirror()
        task = asyncio.get_running_loop().create_task(self._run(copy, mirror, timeout))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.counts["mirrored"] += 1
        return mirror

    async def _run(self, request: pb.GenerateRequest, mirror: Mirror, timeout: float) -> None:
        parts: list[str] = []
        try:
            async for resp in self.dispatcher.generate(request, timeout):
                parts.append(resp.text)
        except UpstreamError as e:
            self.counts["failed"] += 1
            log.info("shadow %s to %s failed: %s", request.request_id, request.model, e.message)
            return
        try:
            primary = await asyncio.wait_for(mirror.answer, timeout)
        except TimeoutError:
            primary = None
        if primary is None:
            self.counts["skipped"] += 1
            return
        shadow = "".join(parts)
        if shadow == primary:
            self.counts["matched"] += 1
            self.similarity_sum += 1.0
            return
        self.counts["mismatched"] += 1
        self.similarity_sum += await asyncio.to_thread(similarity, primary, shadow)

    def view(self) -> dict[str, Any]:
        compared = self.counts["matched"] + self.counts["mismatched"]
        return {
            "shadows": {m: {"target": t, "percent": p} for m, (t, p) in self.config.items()},
            "counts": dict(self.counts),
            "in_flight": len(self._tasks),
            "match_rate": self.counts["matched"] / compared if compared else None,
            "mean_similarity": self.similarity_sum / compared if compared else None,
        }

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def similarity(a: str, b: str) -> float:
    """0..1: how much of the two answers agrees (difflib's ratio on their first chars)."""
    return difflib.SequenceMatcher(None, a[:COMPARE_CHARS], b[:COMPARE_CHARS]).ratio()
