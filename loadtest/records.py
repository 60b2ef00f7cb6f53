"""What one request of a load run did: the record the generator writes and reports read."""

from __future__ import annotations

from dataclasses import dataclass

# Statuses that mean "the server refused at the door": their latency is the reject latency.
REJECT_STATUSES = frozenset({"429", "503", "RESOURCE_EXHAUSTED", "UNAVAILABLE"})


@dataclass
class RequestRecord:
    """What one request did. Times are seconds; `*_s` offsets count from the run's start."""

    index: int
    scheduled_s: float
    """When the schedule wanted it sent."""
    start_s: float = 0.0
    """When it was actually sent (start_s - scheduled_s is the generator's lateness)."""
    user: int = -1
    """Closed-loop user, -1 in open loop."""
    status: str = "ok"
    """'ok'; an HTTP status ('429'); a gRPC code name ('UNAVAILABLE'); 'stream-error' (an
    error frame or FINISH_REASON_ERROR), 'incomplete' (stream ended without [DONE]),
    'timeout' (our deadline), 'connection', 'client-error' (a bug here)."""
    error_code: str | None = None
    """The error body's code (or type), or the exception's name, when there is one."""
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    chunks: int = 0
    """Stream frames received (SSE data frames or gRPC messages)."""
    attempts: int = 1
    worker: str = ""
    aborted_after_first_token: bool = False
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def rejected(self) -> bool:
        return self.status in REJECT_STATUSES and self.ttft_s is None

    @property
    def lateness_s(self) -> float:
        return self.start_s - self.scheduled_s

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_s or 0.0)
