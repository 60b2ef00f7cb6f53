"""Calls to one worker: Breakwater gRPC workers, or any OpenAI-compatible HTTP server."""

from gateway.upstream.base import Upstream
from serving.calls import UpstreamError

__all__ = ["Upstream", "UpstreamError"]
