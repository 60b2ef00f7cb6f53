"""A worker's own OpenAI-compatible HTTP port (as `vllm serve` has), for use without a gateway.

It serves the shared OpenAI routes (the gateway serves the same) over a backend that calls
this worker's engine directly, so a single worker and a gateway answer exactly alike. Two
routes more, as `vllm serve` has them, for routers that probe their workers: GET /health,
and POST /tokenize (vLLM's cache-aware router asks it for a prompt's token ids). And GET
/cache/watch, the WatchCache stream as JSON lines, so a gateway that fronts this port as a
plain OpenAI upstream still scores it on what its cache holds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import ssl
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from opentelemetry.trace import SpanKind

from prompts.errors import PromptError
from prompts.tokenizer import LONG_TEXT_CHARS, prompt_chars
from proto import inference_pb2 as pb
from proto.limits import DEFAULT_LIMITS
from proto.openai_compat import OpenAIError, ParsedRequest, parse_chat, parse_completion
from serving import cache_watch as watch_wire
from serving.calls import (
    DEADLINE_EXCEEDED,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    CallInfo,
    UpstreamError,
)
from serving.framing_errors import answer_errors_in_json
from serving.openai_http import (
    TIMEOUT_HEADER,
    OpenAIRoutes,
    error_response,
    expect_continue,
    json_errors,
    json_response,
    read_body,
)
from serving.slow_clients import KEEPALIVE_TIMEOUT_S, LISTEN_BACKLOG
from serving.tracing import context_from, request_attributes
from worker.engine.errors import EngineError, InvalidRequestError
from worker.engine_factory import open_stream
from worker.grpc_service import InferenceService
from worker.grpc_service import WorkerState as State
from worker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from worker.metrics import WorkerMetrics
from worker.proto_convert import fingerprint_of, to_engine_request, to_response


class LocalBackend:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self._ids = itertools.count()

    def models(self) -> list[str]:
        return [self.service.model_name] if self.service.model_name else []

    def has_model(self, model: str) -> bool:
        return bool(model) and model == self.service.model_name

    def workers(self) -> list[dict[str, Any]]:
        s = self.service.stats()
        return [
            {
                "worker_id": s.worker_id,
                "state": s.state,
                "models": self.models(),
                "stats": {"queue_depth": s.queue_depth, "running": s.running},
            }
        ]

    def is_ready(self, model: str | None = None) -> bool:
        return self.service.state == State.SERVING

    async def generate(
        self, request: pb.GenerateRequest, timeout: float | None, info: CallInfo | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        svc = self.service
        if info is not None:
            info.attempts, info.worker_id = 1, svc.worker_id
        svc.http_generate_calls += 1
        if svc.fault():
            raise UpstreamError(svc.fault_code.name, "injected fault")
        if svc.state != State.SERVING:
            raise UpstreamError(UNAVAILABLE, f"worker is {svc.state.lower()}", 1000)
        if svc.queue_depth() >= svc.max_queue:
            raise UpstreamError(RESOURCE_EXHAUSTED, "worker queue is full", svc.pushback_ms())
        if request.model and request.model != svc.model_name:
            raise UpstreamError(
                NOT_FOUND, f"the model `{request.model}` does not exist", param="model"
            )
        # The part after the last "#" is "h" and digits here, digits alone on the gRPC port:
        # no caller's id on one port can make the other's ("http-x#0" could, from gRPC).
        engine_id = f"{request.request_id}#h{next(self._ids)}"
        # Counted from here, as the gRPC service counts it: a long prompt is tokenized in a
        # thread (seconds for megabytes), and meanwhile it is in the queue, the stats and
        # what a drain waits for.
        svc.in_flight += 1
        svc.idle.clear()
        stream = None
        try:
            try:
                stream = await open_stream(
                    svc.engine, to_engine_request(request, engine_id, fingerprint_of(svc.engine))
                )
            except InvalidRequestError as e:
                raise UpstreamError(INVALID_ARGUMENT, e.message, param=e.param) from None
            except EngineError as e:
                raise UpstreamError(UNAVAILABLE, str(e)) from None
            tokenizer = svc.engine.tokenizer if request.sampling.HasField("logprobs") else None
            loop = asyncio.get_running_loop()
            expires = None if timeout is None or math.isinf(timeout) else loop.time() + timeout
            while True:
                # The caller's deadline (X-Request-Timeout-Ms), as the gRPC service has its
                # call's: past it, the read is cancelled, which aborts the engine request,
                # and the caller hears 504, or an error event mid-stream. The timeout is
                # entered per read: one held across a yield would cancel the consumer.
                limit = asyncio.timeout_at(expires)
                try:
                    async with limit:
                        delta = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not limit.expired():
                        raise
                    raise UpstreamError(
                        DEADLINE_EXCEEDED,
                        f"the request's deadline ({TIMEOUT_HEADER}) passed on the worker",
                    ) from None
                yield to_response(delta, request.request_id, True, tokenizer)
        finally:
            if stream is not None:
                await stream.aclose()
            svc.in_flight -= 1
            if svc.in_flight == 0:
                svc.idle.set()


class WorkerRoutes(OpenAIRoutes):
    """The shared routes, in a server span per request when the worker traces, continuing
    a caller's `traceparent` header as the worker's gRPC service does its metadata."""

    usage_comments = True
    takes_prompt_ids = True

    def __init__(self, service: InferenceService) -> None:
        # No deadline of the worker's own (as vLLM's server has none): only a caller's.
        super().__init__(LocalBackend(service), default_timeout_s=math.inf)
        self.service = service

    async def _dispatch(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        deadline: float,
        info: CallInfo,
    ) -> web.StreamResponse:
        tracer = self.service.tracer
        if tracer is None:
            return await super()._dispatch(request, parsed, raw, deadline, info)
        model = parsed.request.model or self.service.model_name
        attributes = request_attributes(parsed.request, model)
        attributes["breakwater.worker_id"] = self.service.worker_id
        with tracer.start_as_current_span(
            f"generate {model}",
            context=context_from(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as span:
            response = await super()._dispatch(request, parsed, raw, deadline, info)
            span.set_attribute("http.response.status_code", response.status)
            if info.usage:
                span.set_attribute("gen_ai.usage.input_tokens", info.usage[0])
                span.set_attribute("gen_ai.usage.output_tokens", info.usage[1])
                span.set_attribute("breakwater.cached_prompt_tokens", info.usage[2])
            return response


async def health(service: InferenceService) -> web.Response:
    """GET /health as vLLM and SGLang servers answer it (routers probe it by default):
    200 with an empty body while serving, 503 otherwise (starting or draining)."""
    if service.state == State.SERVING:
        return web.Response(status=200)
    return web.Response(status=503, text=f"worker is {service.state.lower()}")


async def tokenize(service: InferenceService, request: web.Request) -> web.Response:
    """POST /tokenize as vLLM answers it: `{"count", "max_model_len", "tokens",
    "token_strs"}` for a `prompt` or a chat's `messages`, tokenized exactly as a generate
    call with the same body would be (so a router's prefix keys match the worker's cache).
    Bad input is a 400 with the same error shape as the generate routes."""
    engine = service.engine
    try:
        if service.state != State.SERVING or engine is None:
            raise OpenAIError(503, f"worker is {service.state.lower()}", "service_unavailable")
        try:  # as the generate routes read it: bounded, decompressed
            body = orjson.loads(await read_body(request, DEFAULT_LIMITS.max_body_bytes))
        except orjson.JSONDecodeError:
            raise OpenAIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        # The generate parsers validate the prompt; the model is optional here, as in vLLM,
        # and another model's name is a 404 as there.
        model = body.get("model")
        if model and model != service.model_name:
            raise OpenAIError(
                404,
                f"The model `{str(model)[:200]}` does not exist.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        body = {**body, "model": service.model_name}
        chat = "messages" in body
        parsed = (parse_chat if chat else parse_completion)(body)
        req = to_engine_request(parsed.request, "tokenize")
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
            vocab = getattr(engine.tokenizer, "vocab_size", None)  # vLLM's: it checks
            if vocab and ids and max(ids) >= vocab:  # as generate refuses them
                raise OpenAIError(
                    400, f"prompt token ids must be integers in [0, {vocab})", param="prompt"
                )
        else:
            add_generation_prompt = body.get("add_generation_prompt", True)
            if not isinstance(add_generation_prompt, bool):
                raise OpenAIError(400, "'add_generation_prompt' must be a boolean")
            args = (req.prompt, req.messages, add_generation_prompt)
            try:  # a long prompt off the event loop, as generate tokenizes it
                if prompt_chars(req.prompt, req.messages) > LONG_TEXT_CHARS:
                    ids = await asyncio.to_thread(engine.tokenizer.prompt_ids, *args)
                else:
                    ids = engine.tokenizer.prompt_ids(*args)
            except PromptError as e:
                raise OpenAIError(400, e.message, "invalid_request_error", e.param) from None
    except OpenAIError as e:
        return error_response(e)
    core = getattr(engine, "core", None)
    return json_response(
        {
            "count": len(ids),
            "max_model_len": getattr(core, "max_model_len", None),
            "tokens": ids,
            "token_strs": None,
        }
    )


async def cache_watch(service: InferenceService, request: web.Request) -> web.StreamResponse:
    """The prefix cache's block keys as WatchCache streams them, as JSON lines
    (serving.cache_watch). 501 where the engine cannot report (vLLM), as WatchCache answers
    UNIMPLEMENTED; 503 while the worker starts or drains. The stream ends when it drains."""
    feed = service.cache_feed
    if service.state != State.SERVING or (feed is not None and feed.closed):
        err = OpenAIError(503, f"worker is {service.state.lower()}", "service_unavailable")
        return error_response(err)
    if feed is None:
        err = OpenAIError(501, "this worker's engine does not report its cache", "not_implemented")
        return error_response(err)
    watches: set[asyncio.Task[Any]] = request.app[CACHE_WATCHES]
    me = asyncio.current_task()
    assert me is not None
    watches.add(me)  # a drain cancels any still open (one whose reader stopped reading)
    try:
        response = web.StreamResponse(headers={"Content-Type": watch_wire.MEDIA_TYPE})
        await response.prepare(request)
        updates = feed.watch(watch_wire.HEARTBEAT_S)
        try:
            async for update in updates:
                await response.write(watch_wire.encode(update))
        finally:
            await updates.aclose()  # its watcher leaves the feed now, not at collection
        await response.write_eof()
        return response
    finally:
        watches.discard(me)


CACHE_WATCHES = web.AppKey("cache_watches", set)
"""The app's open /cache/watch handlers."""


