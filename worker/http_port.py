"""A worker's own OpenAI-compatible HTTP port (as `vllm serve` has), for use without a gateway.

It serves the shared OpenAI routes (the gateway serves the same) over a backend that calls
this worker's engine directly, so a single worker and a gateway answer exactly alike.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from proto import inference_pb2 as pb
from serving.calls import (
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    CallInfo,
    UpstreamError,
)
from serving.openai_http import OpenAIRoutes
from worker.engine.errors import EngineError, InvalidRequestError
from worker.grpc_service import InferenceService
from worker.grpc_service import WorkerState as State
from worker.proto_convert import to_engine_request, to_response


class LocalBackend:
    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self._ids = itertools.count()

    def models(self) -> list[str]:
        return [self.service.model_name] if self.service.model_name else []

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
        if svc.state != State.SERVING:
            raise UpstreamError(UNAVAILABLE, f"worker is {svc.state.lower()}", 1000)
        if svc.queue_depth() >= svc.max_queue:
            raise UpstreamError(RESOURCE_EXHAUSTED, "worker queue is full", svc.pushback_ms())
        if request.model and request.model != svc.model_name:
            raise UpstreamError(NOT_FOUND, f"the model `{request.model}` does not exist")
        engine_id = f"http-{request.request_id}#{next(self._ids)}"
        try:
            stream = svc.engine.generate(to_engine_request(request, engine_id))
        except InvalidRequestError as e:
            raise UpstreamError(INVALID_ARGUMENT, e.message, param=e.param) from None
        except EngineError as e:
            raise UpstreamError(UNAVAILABLE, str(e)) from None
        svc.in_flight += 1
        svc.idle.clear()
        tokenizer = svc.engine.tokenizer if request.sampling.HasField("logprobs") else None
        try:
            async for delta in stream:
                yield to_response(delta, request.request_id, True, tokenizer)
        finally:
            await stream.aclose()
            svc.in_flight -= 1
            if svc.in_flight == 0:
                svc.idle.set()


async def start_http(service: InferenceService, host: str, port: int) -> web.AppRunner:
    app = web.Application()
    OpenAIRoutes(LocalBackend(service)).add_to(app)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
