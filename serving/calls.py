"""What a caller of Generate learns besides the deltas: status codes, errors, call facts.

Status codes follow gRPC's names whatever the transport, so callers map them once: a
worker's gRPC service, its HTTP port and the gateway's upstreams all raise `UpstreamError`
with one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

UNAVAILABLE = "UNAVAILABLE"
RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL = "INTERNAL"
CANCELLED = "CANCELLED"


class UpstreamError(Exception):
    """A Generate call failed before or while streaming; `code` is one of the names above."""

    def __init__(
        self,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.param = param

    @property
    def retryable(self) -> bool:
        """Safe to try on another replica (before the first token only)."""
        return self.code in (
            UNAVAILABLE,
            RESOURCE_EXHAUSTED,
            INTERNAL,
            DEADLINE_EXCEEDED,
            CANCELLED,
        )


@dataclass
class CallInfo:
    """Filled in as a call proceeds, for response headers and load-test accounting."""

    attempts: int = 0
    worker_id: str | None = None
    first_output_at: float | None = None
    """time.monotonic() when the first output arrived (for TTFT)."""
    output_chunks: int = 0
    """Deltas (or SSE events, when relayed) sent to the client: completion tokens, roughly."""
    usage: tuple[int, int, int] | None = None
    """(prompt, completion, cached) tokens, when the upstream reported them."""
    stream_error: tuple[int, str] | None = None
    """(status, type) of the error a stream ended with after its 200 went out: the log and
    metrics count it as that failure, as the gRPC front end does; the wire keeps its 200."""
    concurrency: int = 1
    """Calls in flight on the chosen replica when this one started (cost attribution)."""
