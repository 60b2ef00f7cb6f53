"""One request's trace spans the gateway and the worker (W3C trace context over gRPC and
HTTP), with the GenAI semantic-convention attributes; spans go to JSON-lines files, one
per process (serving.tracing's file exporter)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from loadtest.fleet import start_gateway, start_sim_worker, wait_for


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
