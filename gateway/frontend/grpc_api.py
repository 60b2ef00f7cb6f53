"""The gateway's gRPC front end: the same Generate contract, proxied to a worker."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc

from gateway.admission.admission import Admission, Ticket, estimate_request_tokens
from gateway.dispatch import Dispatcher
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from proto.openai_compat import MAX_SESSION_KEY, OpenAIError
from serving.calls import UpstreamError

# Admission answers in HTTP terms; gRPC callers get the matching status codes.
_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class GatewayInference(pb_grpc.InferenceServicer):
    def __init__(
        self, dispatcher: Dispatcher, default_timeout_s: float, admission: Admission | None = None
    ) -> None:
        self.dispatcher = dispatcher
        self.default_timeout_s = default_timeout_s
        self.admission = admission
        self.session_header = "x-session-id"
        """Metadata key of the sticky-routing key, when the request has no session_key."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        if not request.session_key:
            for key, value in context.invocation_metadata() or ():
                if key == self.session_header and isinstance(value, str):
                    request.session_key = value[:MAX_SESSION_KEY]
        remaining = context.time_remaining()
        timeout = min(remaining, self.default_timeout_s) if remaining else self.default_timeout_s
        deadline = time.monotonic() + timeout
        ticket = await self._admit(request, context, deadline)
        stream = self.dispatcher.generate(request, max(0.001, deadline - time.monotonic()))
        try:
            async for resp in stream:
                yield resp
        except UpstreamError as e:
            if e.retry_after_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(e.retry_after_ms)),))
            await context.abort(grpc.StatusCode[e.code], e.message)
        finally:
            await stream.aclose()
            if ticket is not None:
                ticket.release()

    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, deadline: float
    ) -> Ticket | None:
        if self.admission is None:
            return None
        auth = dict(context.invocation_metadata() or ()).get("authorization")
        est = estimate_request_tokens(request)
        try:
            return await self.admission.admit(
                str(auth) if auth else None, est, int(request.priority), deadline
            )
        except OpenAIError as e:
            if e.retry_after_ms is not None:
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(e.retry_after_ms)),))
            await context.abort(_GRPC_CODES.get(e.status, grpc.StatusCode.UNKNOWN), e.message)
            raise  # unreachable: abort raises

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
