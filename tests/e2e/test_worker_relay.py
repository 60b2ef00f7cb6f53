"""HTTP clients' streams to a Breakwater worker go to its own OpenAI port, byte for byte.

A worker started with --http-port reports that port in Stats; the gateway then relays an
HTTP client's OpenAI stream there instead of converting it to gRPC and every delta back to
JSON. Whole answers stay on gRPC (their TTFT is seen there), and so do gRPC clients' calls.
"""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from loadtest.fleet import admin_json
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import Proc, metric_total, start_gateway, start_sim_worker, wait_for

PROMPT = [{"role": "user", "content": "say something deterministic"}]


def _chat(gw: Proc, stream: bool) -> tuple[str, dict[str, Any]]:
    """(content, usage) of one greedy chat through the gateway."""
    body: dict[str, Any] = {"model": "sim", "messages": PROMPT, "max_tokens": 8}
    body |= {"temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        raw = r.read().decode()
    if not stream:
        whole = json.loads(raw)
        return whole["choices"][0]["message"]["content"], whole["usage"]
    events = [e[len("data: ") :] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]", raw[-300:]
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks[-1]["usage"]


def _generate_calls(worker: Proc) -> int:
    with grpc.insecure_channel(worker.ready["grpc"]) as ch:
        stats = pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10)
    return int(stats.generate_calls)


def _listed(gw: Proc) -> dict[str, Any]:
    workers = admin_json(gw, "/admin/workers")["workers"]
    return workers[0] if workers and workers[0].get("openai_url") else {}


def test_streams_go_to_the_workers_openai_port_and_whole_answers_over_grpc() -> None:
    worker = start_sim_worker("--http-port", "0")
    gw = start_gateway("--worker", worker.ready["grpc"])
    try:
        listed = wait_for(lambda: _listed(gw), timeout=30)
        assert listed["openai_url"] == worker.ready["http"]
        streamed, usage = _chat(gw, stream=True)
        assert _generate_calls(worker) == 0  # not a gRPC call
        whole, whole_usage = _chat(gw, stream=False)
        assert _generate_calls(worker) == 1
        assert streamed == whole and streamed
        assert usage["completion_tokens"] == whole_usage["completion_tokens"] == 8
    finally:
        gw.stop()
        worker.stop()


def test_without_relaying_streams_go_over_grpc() -> None:
    worker = start_sim_worker("--http-port", "0")
    gw = start_gateway("--worker", worker.ready["grpc"], "--no-relay-to-workers")
    try:
        wait_for(lambda: _listed(gw), timeout=30)
        _chat(gw, stream=True)
        assert _generate_calls(worker) == 1
    finally:
        gw.stop()
        worker.stop()


def test_an_unreachable_openai_port_falls_back_to_grpc_in_the_same_attempt() -> None:
    """A worker's OpenAI port the network does not let through (here: a closed port) costs
    one failed connect, not the request, and is left alone afterwards."""
    from gateway.app import make_upstream
    from gateway.dispatch import Dispatcher, RawRequest
    from gateway.registry.base import WorkerInfo, WorkerState
    from gateway.routing.policy import Router

    worker = start_sim_worker("--http-port", "0")
    # bound and never listening: connections are refused, and no other test can take it
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{held.getsockname()[1]}"
    info = WorkerInfo("w0", worker.ready["grpc"], state=WorkerState.SERVING, openai_url=closed)

    class Fixed:
        def workers(self) -> list[WorkerInfo]:
            return [info]

    body = {"model": "sim", "messages": PROMPT, "max_tokens": 4, "stream": True}
    raw = RawRequest(b"/v1/chat/completions", json.dumps(body).encode(), True)

    async def main() -> None:
        d = Dispatcher(Fixed(), Router("round-robin"), make_upstream)  # type: ignore[arg-type]
        request = pb.GenerateRequest(model="sim", text="hello", sampling=pb.SamplingParams())
        request.sampling.max_tokens = 4
        for _ in range(2):
            call = await d.open(request, 30.0, raw=raw)
            assert not call.raw and isinstance(call.first, pb.GenerateResponse)
            await call.close()
        assert d.counters["relay_refused"] == 1  # the second call did not try again
        assert d.workers()[0]["openai_url_refused"] is True
        info.openai_url = worker.ready["http"]  # a new URL is tried at once
        call = await d.open(request, 30.0, raw=raw)
        assert call.raw and isinstance(call.first, bytes)
        await call.close()
        await d.close()

    try:
        asyncio.run(main())
        assert _generate_calls(worker) == 2
    finally:
        held.close()
        worker.stop()


