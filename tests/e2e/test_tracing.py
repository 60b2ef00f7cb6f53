"""One request's trace spans the gateway and the worker (W3C trace context over gRPC and
HTTP), with the GenAI semantic-convention attributes; spans go to JSON-lines files, one
per process (serving.tracing's file exporter)."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from loadtest.fleet import start_gateway, start_sim_worker, wait_for
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from serving import tracing

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def chat(url: str, headers: dict[str, str] | None = None) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 3}
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def test_a_trace_spans_gateway_and_worker(tmp_path: Path) -> None:
    gw_file, w_file = tmp_path / "gateway.jsonl", tmp_path / "worker.jsonl"
    worker = start_sim_worker("--trace-exporter", f"file:{w_file}")
    gw = start_gateway("--worker", worker.ready["grpc"], "--trace-exporter", f"file:{gw_file}")
    try:
        caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
        chat(gw.ready["http"], {"traceparent": f"00-{caller_trace}-00f067aa0ba902b7-01"})
        wait_for(lambda: spans(gw_file) and spans(w_file), timeout=30)
        g = spans(gw_file)
        w = spans(w_file)
        server = next(s for s in g if s["kind"] == "SERVER")
        attempt = next(s for s in g if s["kind"] == "CLIENT")
        generate = next(s for s in w if s["kind"] == "SERVER")
        # one trace: the caller's, through the gateway's request and attempt, to the worker
        assert server["trace_id"] == attempt["trace_id"] == generate["trace_id"] == caller_trace
        assert server["parent_span_id"] == "00f067aa0ba902b7"
        assert attempt["parent_span_id"] == server["span_id"]
        assert generate["parent_span_id"] == attempt["span_id"]
        assert server["service"] == "breakwater-gateway"
        assert generate["service"] == "breakwater-worker"
        assert server["name"] == "chat sim"
        a = server["attributes"]
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "sim"
        assert a["gen_ai.request.max_tokens"] == 3
        assert a["breakwater.attempts"] == 1
        assert attempt["attributes"]["breakwater.worker_id"] == worker.ready["grpc"]
        assert generate["attributes"]["gen_ai.usage.output_tokens"] == 3
        assert "trace me" not in gw_file.read_text() + w_file.read_text()  # never the prompt
    finally:
        gw.stop()
        worker.stop()


def test_tracing_over_an_openai_upstream_and_off_by_default(tmp_path: Path) -> None:
    gw_file = tmp_path / "gateway.jsonl"
    worker = start_sim_worker("--http-port", "0")  # no exporter: the worker traces nothing
    gw = start_gateway("--worker", worker.ready["http"], "--trace-exporter", f"file:{gw_file}")
    try:
        chat(gw.ready["http"])
        wait_for(lambda: len(spans(gw_file)) >= 2, timeout=30)
        server = next(s for s in spans(gw_file) if s["kind"] == "SERVER")
        attempt = next(s for s in spans(gw_file) if s["kind"] == "CLIENT")
        assert attempt["parent_span_id"] == server["span_id"]
        assert attempt["attributes"]["server.address"] == worker.ready["http"]
        assert not list(tmp_path.glob("worker*"))
    finally:
        gw.stop()
        worker.stop()


def test_a_grpc_call_continues_the_callers_trace(tmp_path: Path) -> None:
    """gRPC front end: the caller's traceparent metadata through the gateway's server
    span and attempt span to the worker's span, with the HTTP path's attributes."""
    gw_file, w_file = tmp_path / "gateway.jsonl", tmp_path / "worker.jsonl"
    worker = start_sim_worker("--trace-exporter", f"file:{w_file}")
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--grpc-port", "0",
        "--trace-exporter", f"file:{gw_file}",
    )  # fmt: skip
    try:
        req = pb.GenerateRequest(
            model="sim",
            text="trace me",
            request_id="grpc-trace-1",
            sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
            stream_options=pb.StreamOptions(include_usage=True),
        )
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            stub = pb_grpc.InferenceStub(ch)
            list(stub.Generate(req, metadata=(("traceparent", TRACEPARENT),), timeout=60))

        def kinds(path: Path, *wanted: str) -> list[dict[str, Any]]:
            found = {s["kind"]: s for s in spans(path)}
            return [found[k] for k in wanted] if set(wanted) <= set(found) else []

        server, attempt = wait_for(lambda: kinds(gw_file, "SERVER", "CLIENT"), timeout=30)
        (generate,) = wait_for(lambda: kinds(w_file, "SERVER"), timeout=30)
        assert server["trace_id"] == attempt["trace_id"] == generate["trace_id"] == CALLER_TRACE
        assert server["parent_span_id"] == CALLER_SPAN
        assert attempt["parent_span_id"] == server["span_id"]
        assert generate["parent_span_id"] == attempt["span_id"]
        assert server["name"] == "text_completion sim"
        a = server["attributes"]
        assert a["rpc.system"] == "grpc" and a["rpc.method"] == "Generate"
        assert a["rpc.grpc.status_code"] == 0
        assert a["gen_ai.operation.name"] == "text_completion"
        assert a["gen_ai.request.model"] == "sim" and a["gen_ai.request.max_tokens"] == 3
        assert a["breakwater.request_id"] == "grpc-trace-1"
        assert a["breakwater.attempts"] == 1
        assert a["breakwater.replica"] == worker.ready["grpc"]
        assert a["gen_ai.usage.output_tokens"] == 3
        assert "trace me" not in gw_file.read_text() + w_file.read_text()

        # calls cut short (a caller's cancel) end their worker span without an error in
        # the log: the span was the current one across the stream's yields, and its
        # context failed to detach when grpc closed the generator elsewhere
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            for i in range(3):
                long = pb.GenerateRequest(model="sim", text=f"cut {i}")
                long.sampling.max_tokens, long.sampling.ignore_eos = 500, True
                call = pb_grpc.InferenceStub(ch).Generate(long, timeout=60)
                next(call)
                call.cancel()
        wait_for(lambda: len(kinds(w_file, "SERVER") and spans(w_file)) >= 4, timeout=30)
        assert "Failed to detach context" not in worker.log_text()
    finally:
        gw.stop()
        worker.stop()


def test_the_workers_http_port_continues_a_trace(tmp_path: Path) -> None:
    w_file = tmp_path / "worker.jsonl"
    worker = start_sim_worker("--http-port", "0", "--trace-exporter", f"file:{w_file}")
    try:
        chat(worker.ready["http"], {"traceparent": TRACEPARENT})
        (span,) = wait_for(lambda: spans(w_file), timeout=30)
        assert span["kind"] == "SERVER" and span["service"] == "breakwater-worker"
        assert span["trace_id"] == CALLER_TRACE and span["parent_span_id"] == CALLER_SPAN
        a = span["attributes"]
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "sim"
        assert a["gen_ai.usage.output_tokens"] == 3
        assert a["http.response.status_code"] == 200
    finally:
        worker.stop()


def test_console_spans_of_every_gateway_process_reach_stdout() -> None:
    """Process 0 read its siblings' stdout after their ready line and threw it away: with
    two processes, about half the console exporter's spans were lost."""
    worker = start_sim_worker()
    try:
        gw = start_gateway(
            "--worker", worker.ready["grpc"], "--trace-exporter", "console", processes=2
        )
        try:
            for _ in range(12):  # a new connection each: the kernel spreads them over both
                chat(gw.ready["http"], {"Connection": "close"})

            def server_spans() -> int:
                return "".join(gw.stdout_lines).count('"kind": "SpanKind.SERVER"')

            wait_for(lambda: server_spans() >= 12, timeout=30)
        finally:
            gw.stop()
    finally:
        worker.stop()


def test_spans_are_exported_off_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spans end on the event loop; the file exporter (open, write) must not run there."""
    exporting: list[threading.Thread] = []
    export = tracing.JsonLinesExporter.export

    def spy(self: tracing.JsonLinesExporter, spans: Any) -> Any:
        exporting.append(threading.current_thread())
        return export(self, spans)

    monkeypatch.setattr(tracing.JsonLinesExporter, "export", spy)
    path = tmp_path / "spans.jsonl"
    tracer = tracing.make_tracer(f"file:{path}", "test")
    tracer.start_span("request").end()
    wait_for(lambda: spans(path), timeout=30)
    assert exporting and threading.current_thread() not in exporting
    assert spans(path)[0]["name"] == "request"


def test_flush_all_writes_what_is_batched_at_once(tmp_path: Path) -> None:
    """A gateway leaving by os._exit (a drain that did not finish) skips the exit hook
    that exports the last batch: flush_all does it first."""
    path = tmp_path / "spans.jsonl"
    tracer = tracing.make_tracer(f"file:{path}", "test")
    tracer.start_span("cut").end()
    tracing.flush_all()
    assert [s["name"] for s in spans(path)] == ["cut"]
