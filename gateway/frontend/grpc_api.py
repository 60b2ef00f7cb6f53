"""The gateway's gRPC front end: the same Generate contract, proxied to a worker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import grpc

from gateway.dispatch import Dispatcher
from gateway.upstream.base import UpstreamError
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc


class GatewayInference(pb_grpc.InferenceServicer):
    def __init__(self, dispatcher: Dispatcher, default_timeout_s: float) -> None:
        self.dispatcher = dispatcher
        self.default_timeout_s = default_timeout_s

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        remaining = context.time_remaining()
        timeout = min(remaining, self.default_timeout_s) if remaining else self.default_timeout_s
        stream = self.dispatcher.generate(request, timeout)
        try:
            async for resp in stream:
                yield resp
        except UpstreamError as e:
            if e.retry_after_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(e.retry_after_ms)),))
            await context.abort(grpc.StatusCode[e.code], e.message)
        finally:
            await stream.aclose()

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        workers = self.dispatcher.registry.workers()
        ready = [w for w in workers if w.ready]
        return pb.StatsResponse(
            model_id=",".join(self.dispatcher.models()),
            state="SERVING" if ready else "NOT_SERVING",
            queue_depth=int(sum(w.stats.get("queue_depth", 0) for w in ready)),
            running=int(sum(w.stats.get("running", 0) for w in ready)),
            in_flight=sum(self.dispatcher.outstanding.values()),
            kv_cache_usage=(
                sum(w.stats.get("kv_cache_usage", 0.0) for w in ready) / len(ready) if ready else 0
            ),
        )
