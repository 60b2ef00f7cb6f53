"""The gateway's gRPC health service (`grpc.health.v1.Health`), for gRPC probes.

Kubernetes' `grpc:` probes, Envoy's gRPC health checks and grpc_health_probe ask it; the
answer is the HTTP `/readyz`'s: SERVING while every model has a replica to route to. The
service "" covers the gateway, a model's name that model; another name is NOT_FOUND.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.dispatch import Dispatcher

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
WATCH_POLL_S = 1.0
"""How often a Watch looks again: readiness follows the registry, which has no events."""


class GatewayHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.stopping = False
        """Set when the gateway starts to stop: NOT_SERVING, so probes move traffic away."""

    def status(self, service: str) -> int | None:
        """The service's status; None for a service this gateway does not know."""
        models = self.dispatcher.models()
        if service and service not in models:
            return None
        if self.stopping:
            return NOT_SERVING
        ready = (
            self.dispatcher.is_ready(service)
            if service
            else bool(models) and all(self.dispatcher.is_ready(m) for m in models)
        )
        return SERVING if ready else NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (the protocol's SERVICE_UNKNOWN for a service
        not known, which may appear later, as a model a new worker serves)."""
        last: int | None = -1
        while True:
            status = self.status(request.service)
            status = SERVICE_UNKNOWN if status is None else status
            if status != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            await asyncio.sleep(WATCH_POLL_S)
