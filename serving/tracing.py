"""OpenTelemetry traces, gateway to worker, off unless an exporter is named.

`--trace-exporter` picks where spans go: `none` (the default: no tracer, and nothing on
the request path pays for tracing), `console`, `otlp` (needs the
opentelemetry-exporter-otlp-proto-http package; endpoint from the standard
OTEL_EXPORTER_OTLP_* variables) or `file:PATH` (one JSON line per span, what the tests
read, one file per process). Spans are exported in batches from a thread of their own
(within EXPORT_DELAY_MS), the rest at exit (`flush_all` where a process leaves by
os._exit).

Context crosses processes as W3C trace context: the gateway puts the current attempt's
`traceparent` in `TRACEPARENT`, which the upstream clients copy into gRPC metadata or an
HTTP header; a worker continues the trace from it. Spans carry the OpenTelemetry GenAI
semantic-convention attributes (`gen_ai.operation.name`, `gen_ai.request.model`,
`gen_ai.usage.input_tokens`, ...). Prompts and answers are never recorded.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import orjson

TRACEPARENT: ContextVar[str | None] = ContextVar("breakwater_traceparent", default=None)
"""The W3C traceparent an upstream call should carry (set by the gateway per attempt)."""


def request_attributes(request: Any, model: str | None = None) -> dict[str, Any]:
    """The GenAI semantic-convention attributes of a Generate request (a
    `pb.GenerateRequest`), shared by every server span: gateway and worker, HTTP and gRPC."""
    sp = request.sampling
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat" if request.HasField("chat") else "text_completion",
        "gen_ai.provider.name": "breakwater",
        "gen_ai.request.model": model or request.model,
        "breakwater.request_id": request.request_id,
    }
    if sp.HasField("max_tokens"):
        attributes["gen_ai.request.max_tokens"] = sp.max_tokens
    if sp.HasField("temperature"):
        attributes["gen_ai.request.temperature"] = sp.temperature
    if sp.HasField("top_p"):
        attributes["gen_ai.request.top_p"] = sp.top_p
    return attributes


EXPORT_DELAY_MS = 200
"""How long a finished span may wait for its batch (OpenTelemetry's default is 5 s): an
operator tailing a trace file sees a request's spans at once. The provider flushes what is
left when the process exits."""


_PROVIDERS: list[Any] = []
"""This process's tracer providers, for `flush_all`."""


def flush_all(timeout_s: float = 2.0) -> None:
    """Export the spans still batched: a process leaving by os._exit skips the exit hook
    that does it (the spans of the requests its drain cut, the ones worth reading)."""
    for provider in _PROVIDERS:
        provider.force_flush(int(timeout_s * 1000))


def make_tracer(spec: str | None, service_name: str) -> Any | None:
    """A tracer exporting to `spec`, or None for `none`/empty (tracing off)."""
    if not spec or spec == "none":
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # Spans end on the event loop; every exporter runs in the batch processor's thread. A
    # SimpleSpanProcessor exported in `span.end()` itself: with file:PATH that was open,
    # write and fsync on the loop, 1.6 ms a span here, two spans a request (and a slow
    # reader of stdout stalled the console exporter's writes the same way).
    def batched(exporter: Any) -> Any:
        return BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    _PROVIDERS.append(provider)
    if spec == "console":
        provider.add_span_processor(batched(ConsoleSpanExporter()))
    elif spec == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise SystemExit(
                "--trace-exporter otlp needs the otlp extra: pip install 'breakwater[otlp]' "
                "(or opentelemetry-exporter-otlp-proto-http)"
            ) from e
        provider.add_span_processor(batched(OTLPSpanExporter()))
    elif spec.startswith("file:"):
        provider.add_span_processor(batched(JsonLinesExporter(spec[5:])))
    else:
        raise SystemExit(exporter_problem(spec))
    return provider.get_tracer("breakwater")


def traceparent_of(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def context_from(carrier: Mapping[str, str]) -> Any:
    """The remote parent in `carrier` (a `traceparent` entry), as an OpenTelemetry context."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # HTTP header names are case-blind; the propagator looks up lower-case names.
    return TraceContextTextMapPropagator().extract(
        carrier={k.lower(): v for k, v in carrier.items()}
    )


def exporter_problem(spec: str) -> str | None:
    """What is wrong with a --trace-exporter value, checked before anything starts (an
    unwritable file was a traceback in the log for every span of every request)."""
    if not spec or spec in ("none", "console", "otlp"):  # empty: off, as make_tracer takes it
        return None
    if not spec.startswith("file:"):
        return f"--trace-exporter {spec!r}: none, console, otlp or file:PATH"
    try:
        open(spec[5:], "a").close()
    except OSError as e:
        return f"--trace-exporter {spec}: {e.strerror or e}"
    return None


class JsonLinesExporter:
    """Each finished span as one JSON line, appended to a file."""

    def __init__(self, path: str) -> None:
        problem = exporter_problem(f"file:{path}")
        if problem is not None:
            raise SystemExit(problem)
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for s in spans:
            parent = s.parent
            record = {
                "name": s.name,
                "kind": s.kind.name,
                "trace_id": f"{s.context.trace_id:032x}",
                "span_id": f"{s.context.span_id:016x}",
                "parent_span_id": f"{parent.span_id:016x}" if parent else None,
                "service": s.resource.attributes.get("service.name"),
                "attributes": dict(s.attributes or {}),
                "status": s.status.status_code.name,
                "start": s.start_time,
                "end": s.end_time,
            }
            try:  # orjson: json.dumps was 40% of the export thread's time (py-spy)
                lines.append(orjson.dumps(record))
            except TypeError:  # an int past 64 bits, a lone surrogate: json takes them
                lines.append(json.dumps(record, default=str).encode())
        with self._lock, open(self.path, "ab") as f:
            f.write(b"".join(line + b"\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
