"""A fake Breakwater gateway for the SDK tests.

It stands in for the real gateway until that lands: a small aiohttp server on 127.0.0.1 (a
free port, its own thread and event loop) that speaks the OpenAI-compatible HTTP API with
canned answers. Tests script it per request (`fake.script(Reply(...), ...)`: statuses,
Retry-After headers, delays, streams that fail, drop or stall after N chunks, bodies that
trickle), or set the answer
to every unscripted request (`fake.default = error_reply(503)`: an outage), and read back
every request it saw (`fake.seen`), e.g. to check the X-Request-Id kept across retries.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

MODEL = "breakwater-demo-random"
PIECES = ["Hello", ",", " world"]
USAGE = {
    "prompt_tokens": 7,
    "completion_tokens": 3,
    "total_tokens": 10,
    "prompt_tokens_details": {"cached_tokens": 4},
}


@dataclass
class Reply:
    """How to answer one request; unscripted requests get the canned 200 answer."""

    status: int = 200
    body: dict[str, Any] | None = None  # replaces the canned JSON body
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering
    chunks: int | None = None  # stream: send only the first N canned chunks, then `then`
    then: Literal["done", "error", "drop", "eof"] = "done"  # eof: end without [DONE]
    gap: float = 0.0  # stream: seconds before each chunk
    drop: bool = False  # close the connection without answering at all
    stall: float = 0.0  # stream: seconds after the chunks, before `then` (silent, or trickle)
    # Seconds between the pieces of a JSON body sent a few bytes at a time, or, in a stream's
    # stall, between the bytes of a line that never ends: a server slow enough to hold the
    # call, never so slow that a read times out.
    trickle: float = 0.0
    # Stream: seconds the body stays open after `[DONE]`, a keep-alive comment every 0.1 s.
    hold: float = 0.0


def error_reply(
    status: int,
    message: str = "scripted failure",
    *,
    type: str = "server_error",
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
    retry_after_ms: float | None = None,
) -> Reply:
    """A non-2xx answer with the OpenAI error body (and Retry-After headers if given)."""
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    error = {"message": message, "type": type, "param": param, "code": code}
    return Reply(status=status, body={"error": error}, headers=headers)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any
    query: dict[str, str] = field(default_factory=dict)
    peer_port: int = 0  # the client's port: the same on a connection reused


class FakeGateway:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.default = Reply()  # the answer once the script has run out
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def script(self, *replies: Reply) -> None:
        """Answer the next requests (any route) with these, in order."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def request_ids(self) -> list[str]:
        return [s.headers.get("x-request-id", "") for s in self.seen]

    # -------------------------------------------------------------------- lifecycle

    def start(self) -> str:
        self._thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.url

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        # Short shutdown, and cancel handlers whose client left: a timed-out test must not
        # keep the fixture's teardown waiting.
        self._runner = web.AppRunner(app, shutdown_timeout=0.2, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    # -------------------------------------------------------------------- handlers

    async def _begin(self, request: web.Request) -> tuple[Reply, Any, str]:
        body = await request.json() if request.can_read_body else None
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            port = peer[1] if peer else 0
            self.seen.append(
                Seen(request.method, request.path, headers, body, dict(request.query), port)
            )
            reply = self._replies.popleft() if self._replies else self.default
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return reply, body, headers.get("x-request-id") or uuid.uuid4().hex

    async def _json(
        self, request: web.Request, reply: Reply, canned: dict[str, Any], request_id: str
    ) -> web.StreamResponse:
        headers = {"X-Request-Id": request_id, **reply.headers}
        body = reply.body if reply.body is not None else canned
        if not reply.trickle:
            return web.json_response(body, status=reply.status, headers=headers)
        response = web.StreamResponse(
            status=reply.status, headers={"Content-Type": "application/json", **headers}
        )
        await response.prepare(request)
        data = json.dumps(body).encode()
        for i in range(0, len(data), 8):
            if i:
                await asyncio.sleep(reply.trickle)
            await response.write(data[i : i + 8])
        await response.write_eof()
        return response

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError  # nothing is left to answer on

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        reply, body, rid = await self._begin(request)
        if reply.drop:
            return await self._drop(request)
        model = body.get("model", MODEL)
        if body.get("stream") and reply.status == 200 and reply.body is None:
            chunks = [
                _envelope(
                    "text_completion",
                    model,
                    [
                        {
                            "index": 0,
                            "text": p,
                            "logprobs": None,
                            "finish_reason": "stop" if i == len(PIECES) - 1 else None,
                        }
                    ],
                )
                for i, p in enumerate(PIECES)
            ]
            return await self._stream(request, reply, body, chunks, "text_completion", rid)
        canned = _envelope(
            "text_completion",
            model,
            [{"index": 0, "text": "".join(PIECES), "logprobs": None, "finish_reason": "stop"}],
            usage=USAGE,
        )
        return await self._json(request, reply, canned, rid)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        reply, body, rid = await self._begin(request)
        if reply.drop:
            return await self._drop(request)
        model = body.get("model", MODEL)
        if body.get("stream") and reply.status == 200 and reply.body is None:
            deltas = [{"role": "assistant", "content": ""}] + [{"content": p} for p in PIECES]
            chunks = [
                _envelope(
                    "chat.completion.chunk",
                    model,
                    [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}],
                )
                for d in deltas
            ]
            chunks.append(
                _envelope(
                    "chat.completion.chunk",
                    model,
                    [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                )
            )
            return await self._stream(request, reply, body, chunks, "chat.completion.chunk", rid)
        message = {"role": "assistant", "content": "".join(PIECES), "x_unknown": 1}
        canned = _envelope(
            "chat.completion",
            model,
            [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            usage=USAGE,
        )
        return await self._json(request, reply, canned, rid)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        reply, _, rid = await self._begin(request)
        if reply.drop:
            return await self._drop(request)
        model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "breakwater"}
        return await self._json(request, reply, {"object": "list", "data": [model]}, rid)

    async def _stream(
        self,
        request: web.Request,
        reply: Reply,
        body: dict[str, Any],
        chunks: list[dict[str, Any]],
        kind: str,
        request_id: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "X-Request-Id": request_id,
                **reply.headers,
            }
        )
        await response.prepare(request)
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks = [*chunks, _envelope(kind, body.get("model", MODEL), [], usage=USAGE)]
        limit = len(chunks) if reply.chunks is None else reply.chunks
        for chunk in chunks[:limit]:
            if reply.gap:
                await asyncio.sleep(reply.gap)
            await response.write(_frame(chunk))
        if reply.stall and reply.trickle:
            await response.write(b":")  # a comment line that goes on and on
            for _ in range(int(reply.stall / reply.trickle)):
                await asyncio.sleep(reply.trickle)
                await response.write(b" ")
            await response.write(b"\n\n")
        elif reply.stall:
            await asyncio.sleep(reply.stall)
        if reply.then == "drop":
            return await self._drop(request)
        if reply.then == "error":
            error = {"message": "worker died", "type": "server_error", "param": None, "code": 503}
            await response.write(_frame({"error": error}))
        elif reply.then == "done":
            await response.write(b"data: [DONE]\n\n")
            for _ in range(int(reply.hold / 0.1)):
                await asyncio.sleep(0.1)
                await response.write(b": keep-alive\n\n")
        await response.write_eof()
        return response


def _envelope(
    kind: str, model: str, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "cmpl-fake",
        "object": kind,
        "created": 1700000000,
        "model": model,
        "system_fingerprint": "fake",
        "choices": choices,
        "x_breakwater": {"worker": "w0"},  # an unknown field the client must ignore
    }
    if usage is not None:
        out["usage"] = usage
    return out


def _frame(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
