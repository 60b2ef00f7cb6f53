"""Worker life cycle under traffic: drain loses nothing, disconnects free blocks, queues bound."""

from __future__ import annotations

import json
import signal
import socket
import threading
from pathlib import Path

import grpc
import pytest

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import Proc, start_sim_worker, start_worker, wait_for


def long_request(i: int, max_tokens: int = 800) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny",
        token_ids=pb.TokenIds(ids=[5 + i, 6, 7, 8]),
        request_id=f"r{i}",
        sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        stream_options=pb.StreamOptions(include_usage=True),
    )


def stats(address: str) -> pb.StatsResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10)


def test_sigterm_drains_in_flight_requests(tiny_llama: Path) -> None:
    w = start_worker(tiny_llama, "--max-num-seqs", "4")
    address = w.ready["grpc"]
    results: dict[int, list[pb.GenerateResponse] | Exception] = {}

    def call(i: int) -> None:
        out: list[pb.GenerateResponse] = []
        try:
            with grpc.insecure_channel(address) as ch:
                out.extend(pb_grpc.InferenceStub(ch).Generate(long_request(i), timeout=120))
            results[i] = out
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        # 4 running and 4 queued in the engine when the drain starts.
        wait_for(lambda: stats(address).in_flight == 8, timeout=60)
        w.signal(signal.SIGTERM)
        # New calls are refused while draining.
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.InferenceStub(ch).Generate(long_request(99, 2), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in threads:
            t.join(120)
        assert w.wait(60) == 0
    finally:
        w.stop()
    for i in range(8):
        out = results[i]
        assert isinstance(out, list), f"request {i} failed: {out}"
        assert out[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert out[-1].usage.completion_tokens == 800


def test_client_disconnect_frees_kv_blocks(worker: Proc, gateway: Proc) -> None:
    host, port = gateway.ready["http"].removeprefix("http://").split(":")
    body = (
        b'{"model":"tiny","prompt":"disconnect me","max_tokens":900,"stream":true,'
        b'"ignore_eos":true}'
    )
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        assert b"200 OK" in s.recv(4096)
        wait_for(lambda: stats(worker.ready["grpc"]).running == 1, timeout=30)
        assert stats(worker.ready["grpc"]).kv_cache_usage > 0
    # Closed mid-stream: the gateway cancels the upstream call and the worker frees its blocks.
    wait_for(
        lambda: (
            (st := stats(worker.ready["grpc"])).running == 0
            and st.kv_cache_usage == 0
            and st.in_flight == 0
        ),
        timeout=30,
    )


def test_bounded_queue_pushes_back(tiny_llama: Path) -> None:
    w = start_worker(tiny_llama, "--max-num-seqs", "1", "--max-queue", "1")
    address = w.ready["grpc"]
    try:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            a = stub.Generate(long_request(1, 900), timeout=120)
            next(a)
            b = stub.Generate(long_request(2, 900), timeout=120)
            wait_for(lambda: stats(address).queue_depth == 1, timeout=30)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(long_request(3, 5), timeout=30))
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            pushback = dict(e.value.trailing_metadata() or ())
            assert int(pushback["grpc-retry-pushback-ms"]) > 0
            a.cancel()
            b.cancel()
            wait_for(lambda: stats(address).in_flight == 0, timeout=30)
    finally:
        w.stop()


def test_a_burst_into_free_batch_slots_is_not_a_full_queue() -> None:
    """20 calls at once into an idle worker with 128 batch slots and --max-queue 8: the
    engine has not run a step for them yet, but none is waiting for a slot."""
    from tests.procs import start_sim_worker

    w = start_sim_worker("--max-queue", "8")
    try:
        with grpc.insecure_channel(w.ready["grpc"]) as ch:
            stub = pb_grpc.InferenceStub(ch)
            req = pb.GenerateRequest(
                model="sim", text="burst", sampling=pb.SamplingParams(max_tokens=4)
            )
            calls = [stub.Generate(req, timeout=60) for _ in range(20)]
            for call in calls:
                assert list(call)[-1].finish_reason
    finally:
        w.stop()


def test_up_starts_serves_and_stops_cleanly(tiny_llama: Path, tmp_path: Path) -> None:
    import json
    import urllib.request

    from tests.procs import Proc, child_pids, interrupt_and_reap

    up = Proc(
        [
            "up",
            "--workers",
            "2",
            "--port",
            "0",
            "--model",
            str(tiny_llama),
            "--kv-cache-memory",
            "32MiB",
            "--max-model-len",
            "512",
        ],
        "Breakwater is up",
        timeout=240,
    )
    try:
        line = next(x for x in up.stdout_lines if x.startswith("Breakwater is up"))
        url = line.split("gateway ")[1].split()[0]
        req = urllib.request.Request(
            url + "/v1/completions",
            data=json.dumps({"model": str(tiny_llama), "prompt": "up", "max_tokens": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 3
        children = child_pids(up)
        assert len(children) == 3
        interrupt_and_reap(up, children)
    finally:
        up.stop()


def test_up_stops_at_ctrl_c_while_still_starting() -> None:
    """Ctrl-C before the fleet is ready stops `up` at once, children too, instead of
    leaving it waiting out its readiness timeout. The gateway here cannot become ready:
    the workers register in Redis, while the gateway, given a worker of its own from the
    environment (an unreachable one), does not look there."""
    import os
    import subprocess
    import sys

    from loadtest.redis_server import RedisServer
    from tests.procs import wait_for

    redis = RedisServer().start()  # `up` refuses a Redis that does not answer
    env = {**os.environ, "BREAKWATER_GATEWAY_WORKER": "127.0.0.1:1"}
    up = subprocess.Popen(
        [sys.executable, "-m", "breakwater.cli", "up", "--engine", "sim", "--port", "0"]
        + ["--redis-url", redis.url, "--ready-timeout", "240"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )

    def both_children() -> list[int] | None:
        kids = [int(p) for p in os.popen(f"pgrep -P {up.pid}").read().split()]
        return kids if len(kids) == 2 else None

    try:
        # A worker and the gateway: `up` waits for the gateway's READY line or its /readyz;
        # either way, without Ctrl-C it would wait out --ready-timeout.
        started = wait_for(both_children, timeout=120)
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
        assert up.stdout is not None
        assert "Breakwater is up" not in up.stdout.read()
        for pid in started:
            wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=30)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        redis.close()


@pytest.mark.parametrize("port", ["grpc", "http"])
def test_a_long_prompt_is_tokenized_while_the_worker_goes_on_serving(
    port: str, tiny_llama: Path
) -> None:
    """Found in review: tokenizing a 2 MB prompt (within the limits; refused afterwards as
    past the context) held the worker's event loop for 2.7 s, stalling every stream and
    the health checks, and a gateway took the worker for dead. Now Stats answers while the
    long prompt is still being tokenized, and counts it in flight (the HTTP port counted it
    only once tokenized, so long prompts passed its queue bound)."""
    import json
    import urllib.error
    import urllib.request

    w = start_worker(tiny_llama, "--http-port", "0")
    address = w.ready["grpc"]
    outcome: list[object] = []
    text = "é" * (2 * 1024 * 1024 - 64)  # under the 4 MiB body limit as UTF-8 JSON

    def send_big() -> None:
        if port == "http":
            body = json.dumps({"model": "tiny", "prompt": text}, ensure_ascii=False).encode()
            req = urllib.request.Request(
                w.ready["http"] + "/v1/completions", body, {"Content-Type": "application/json"}
            )
            try:
                urllib.request.urlopen(req, timeout=120)
            except urllib.error.HTTPError as e:
                outcome.append(e.code)
            return
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(address, options=options) as ch:
            try:
                list(pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(text=text), timeout=120))
            except grpc.RpcError as e:
                outcome.append(e.code())

    sender = threading.Thread(target=send_big)
    try:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            sender.start()
            wait_for(lambda: stub.Stats(pb.StatsRequest(), timeout=10).in_flight == 1, timeout=60)
            # answered while the long prompt is still in the tokenizer
            answered = stub.Stats(pb.StatsRequest(), timeout=30)
            assert answered.in_flight == 1 and sender.is_alive()
        sender.join(120)
        # past the 1,024-token context
        assert outcome == [400 if port == "http" else grpc.StatusCode.INVALID_ARGUMENT]
    finally:
        sender.join(120)
        w.stop()


def test_the_drain_timeout_cuts_http_and_grpc_streams_and_the_worker_exits() -> None:
    """Past --drain-timeout the streams still running end with an error and the worker
    exits: an HTTP stream went on to its end (84 s here), then aiohttp's shutdown waited,
    past the pod's grace period, and the kubelet's SIGKILL tore the stream."""
    import http.client
    import time

    w = start_sim_worker("--sim-speed", "0.005", "--drain-timeout", "1", "--http-port", "0")
    host, port = w.ready["http"].removeprefix("http://").split(":")
    body = json.dumps(
        {"model": "sim", "prompt": "go", "max_tokens": 900, "ignore_eos": True, "stream": True}
    )
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    grpc_out: list[object] = []

    def grpc_call() -> None:
        try:
            with grpc.insecure_channel(w.ready["grpc"]) as ch:
                req = long_request(1, 900)
                req.model = "sim"
                grpc_out.extend(pb_grpc.InferenceStub(ch).Generate(req, timeout=120))
        except grpc.RpcError as e:
            grpc_out.append(e)

    t = threading.Thread(target=grpc_call)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        t.start()
        wait_for(lambda: stats(w.ready["grpc"]).in_flight == 2, timeout=60)
        started = time.monotonic()
        w.signal(signal.SIGTERM)
        text = resp.read().decode()  # to the stream's end, however it ends
        assert w.wait(60) == 0
        assert time.monotonic() - started < 30
        assert '"error"' in text, text[-500:]
        t.join(60)
        last = grpc_out[-1]
        assert isinstance(last, grpc.RpcError) or last.finish_reason == pb.FINISH_REASON_ERROR
    finally:
        conn.close()
        w.stop()
