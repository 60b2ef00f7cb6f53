"""HTTP clients' streams to a Breakwater worker go to its own OpenAI port, byte for byte.

A worker started with --http-port reports that port in Stats; the gateway then relays an
HTTP client's OpenAI stream there instead of converting it to gRPC and every delta back to
JSON. Whole answers stay on gRPC (their TTFT is seen there), and so do gRPC clients' calls.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import grpc

from loadtest.fleet import admin_json, free_port
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import Proc, start_gateway, start_sim_worker, wait_for

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
    closed = f"http://127.0.0.1:{free_port()}"
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
