"""The Inference service registered so that a request gRPC cannot decode is refused as
INVALID_ARGUMENT, in words.

With the generated registration, protobuf's DecodeError in the deserializer reached the
caller as UNKNOWN ("Unexpected <class 'google.protobuf.message.DecodeError'>") and grpc
logged a traceback for each such call, so any client could fill the logs. Here the
deserializer hands the servicer an `Undecodable` instead, which each method refuses
first (`refuse_undecodable`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from proto import inference_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class Undecodable:
    """What a request's bytes were, when they were no message of its type."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _lenient(cls: Any, most: int | None = None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if most is not None and len(data) > most:
            return Undecodable(f"the request is {len(data)} bytes; at most {most} are allowed")
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(f"the request is not a valid {cls.DESCRIPTOR.name}: {e}")

    return parse


async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with INVALID_ARGUMENT if its request could not be decoded."""
    if isinstance(request, Undecodable):
        context.set_trailing_metadata((("grpc-retry-pushback-ms", "-1"),))  # never helps
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def add_inference_servicer(
    servicer: Any, server: grpc.aio.Server, max_request_bytes: int | None = None
) -> None:
    """As `inference_pb2_grpc.add_InferenceServicer_to_server`, with lenient decoding.

    A Generate request over `max_request_bytes` is refused the same way (INVALID_ARGUMENT,
    as HTTP's 413), where grpc's own limit answers RESOURCE_EXHAUSTED, the code this
    service sheds load with, and which clients retry: give the server a receive limit
    above this one (grpc's then only bounds memory)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_lenient(pb.GenerateRequest, max_request_bytes),
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Stats": grpc.unary_unary_rpc_method_handler(
            servicer.Stats,
            request_deserializer=_lenient(pb.StatsRequest),
            response_serializer=pb.StatsResponse.SerializeToString,
        ),
        "WatchCache": grpc.unary_stream_rpc_method_handler(
            servicer.WatchCache,
            request_deserializer=_lenient(pb.WatchCacheRequest),
            response_serializer=pb.CacheUpdate.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
