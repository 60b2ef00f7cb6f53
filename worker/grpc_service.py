"""The worker's gRPC face: Generate, Stats and the standard health service over an engine."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry.trace import SpanKind, Status, StatusCode

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from proto.openai_compat import OpenAIError, check_generate
from serving import cache_watch
from serving.grpc_requests import refuse_undecodable
from serving.tracing import context_from, request_attributes
from worker.cache_feed import CacheFeed
from worker.engine.errors import EngineError, InvalidRequestError
from worker.engine_factory import open_stream
from worker.proto_convert import fingerprint_of, to_engine_request, to_response

log = logging.getLogger(__name__)

SERVICE_NAME = "breakwater.v1.Inference"
VERSION = "0.1.0"


class WorkerState:
    STARTING = "STARTING"
    SERVING = "SERVING"
    DRAINING = "DRAINING"
    NOT_SERVING = "NOT_SERVING"
    """Was serving, but the engine's loop died: nothing is served until a restart."""


class InferenceService(pb_grpc.InferenceServicer):
    """Adapts one engine to the wire contract; owns admission (state, bounded queue)."""

    def __init__(
        self,
        worker_id: str,
        max_queue: int,
        fault_fail_rate: float = 0.0,
        fault_code: str = "UNAVAILABLE",
    ) -> None:
        self.worker_id = worker_id
        self.max_queue = max_queue
        self.fault_fail_rate = fault_fail_rate
        self.fault_code = grpc.StatusCode[fault_code]
        """Chaos testing: this share of calls (gRPC Generate, and requests to the OpenAI
        port) fails with `fault_code` on purpose."""
        self.generate_calls = 0
        self.http_generate_calls = 0
        """Requests to generate on the OpenAI port (relayed streams among them)."""
        self._fault_rng = random.Random(0)
        self.engine: Any = None  # set once warm; the AsyncEngine interface
        self._state = WorkerState.STARTING
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._ids = itertools.count()
        self.cache_feed: CacheFeed | None = None
        self.tracer: Any | None = None
        """OpenTelemetry tracer when tracing is on (serving.tracing)."""
        self.http_port = 0
        """The OpenAI-compatible port once it listens (0: none); Stats tells gateways."""
        self.http_tls = False

    @property
    def state(self) -> str:
        """The state set by the worker, but NOT_SERVING once a serving engine's loop has died,
        so admission, HTTP /health, Stats and the registry heartbeat stop offering it."""
        if self._state == WorkerState.SERVING and not self.engine_alive():
            return WorkerState.NOT_SERVING
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value

    def engine_alive(self) -> bool:
        """An engine without an `alive` property (a backend adapter) counts as alive."""
        return self.engine is not None and bool(getattr(self.engine, "alive", True))

    @property
    def model_name(self) -> str:
        return self.engine.model_name if self.engine is not None else ""

    def queue_depth(self) -> int:
        """Calls waiting for a batch slot. Calls in flight beyond those running were all
        counted as waiting, and the engine's running count moves only once a step: a
        burst into an idle worker (20 calls, --max-queue 8, 128 free slots) had 12
        refused as "queue full". Free slots now absorb a burst; the engine's own waiting
        count still shows requests held back for KV room."""
        if self.engine is None:
            return 0
        s = self.engine.stats()
        slots = max(s.num_requests_running, s.max_num_seqs)
        return max(0, s.num_requests_waiting, self.in_flight - slots)

    def pushback_ms(self) -> int:
        """A retry hint that grows with the backlog: roughly the time to drain it."""
        return min(5000, 100 + 10 * self.queue_depth())

    def fault(self) -> bool:
        """Chaos testing: whether this call fails on purpose (either port)."""
        return bool(self.fault_fail_rate) and self._fault_rng.random() < self.fault_fail_rate

    async def admit(self, context: grpc.aio.ServicerContext) -> None:
        self.generate_calls += 1
        if self.fault():
            await context.abort(self.fault_code, "injected fault")
        if self.state != WorkerState.SERVING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker is {self.state.lower()}")
        if self.queue_depth() >= self.max_queue:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(self.pushback_ms())),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"worker queue is full ({self.max_queue} waiting)",
            )

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        await refuse_undecodable(request, context)
        try:  # the gateway's bounds, for callers that reach this port without a gateway
            check_generate(request)
        except OpenAIError as e:
            if e.param is not None:
                context.set_trailing_metadata((("param", e.param),))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
        await self.admit(context)
        if request.model and request.model != self.model_name:
            context.set_trailing_metadata((("param", "model"),))
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served here"
            )
        request_id = request.request_id or _metadata(context, "x-request-id") or ""
        # Engine ids must be unique on this worker even when callers reuse theirs.
        engine_id = f"{request_id or 'req'}#{next(self._ids)}"
        if self.tracer is not None:
            async for resp in self._traced(request, context, engine_id, request_id):
                yield resp
            return
        async for resp in self._generate(request, context, engine_id, request_id):
            yield resp

    async def _traced(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        engine_id: str,
        request_id: str,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """`_generate` in a server span continuing the caller's trace (W3C traceparent)."""
        assert self.tracer is not None
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        attributes = request_attributes(request, request.model or self.model_name)
        attributes["breakwater.request_id"] = request_id
        attributes["breakwater.worker_id"] = self.worker_id
        # Not made current: held across the yields below, a current span's context was
        # detached in another context when grpc closed the generator ("Failed to detach
        # context" in the log); nothing in the worker hangs spans from it.
        span = self.tracer.start_span(
            f"generate {request.model or self.model_name}",
            context=context_from(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        try:
            produced = 0
            async for resp in self._generate(request, context, engine_id, request_id):
                if not produced and resp.token_ids:
                    span.add_event("first_token")
                produced += len(resp.token_ids)
                span.set_attribute("gen_ai.usage.output_tokens", produced)
                if resp.HasField("usage"):
                    span.set_attribute("gen_ai.usage.input_tokens", resp.usage.prompt_tokens)
                    span.set_attribute("gen_ai.usage.output_tokens", resp.usage.completion_tokens)
                    span.set_attribute(
                        "breakwater.cached_prompt_tokens", resp.usage.cached_prompt_tokens
                    )
                yield resp
        except Exception as e:  # as start_as_current_span records one
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise
        finally:
            span.end()

    async def _generate(
        self,
        request: pb.GenerateRequest,
        context: grpc.aio.ServicerContext,
        engine_id: str,
        request_id: str,
    ) -> AsyncIterator[pb.GenerateResponse]:
        include_usage = request.stream_options.include_usage
        self.in_flight += 1
        self.idle.clear()
        try:
            try:
                stream = await open_stream(
                    self.engine, to_engine_request(request, engine_id, fingerprint_of(self.engine))
                )
            except InvalidRequestError as e:
                if e.param:
                    context.set_trailing_metadata((("param", e.param),))
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
            except EngineError as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            tokenizer = self.engine.tokenizer if request.sampling.HasField("logprobs") else None
            async for delta in stream:
                yield to_response(delta, request_id, include_usage, tokenizer)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        await refuse_undecodable(request, context)
        return self.stats()

    async def WatchCache(
        self, request: pb.WatchCacheRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CacheUpdate]:
        await refuse_undecodable(request, context)
        if self.cache_feed is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "this worker's engine does not report its cache"
            )
        assert self.cache_feed is not None
        async for update in self.cache_feed.watch(cache_watch.HEARTBEAT_S):
            yield update

    def stats(self) -> pb.StatsResponse:
        resp = pb.StatsResponse(
            model_id=self.model_name,
            version=VERSION,
            state=self.state,
            worker_id=self.worker_id,
            max_queue=self.max_queue,
            in_flight=self.in_flight,
            queue_depth=self.queue_depth(),
            generate_calls=self.generate_calls,
            http_generate_calls=self.http_generate_calls,
            http_port=self.http_port,
            http_tls=self.http_tls,
        )
        if self.engine is not None:
            s = self.engine.stats()
            resp.running = s.num_requests_running
            resp.max_running = s.max_num_seqs
            resp.kv_cache_usage = s.kv_cache_usage
            resp.prefix_cache_hit_rate = s.prefix_cache_hit_rate
            resp.prefix_cache_queries = s.prefix_cache_queries
            resp.prefix_cache_hits = s.prefix_cache_hits
            resp.num_preemptions = s.num_preemptions
            resp.prompt_tokens_total = s.prompt_tokens_total
            resp.generation_tokens_total = s.generation_tokens_total
        return resp


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