def test_relaying_is_a_flag_and_an_environment_setting(monkeypatch: Any) -> None:
    import argparse

    from gateway.settings import add_gateway_args, settings_from_args

    def parsed(*argv: str) -> bool:
        p = argparse.ArgumentParser()
        add_gateway_args(p)
        return settings_from_args(p.parse_args(list(argv))).relay_to_workers

    assert parsed() is True
    assert parsed("--no-relay-to-workers") is False
    monkeypatch.setenv("BREAKWATER_GATEWAY_RELAY_TO_WORKERS", "0")
    assert parsed() is False
    assert parsed("--relay-to-workers") is True


def test_injected_faults_hit_the_openai_port_too() -> None:
    """Chaos runs relay streams to the OpenAI port: --fault-fail-rate must fail calls there
    as it does gRPC Generate calls, or a relayed fleet would inject nothing."""
    worker = start_sim_worker("--http-port", "0", "--fault-fail-rate", "1.0")
    try:
        body = {"model": "sim", "prompt": "x", "max_tokens": 2, "stream": True}
        req = urllib.request.Request(
            worker.ready["http"] + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("the call was not failed")
        except urllib.error.HTTPError as e:
            assert e.code == 503
            assert "injected fault" in json.loads(e.read())["error"]["message"]
    finally:
        worker.stop()


def _stream_request(gw: Proc, max_tokens: int) -> urllib.request.Request:
    """A streamed chat that asks for no usage."""
    body = {"model": "sim", "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    return urllib.request.Request(
        gw.ready["http"] + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )


def _tokens(gw: Proc) -> dict[str, float]:
    """The gateway's breakwater_tokens_total by kind."""
    with urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("breakwater_tokens_total{"):
            kind = line.split('kind="')[1].split('"')[0]
            out[kind] = out.get(kind, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "over-grpc"])
def test_a_stream_counts_its_tokens_without_showing_the_client_anything_new(relay: bool) -> None:
    """Relayed, the worker ends the stream with its usage as an SSE comment, which the
    gateway reads (token metrics, request log) and takes out; over gRPC the last delta has
    it. A client that asked for no usage gets none, one that asked gets OpenAI's chunk."""
    worker = start_sim_worker("--http-port", "0")
    flags = () if relay else ("--no-relay-to-workers",)
    gw = start_gateway("--worker", worker.ready["grpc"], *flags)
    try:
        wait_for(lambda: _listed(gw), timeout=30)
        req = _stream_request(gw, max_tokens=5)
        with urllib.request.urlopen(req, timeout=30) as r:
            raw = r.read().decode()
        assert _generate_calls(worker) == (0 if relay else 1)
        assert raw.endswith("data: [DONE]\n\n") and ": usage" not in raw
        assert '"usage"' not in raw  # not asked for
        tokens = wait_for(lambda: _tokens(gw).get("completion") and _tokens(gw), timeout=30)
        assert tokens["completion"] == 5 and tokens["prompt"] > 0
        _, usage = _chat(gw, stream=True)  # asked for: the usage chunk, counted once more
        assert usage["completion_tokens"] == 8
        assert wait_for(lambda: _tokens(gw)["completion"] == 13, timeout=30)
        assert _generate_calls(worker) == (0 if relay else 2)
    finally:
        gw.stop()
        worker.stop()


def test_a_worker_with_a_full_queue_is_busy_not_sick_on_a_relayed_stream() -> None:
    """Its 503 "overloaded" is RESOURCE_EXHAUSTED, as over gRPC: the client is told the
    service is overloaded, and the replica stays in the pool with its breaker closed."""
    worker = start_sim_worker("--http-port", "0", "--fault-fail-rate", "1",
                              "--fault-code", "RESOURCE_EXHAUSTED")  # fmt: skip
    gw = start_gateway("--worker", worker.ready["grpc"], "--max-attempts", "1")
    try:
        wait_for(lambda: _listed(gw), timeout=30)
        req = _stream_request(gw, max_tokens=4)
        for _ in range(8):
            try:
                urllib.request.urlopen(req, timeout=30)
                raise AssertionError("an injected overload answered 200")
            except urllib.error.HTTPError as e:
                assert e.code == 503
                assert json.loads(e.read())["error"]["code"] == "overloaded"
        assert _generate_calls(worker) == 0  # every try was on the OpenAI port
        listed = admin_json(gw, "/admin/workers")["workers"][0]
        assert listed["state"] == "SERVING", listed
        assert listed["breaker"]["state"] == "closed", listed
    finally:
        gw.stop()
        worker.stop()