def end_cache_watches(runner: web.AppRunner) -> None:
    """Cancel the open cache streams, before a drain's cleanup would wait on them."""
    app = runner.app
    for task in list(app[CACHE_WATCHES]) if app is not None else ():
        task.cancel()


async def metrics_response(metrics: WorkerMetrics) -> web.Response:
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def start_http(
    service: InferenceService,
    host: str,
    port: int,
    metrics: WorkerMetrics | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> web.AppRunner:
    app = web.Application(middlewares=[json_errors])
    WorkerRoutes(service).add_to(app)
    app.router.add_get("/health", lambda _request: health(service))
    app.router.add_post(
        "/tokenize", lambda request: tokenize(service, request), expect_handler=expect_continue
    )
    app[CACHE_WATCHES] = set()
    app.router.add_get(watch_wire.PATH, lambda request: cache_watch(service, request))
    if metrics is not None:
        app.router.add_get("/metrics", lambda _request: metrics_response(metrics))
    # aiohttp's keep-alive timer also bounds how long a request head may take (slowloris)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
        # the drain already waited for requests in flight (--drain-timeout): aiohttp's 60 s,
        # twice over, held the exit past the pod's grace period
        shutdown_timeout=2.0,
        auto_decompress=False,  # read_body decompresses, bounded (serving/openai_http.py)
    )
    await runner.setup()
    answer_errors_in_json(runner)
    await web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=LISTEN_BACKLOG).start()
    return runner
