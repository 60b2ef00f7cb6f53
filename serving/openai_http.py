"""OpenAI-compatible HTTP API (aiohttp) over any backend that streams Generate deltas.

The gateway serves it over its dispatcher, a worker's own HTTP port over its engine, so a
single worker and a gateway answer exactly alike. Headers are held until the first delta
arrives (the commit point), so a failure before it becomes a clean error status instead of
a broken 200 stream. A client that leaves mid-response is normal traffic, not a server
error: the upstream call is cancelled, the departure counted and logged in one line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11

from proto import inference_pb2 as pb
from proto.limits import DEFAULT_LIMITS, RequestLimits
from proto.openai_compat import (
    OpenAIError,
    ParsedRequest,
    ResponseBuilder,
    check_request_id,
    parse_chat,
    parse_completion,
    sse,
)
from proto.prompt_ids import BODY_FIELD, parse_body_field
from serving.calls import (
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    CallInfo,
    UpstreamError,
)
from serving.openapi import build_openapi
from serving.slow_clients import BODY_TIMEOUT_S, Sending, SendWatch
from serving.usage_comment import USAGE_HEADER, usage_comment

log = logging.getLogger(__name__)


class Backend(Protocol):
    def models(self) -> list[str]: ...

    def has_model(self, model: str) -> bool:
        """`model in models()`, without building the list (asked once per request)."""
        ...

    def workers(self) -> list[dict[str, Any]]: ...

    def is_ready(self, model: str | None = None) -> bool: ...

    def generate(
        self, request: pb.GenerateRequest, timeout: float | None, info: CallInfo | None = None
    ) -> AsyncIterator[pb.GenerateResponse]: ...


class Releasable(Protocol):
    def release(self, used_tokens: int | None = None) -> None: ...


def used_tokens(info: CallInfo, prompt_estimate: int | None = None) -> int | None:
    """Prompt + completion tokens an answer's usage reported; for an answer cut before its
    usage (the client left, its deadline passed, the replica died), the prompt's estimate +
    the output seen so far; None when nothing is known. A cut stream settled nothing, so a
    client that closed its streams early ran past its token quota."""
    if info.usage:
        return info.usage[0] + info.usage[1]
    if prompt_estimate is not None and info.output_chunks > 0:
        return prompt_estimate + info.output_chunks
    return None


class Admit(Protocol):
    """Admission before dispatch (tenant, quotas, queue); raises OpenAIError to refuse."""

    async def __call__(
        self, request: web.Request, body: dict[str, Any], parsed: ParsedRequest, deadline: float
    ) -> Releasable | None: ...


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


class CoalescingStreamResponse(web.StreamResponse):
    """Holds the headers back until the first body bytes, so both leave in one send (the
    class attribute aiohttp's own `Response` sets; one syscall fewer per stream)."""

    _send_headers_immediately = False


def stream_response(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """A streamed answer's response object: a CoalescingStreamResponse on aiohttp, or the
    writer of the server that parsed the request (the gateway's fast front door gives its
    requests one)."""
    make = getattr(request, "stream_response", None)
    if make is not None:
        return make(headers)  # type: ignore[no-any-return]
    return CoalescingStreamResponse(headers=headers)


def call_headers(request_id: str, info: CallInfo) -> dict[str, str]:
    return {
        "X-Request-Id": request_id,
        "x-breakwater-attempts": str(info.attempts),
        "x-breakwater-worker": info.worker_id or "",
    }


def _note_usage(info: CallInfo, usage: pb.Usage | None) -> None:
    if usage is not None:
        info.usage = (usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens)


def error_response(err: OpenAIError, request_id: str | None = None) -> web.Response:
    headers = {}
    if request_id:
        headers["X-Request-Id"] = request_id
    if err.retry_after_ms is not None:
        headers["Retry-After"] = str(max(1, -(-err.retry_after_ms // 1000)))
        headers["retry-after-ms"] = str(err.retry_after_ms)
    if err.should_retry is not None:
        headers["x-should-retry"] = "true" if err.should_retry else "false"
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"  # RFC 7235: a 401 names its scheme
    return json_response(err.body(), err.status, headers)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """aiohttp's own refusals of a request no route takes (404: no such path; 405: not
    that method) as OpenAI errors, like every other refusal of these servers: they were
    aiohttp's plain text, the only error bodies an OpenAI client could not parse."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as e:
        err = OpenAIError(
            405,
            f"{request.method} is not allowed on {request.path}; allowed: "
            + ", ".join(sorted(e.allowed_methods)),
            "invalid_request_error",
        )
        response = error_response(err)
        response.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        return response
    except web.HTTPNotFound:
        where = f"{request.method} {request.path}"
        return error_response(OpenAIError(404, f"Invalid URL ({where})", "invalid_request_error"))


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """A POST route's `expect_handler`: aiohttp's, whose refusal of an Expect other than
    100-continue was a 417 in plain text (it runs before any middleware), as OpenAI JSON."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        err = OpenAIError(417, "only 'Expect: 100-continue' is supported", "invalid_request_error")
        return error_response(err)
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # as aiohttp's: the body's size is counted from here
    return None


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model[:256]}` does not exist.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def from_upstream(e: UpstreamError) -> OpenAIError:
    if e.code == INVALID_ARGUMENT:
        return OpenAIError(400, e.message, "invalid_request_error", e.param)
    if e.code == NOT_FOUND:
        return OpenAIError(404, e.message, "invalid_request_error", "model", "model_not_found")
    if e.code in (RESOURCE_EXHAUSTED, UNAVAILABLE):
        return OpenAIError(
            503,
            e.message,
            "service_unavailable",
            None,
            "overloaded" if e.code == RESOURCE_EXHAUSTED else "unavailable",
            e.retry_after_ms or 1000,
        )
    if e.code == DEADLINE_EXCEEDED:
        return OpenAIError(504, e.message, "timeout", None, "deadline_exceeded")
    return OpenAIError(502, e.message, "upstream_error", None, e.code.lower())


def _stream_error(err: OpenAIError, info: CallInfo) -> bytes:
    """The error event a stream ends with, noted for the log and metrics."""
    info.stream_error = (err.status, err.type)
    return sse(err.body())


STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "server_error": 500,
    "upstream_error": 502,
    "service_unavailable": 503,
    "timeout": 504,
}
"""The status an error event's type stands for, where a relayed stream carried one."""


def too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"the request body is larger than the limit of {limit} bytes",
        "invalid_request_error",
        None,
        "request_too_large",
    )


async def read_body(request: web.Request, limit: int, timeout: float | None = None) -> bytes:
    """The request body, refused (413) past `limit` bytes before more is held in memory;
    a compressed one is decompressed here, to `limit` bytes too (see `decoded`).

    Read from the stream rather than with `request.read()`, so the bound is this one (a
    JSON error) whatever `client_max_size` the application was given (a text 413). A body
    still arriving when the handler starts gets `timeout` seconds in all (408 past them), so
    a client trickling it in cannot hold a handler; one already whole costs no timer.
    """
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity") and encoding not in _DECOMPRESSORS:
        raise OpenAIError(
            415,
            f"a request body in Content-Encoding {encoding!r} cannot be read here; "
            "send it as is, or in gzip or deflate",
            "invalid_request_error",
        )
    if timeout is None or request.content.is_eof():
        return decoded(await _read_body(request, limit), encoding, limit)
    try:
        async with asyncio.timeout(timeout):
            body = await _read_body(request, limit)
    except TimeoutError:
        raise OpenAIError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            "invalid_request_error",
            None,
            "request_timeout",
        ) from None
    return decoded(body, encoding, limit)


_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "x-gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": lambda: zlib.decompressobj(),
}
"""Request Content-Encodings read (the servers' own decompression is off: aiohttp's read a
1 MB gzip body of 1 GB for 2.2 s on the event loop, and drained it so after refusing it)."""


MAX_GZIP_MEMBERS = 16
"""Gzip members read from one body. Each member's end copies the rest of the body (zlib's
unused_data), so members cost the square of the body: 4 MiB of empty 20-byte members held
the event loop ~11 s. A client compresses a body as one member."""


def decoded(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decompressed as its Content-Encoding says, to at most `limit` bytes (413
    past them: the work is bounded by the limit, whatever the body expands to)."""
    if encoding in ("", "identity"):
        return body
    parts: list[bytes] = []
    size, rest = 0, body
    while True:  # gzip may hold several members, one after another
        if len(parts) == MAX_GZIP_MEMBERS:
            raise OpenAIError(
                400, f"the request body holds more than {MAX_GZIP_MEMBERS} {encoding} members"
            )
        d = _DECOMPRESSORS[encoding]()
        try:
            out = d.decompress(rest, limit + 1 - size)
        except zlib.error:
            if encoding != "deflate" or parts:
                raise OpenAIError(400, f"the request body is not valid {encoding}") from None
            d = zlib.decompressobj(-zlib.MAX_WBITS)  # deflate without its zlib wrapper
            try:
                out = d.decompress(rest, limit + 1)
            except zlib.error:
                raise OpenAIError(400, "the request body is not valid deflate") from None
        size += len(out)
        if size > limit:
            raise too_large(limit)
        if not d.eof:
            raise OpenAIError(400, f"the request body ends within its {encoding} stream")
        parts.append(out)
        rest = d.unused_data
        if not rest:
            return b"".join(parts)
        if encoding == "deflate":
            raise OpenAIError(400, "the request body has data after its deflate stream")


async def _read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None:
        if length > limit:
            raise too_large(limit)
        content = request.content
        if content.is_eof():  # the usual case: the whole body came with the head
            body = content.read_nowait(-1)
            if len(body) != length:
                raise OpenAIError(400, "the request body ended before its Content-Length")
            return body
        try:  # one await for the usual case (a length given), as request.read() costs
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise OpenAIError(400, "the request body ended before its Content-Length") from None
    parts: list[bytes] = []
    size = 0
    async for part in request.content.iter_chunked(64 * 1024):
        size += len(part)
        if size > limit:
            raise too_large(limit)
        parts.append(part)
    return b"".join(parts)


TIMEOUT_HEADER = "X-Request-Timeout-Ms"
"""A caller's overall deadline for the request, capped by the gateway's maximum."""


@dataclass
class Finished:
    """One request as it ended, for metrics and the request log (never the prompt)."""

    request_id: str
    model: str
    tenant: str | None
    status: int
    started: float
    """time.monotonic() when the request arrived."""
    ended: float
    stream: bool
    info: CallInfo
    error_type: str | None = None
    key_id: str | None = None
    """The id of the API key it came with, where the gateway knows it (never the key)."""


CORS_EXPOSED = "X-Request-Id, Retry-After, retry-after-ms, x-should-retry"
"""Response headers a browser's script may read (an OpenAI SDK reads all four)."""


class OpenAIRoutes:
    allowed_origins: frozenset[str] = frozenset()
    """Origins whose browser scripts may call these routes (CORS; "*": any). Empty: none,
    no CORS headers at all."""
    usage_comments = False
    """End a stream with its usage as an SSE comment when the caller asks (a worker's
    port, for the gateway that relays it: serving/usage_comment.py)."""
    takes_prompt_ids = False
    """Take a gateway's token ids from the body's `breakwater_prompt` (a worker's port);
    elsewhere that field is refused (proto/prompt_ids.py)."""
    relays_bodies = False
    """Bodies may go as is to OpenAI-compatible upstreams (the gateway): a feature the
    Generate contract cannot carry (ParsedRequest.unsupported) is refused only on the way
    to Generate. Elsewhere (a worker's port) it is refused at once."""

    def __init__(
        self,
        backend: Backend,
        default_timeout_s: float = 600.0,
        max_timeout_s: float = 3600.0,
        admit: Admit | None = None,
        limits: RequestLimits = DEFAULT_LIMITS,
    ) -> None:
        self.backend = backend
        self.limits = limits
        """Bounds on a request's body and fields, checked before any work is spent on it."""
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        self.cut_from = math.inf
        """When a stopping server cancels what is left in flight (monotonic): a request
        cancelled from then on was cut by its drain, not left by its client."""
        self.admit = admit
        self.client_disconnects = 0
        """Clients that left before their response was complete."""
        self.on_finished: Callable[[Finished], None] | None = None
        """Told of every request that reached a model route, once it has ended."""
        self.body_timeout_s: float | None = BODY_TIMEOUT_S
        """A request body must arrive whole within this of its head (408 past it)."""
        self.send_watch = SendWatch()
        """Closes streams whose client has stopped reading (and so their upstream calls)."""
        self._openapi: dict[bool, bytes] = {}
        """GET /openapi.json, encoded once (with and without `/metrics`)."""

    def _timeout(self, request: web.Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.default_timeout_s
        try:
            ms = float(raw)
        except ValueError:
            raise OpenAIError(400, f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
        if not ms > 0:  # also NaN, which no deadline compares with
            raise OpenAIError(400, f"{TIMEOUT_HEADER} must be positive")
        return min(ms / 1000.0, self.max_timeout_s)

    def cors(self, request: web.Request) -> dict[str, str]:
        """The CORS headers for this request's answer: none unless its Origin is allowed
        (`--allowed-origins`). Browser apps (the OpenAI JS SDK, chat UIs) could not call
        the gateway at all; vLLM allows every origin by default, this only on request."""
        if not self.allowed_origins:
            return {}
        origin = request.headers.get("Origin")
        if not origin or ("*" not in self.allowed_origins and origin not in self.allowed_origins):
            return {}
        return {
            "Access-Control-Allow-Origin": "*" if "*" in self.allowed_origins else origin,
            "Access-Control-Expose-Headers": CORS_EXPOSED,
            "Vary": "Origin",
        }

    async def preflight(self, request: web.Request) -> web.Response:
        """A browser's CORS preflight (OPTIONS): which methods and headers it may send."""
        allowed = self.cors(request)
        if not allowed:
            return error_response(OpenAIError(403, "this origin may not call the API"))
        asked = request.headers.get("Access-Control-Request-Headers", "")
        allowed |= {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": asked[:1024] or "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        }
        return web.Response(status=204, headers=allowed)

    async def _cors_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if request.method != "OPTIONS":  # every answer aiohttp sends, streams included
            response.headers.update(self.cors(request))

    def add_to(self, app: web.Application) -> None:
        if self.allowed_origins:
            app.on_response_prepare.append(self._cors_prepare)
            app.router.add_route("OPTIONS", "/v1/{path:.*}", self.preflight)
        app.router.add_post("/v1/completions", self.completions, expect_handler=expect_continue)
        app.router.add_post("/v1/chat/completions", self.chat, expect_handler=expect_continue)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.retrieve_model)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/openapi.json", self.openapi)

    async def openapi(self, request: web.Request) -> web.Response:
        """This server's OpenAPI document: its limits, and `/metrics` only when served."""
        metrics = any(r.canonical == "/metrics" for r in request.app.router.resources())
        doc = self._openapi.get(metrics)
        if doc is None:
            doc = self._openapi[metrics] = orjson.dumps(build_openapi(self.limits, metrics=metrics))
        return web.Response(body=doc, content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        models = self.backend.models()
        not_ready = [m for m in models if not self.backend.is_ready(m)]
        ok = bool(models) and not not_ready
        return json_response(
            {"ready": ok, "models": models, "not_ready": not_ready}, status=200 if ok else 503
        )

    def _check_key(self, request: web.Request) -> None:
        """Raise OpenAIError (401) for a caller without a valid key (the gateway's
        override; a worker's port takes none)."""

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)  # as OpenAI's: wherever completions need a key
        except OpenAIError as e:
            return error_response(e)
        now = int(time.time())
        return json_response(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": now, "owned_by": "breakwater"}
                    for m in self.backend.models()
                ],
            }
        )

    async def retrieve_model(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's `GET /v1/models/{model}` (`client.models.retrieve`), which clients ask
        to check a model exists: it was a 404 for a model served."""
        model = request.match_info["model"]
        try:
            self._check_key(request)
            if model not in self.backend.models():
                raise model_not_found(model)
        except OpenAIError as e:
            return error_response(e)
        return json_response(
            {"id": model, "object": "model", "created": int(time.time()), "owned_by": "breakwater"}
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_completion)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, parse_chat)

    async def _handle(
        self, request: web.Request, parse: Callable[[Any, RequestLimits], ParsedRequest]
    ) -> web.StreamResponse:
        started = time.monotonic()
        asked = request.headers.get("X-Request-Id")
        request_id = os.urandom(16).hex()  # the caller's once it is known to be fit to echo
        ticket: Releasable | None = None
        parsed: ParsedRequest | None = None
        refused: OpenAIError | None = None
        info = CallInfo()
        model, stream, status, error_type = "", False, 499, None
        try:
            if asked:
                check_request_id(asked, "X-Request-Id", self.limits)
                request_id = asked
            self._authenticate(request)  # before the body is read, decompressed or parsed
            raw = await read_body(request, self.limits.max_body_bytes, self.body_timeout_s)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:  # also invalid UTF-8 and nesting past 1024
                raise OpenAIError(400, "the request body is not valid JSON") from None
            parsed = parse(body, self.limits)
            if parsed.unsupported is not None and not self.relays_bodies:
                raise parsed.unsupported
            parsed.request.request_id = request_id
            if BODY_FIELD in body:
                if not self.takes_prompt_ids:
                    raise OpenAIError(
                        400,
                        f"'{BODY_FIELD}' is set by a Breakwater gateway for its workers, "
                        "not by clients",
                        param=BODY_FIELD,
                    )
                parsed.request.prompt_ids.CopyFrom(parse_body_field(body[BODY_FIELD]))
            model, stream = parsed.request.model, parsed.stream
            if not self.backend.has_model(model):
                raise model_not_found(model)
            deadline = started + self._timeout(request)
            if self.admit is not None:
                ticket = await self.admit(request, body, parsed, deadline)
            response = await self._dispatch(request, parsed, raw, deadline, info)
            status = response.status
            if info.stream_error is not None:  # cut after its head: a failure all the same
                status, error_type = info.stream_error
            return response
        except OpenAIError as e:
            status, error_type, refused = e.status, e.type, e
            self._judge_retry(e)
            answer = error_response(e, request_id)
            answer.headers.update(self.cors(request))
            return answer
        except asyncio.CancelledError:  # the client disconnected (handler cancellation)
            # A stream the send watch closed is cancelled here too, after its first output.
            when = "mid-stream" if stream and info.first_output_at else "before the response"
            if self._cut_by_server(request):  # the server's own drain ended it: a 503
                status, error_type = 503, "service_unavailable"
                log.info("request %s cut %s: the server stopped", request_id, when)
            else:
                self._client_left(request_id, when)
            raise
        except Exception:
            status = 500
            raise
        finally:
            if ticket is not None:
                ticket.release(used_tokens(info, self._prompt_estimate(parsed)))
            if self.on_finished is not None:
                ended = time.monotonic()
                who = ticket if ticket is not None else refused  # a refusal knows it too
                tenant = getattr(who, "tenant", None)
                done = Finished(request_id, model, tenant, status, started, ended, stream, info)
                done.error_type = error_type
                done.key_id = getattr(who, "key_id", None)
                self.on_finished(done)

    def _cut_by_server(self, request: web.Request) -> bool:
        """Was this cancelled request cut by the server's drain (see the gateway's)?"""
        return time.monotonic() >= self.cut_from

    def _judge_retry(self, e: OpenAIError) -> None:
        """Say whether the client should retry a refusal (see the gateway's override)."""

    def _authenticate(self, request: web.Request) -> None:
        """Refuse (401) a caller without a valid key from its headers alone (see the
        gateway's override): a 2 KB gzip body of a 2 MB prompt cost the event loop 37 ms
        to inflate and parse before its 401, a thousand to one."""

    def _prompt_estimate(self, parsed: ParsedRequest | None) -> int | None:
        """The prompt's size as admission estimated it (see the gateway's override)."""
        return None

    async def _dispatch(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        deadline: float,
        info: CallInfo,
    ) -> web.StreamResponse:
        """Call the backend and answer; `raw` is the body as received (for relaying)."""
        remaining = max(0.001, deadline - time.monotonic())
        stream = self.backend.generate(parsed.request, remaining, info)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise OpenAIError(502, "upstream ended without output", "upstream_error") from None
        except UpstreamError as e:
            raise from_upstream(e) from None
        info.first_output_at = info.first_output_at or time.monotonic()
        return await self._respond(request, parsed, stream, first, info)

    async def _respond(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        stream: AsyncIterator[pb.GenerateResponse],
        first: pb.GenerateResponse,
        info: CallInfo,
    ) -> web.StreamResponse:
        """Answer from deltas: OpenAI JSON built here, streamed or whole."""
        request_id = parsed.request.request_id
        builder = ResponseBuilder(parsed, request_id, parsed.request.model)
        headers = call_headers(request_id, info) | self.cors(request)
        if parsed.stream:
            return await self._stream(request, stream, first, builder, headers, info)
        return await self._whole(stream, first, builder, headers, info)

    async def _whole(
        self,
        stream: AsyncIterator[pb.GenerateResponse],
        first: pb.GenerateResponse,
        builder: ResponseBuilder,
        headers: dict[str, str],
        info: CallInfo,
    ) -> web.Response:
        request_id = headers["X-Request-Id"]
        try:
            resp = first
            while True:
                if resp.finish_reason == pb.FINISH_REASON_ERROR:
                    raise OpenAIError(500, resp.error or "generation failed", "server_error")
                builder.add(resp)
                info.output_chunks += len(resp.token_ids)
                if resp.finish_reason:
                    break
                resp = await anext(stream)
        except UpstreamError as e:
            return error_response(from_upstream(e), request_id)
        except OpenAIError as e:
            return error_response(e, request_id)
        except StopAsyncIteration:
            return error_response(
                OpenAIError(502, "upstream ended early", "upstream_error"), request_id
            )
        finally:
            await stream.aclose()
            _note_usage(info, builder.usage)
        return json_response(builder.whole(), headers=headers)

    async def _stream(
        self,
        request: web.Request,
        stream: AsyncIterator[pb.GenerateResponse],
        first: pb.GenerateResponse,
        builder: ResponseBuilder,
        headers: dict[str, str],
        info: CallInfo,
    ) -> web.StreamResponse:
        out = stream_response(
            request, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        sending = self.send_watch.start(request, headers["X-Request-Id"])
        try:
            try:
                # the headers leave with the first event; inside, so the upstream call is
                # closed whatever preparing raises
                await out.prepare(request)
                last = await self._pump(out, stream, first, builder, info, sending)
                end = sse("[DONE]")
                if self.usage_comments and info.usage and request.headers.get(USAGE_HEADER):
                    end = usage_comment(info.usage) + end
                await out.write_eof(last + end)
            finally:
                await stream.aclose()  # cancels the upstream call if it is still running
        except ConnectionError:
            self._client_left(headers["X-Request-Id"], "mid-stream")
        finally:
            self.send_watch.stop(sending)
        return out

    async def _pump(
        self,
        out: web.StreamResponse,
        stream: AsyncIterator[pb.GenerateResponse],
        first: pb.GenerateResponse,
        builder: ResponseBuilder,
        info: CallInfo,
        sending: Sending,
    ) -> bytes:
        """Write each delta's SSE events in one write, until the last delta (or an upstream
        failure), whose events are returned to go out with `[DONE]` and the end of the body.

        One send per delta and one for the end: a stream of n tokens costs the worker n
        sends, where one per event (role, content, finish, usage, [DONE], the chunked
        terminator) cost n + 4, and each of those a read and a send again in a relaying
        gateway.
        """
        try:
            resp = first
            while True:
                if resp.finish_reason == pb.FINISH_REASON_ERROR:
                    err = OpenAIError(500, resp.error or "generation failed", "server_error")
                    return _stream_error(err, info)
                data = b"".join([sse(chunk) for chunk in builder.chunks(resp)])
                info.output_chunks += len(resp.token_ids)
                if resp.finish_reason:  # the last delta carries the usage (chunks() reads
                    # it only for a client that asked; builder.usage is whole answers')
                    _note_usage(info, resp.usage if resp.HasField("usage") else None)
                    return data
                if data:
                    await out.write(data)
                sending.writes += 1
                resp = await anext(stream)
        except UpstreamError as e:
            return _stream_error(from_upstream(e), info)
        except StopAsyncIteration:
            return _stream_error(OpenAIError(502, "upstream ended early", "upstream_error"), info)

    def _client_left(self, request_id: str, when: str) -> None:
        self.client_disconnects += 1
        log.info("client went away %s (request %s)", when, request_id)