def _reads_of_a_stream(url: str, max_tokens: int) -> list[bytes]:
    """The socket reads that brought one streamed chat of `max_tokens` tokens, whole."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(
        {"model": "sim", "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
        | {"stream_options": {"include_usage": True}}
    ).encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n" % host.encode()
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    reads: list[bytes] = []
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + body)
        while not b"".join(reads).endswith(b"\r\n0\r\n\r\n"):
            data = s.recv(65536)
            assert data, b"".join(reads)[-300:]
            reads.append(data)
    return reads


@pytest.mark.parametrize("path", ["worker", "relayed", "over-grpc"])
def test_a_stream_leaves_in_one_send_per_token(path: str) -> None:
    """The head goes with the first token's events, each later token's events in one send,
    and the last token's with the usage, [DONE] and the chunked terminator: n sends for n
    tokens, where one send per event cost the worker n + 4 and a relaying gateway as many
    reads and sends again. The reader may get fewer reads than sends (a slow reader finds
    two in its buffer), never more: the bound holds on a loaded machine too."""
    # 20 ms steps (the tiny preset at 0.01x), so each token is a send of its own
    worker = start_sim_worker("--http-port", "0", "--sim-speed", "0.01")
    gw = None
    try:
        url = worker.ready["http"]
        if path != "worker":
            flags = () if path == "relayed" else ("--no-relay-to-workers",)
            gw = start_gateway("--worker", worker.ready["grpc"], *flags)
            wait_for(lambda: _listed(gw), timeout=30)
            url = gw.ready["http"]
        reads = _reads_of_a_stream(url, max_tokens=6)
        raw = b"".join(reads)
        assert raw.startswith(b"HTTP/1.1 200 ") and b'"completion_tokens":6' in raw
        assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        assert b'"content":"' in reads[0].replace(b'"content":""', b""), reads[0]
        assert len(reads) <= 6, [r[-60:] for r in reads]
        if gw is not None:
            assert _generate_calls(worker) == (0 if path == "relayed" else 1)
    finally:
        if gw is not None:
            gw.stop()
        worker.stop()


def test_a_workers_openai_port_keeps_the_callers_deadline() -> None:
    """X-Request-Timeout-Ms on a worker's own port (what a relaying gateway sends, with the
    call's remaining time) ends the request there: 504 for a whole answer, an error event
    mid-stream, and the engine's slot freed; without the header there is no deadline."""
    worker = start_sim_worker("--http-port", "0", "--sim-speed", "0.01")  # 20 ms steps
    try:
        url = worker.ready["http"] + "/v1/chat/completions"
        body = {
            "model": "sim",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 300,  # ~6 s
            "ignore_eos": True,
        }

        def post(payload: dict[str, Any], timeout_ms: int | None) -> tuple[int, bytes]:
            headers = {"Content-Type": "application/json"}
            if timeout_ms is not None:
                headers["X-Request-Timeout-Ms"] = str(timeout_ms)
            req = urllib.request.Request(url, json.dumps(payload).encode(), headers)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        status, raw = post(body, 400)
        assert status == 504, raw
        assert json.loads(raw)["error"]["code"] == "deadline_exceeded"
        status, raw = post(body | {"stream": True}, 400)
        assert status == 200  # the head went with the first token
        events = [ln[6:] for ln in raw.decode().splitlines() if ln.startswith("data: ")]
        assert (
            "deadline"
            in json.loads(events[-2] if events[-1] == "[DONE]" else events[-1])["error"]["message"]
        )
        running = "vllm:num_requests_running"  # labelled by model, as vLLM's
        assert wait_for(lambda: metric_total(worker, running, "") == 0, timeout=30)  # aborted
        status, raw = post(body | {"max_tokens": 3}, None)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
    finally:
        worker.stop()


def test_a_grpc_callers_id_cannot_take_an_http_callers_engine_id() -> None:
    """Both ports add a counter to the caller's id; the HTTP port's ids were "http-<id>#n",
    which a gRPC caller sending "http-x" made too: a concurrent HTTP call with X-Request-Id
    x was refused as a duplicate of an id it never sent (found in review)."""
    worker = start_sim_worker("--http-port", "0", "--sim-speed", "0.01")  # 20 ms steps
    try:
        with grpc.insecure_channel(worker.ready["grpc"]) as ch:
            req = pb.GenerateRequest(
                request_id="http-x",
                model="sim",
                text="hi",
                sampling=pb.SamplingParams(max_tokens=300, ignore_eos=True),  # ~6 s
            )
            stream = pb_grpc.InferenceStub(ch).Generate(req, timeout=60)
            next(stream)  # in the engine now, under "http-x#0"
            body = {"model": "sim", "prompt": "hi", "max_tokens": 2}
            http = urllib.request.Request(
                worker.ready["http"] + "/v1/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json", "X-Request-Id": "x"},
            )
            with urllib.request.urlopen(http, timeout=60) as r:
                assert r.status == 200
                assert json.loads(r.read())["usage"]["completion_tokens"] == 2
            stream.cancel()
    finally:
        worker.stop()
