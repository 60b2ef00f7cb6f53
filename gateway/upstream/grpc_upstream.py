"""A Breakwater worker over gRPC (grpc.aio), with health and Stats for probes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.registry.base import WorkerInfo, WorkerState
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from serving.calls import UNAVAILABLE, UpstreamError
from serving.registry_record import openai_url
from serving.tls import ClientTLS, aio_channel
from serving.tracing import TRACEPARENT

PROBE_TIMEOUT_S = 1.0


def _pushback_ms(err: grpc.aio.AioRpcError) -> int | None:
    for k, v in err.trailing_metadata() or ():
        if k == "grpc-retry-pushback-ms":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _param(err: grpc.aio.AioRpcError) -> str | None:
    for k, v in err.trailing_metadata() or ():
        if k == "param":
            return str(v)
    return None


def to_upstream_error(err: grpc.aio.AioRpcError) -> UpstreamError:
    return UpstreamError(
        err.code().name, err.details() or err.code().name, _pushback_ms(err), _param(err)
    )


class GrpcUpstream:
    def __init__(self, worker_id: str, address: str, tls: ClientTLS | None = None) -> None:
        self.worker_id = worker_id
        self.address = address
        self.channel = aio_channel(
            address,
            tls,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.max_receive_message_length", 64 << 20),
                # Our own retries are budgeted by the gateway; gRPC's would be unbudgeted.
                ("grpc.enable_retries", 0),
            ],
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def generate(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        metadata: tuple[tuple[str, str], ...] = (
            (("x-request-id", request.request_id),) if request.request_id else ()
        )
        if traceparent := TRACEPARENT.get():
            metadata += (("traceparent", traceparent),)
        call = self.stub.Generate(request, timeout=timeout, metadata=metadata or None)
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as e:
            raise to_upstream_error(e) from None
        finally:
            call.cancel()

    async def probe(self, info: WorkerInfo) -> WorkerInfo:
        try:
            h = await self.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_S
            )
            s = await self.stub.Stats(pb.StatsRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            info.state = WorkerState.NOT_SERVING
            info.stats["last_error"] = 1.0
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UpstreamError(UNAVAILABLE, str(e)) from None
            return info
        serving = h.status == health_pb2.HealthCheckResponse.SERVING
        info.state = WorkerState.SERVING if serving else WorkerState(s.state or "NOT_SERVING")
        if not serving and info.state == WorkerState.SERVING:
            info.state = WorkerState.NOT_SERVING
        info.models = [s.model_id] if s.model_id else info.models
        info.version = s.version or info.version
        info.stats = {
            "queue_depth": s.queue_depth,
            "running": s.running,
            "max_running": s.max_running,
            "in_flight": s.in_flight,
            "kv_cache_usage": s.kv_cache_usage,
            "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
        }
        info.openai_url = openai_url(self.address, s.http_port, s.http_tls) if s.http_port else ""
        info.updated_at = time.time()
        return info

    async def close(self) -> None:
        await self.channel.close(grace=None)
