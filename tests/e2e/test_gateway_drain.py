"""A SIGTERM'd gateway lets every stream in flight finish, on every process and front door.

Each process drains its HTTP front door for up to DRAIN_S (60 s), so process 0 must wait
that long for its siblings before killing them (it waited 10 s), and the gRPC front door
must drain for as long (it gave streams 2 s). Streams here outlast both old limits.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import grpc
import pytest

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import start_gateway, start_sim_worker, wait_for

TOKENS = 100
"""~15 s at the sim speed below (0.15 s a token on this preset): past both old limits."""
HTTP_STREAMS = 8
"""Each on its own connection: the kernel spreads them over the two processes (all 8 on
one: 1 in 128)."""


def test_sigterm_lets_http_and_grpc_streams_on_every_process_finish() -> None:
    worker = start_sim_worker("--sim-speed", "0.05", preset="llama3-8b-h100")
    gw = start_gateway("--worker", worker.ready["grpc"], "--grpc-port", "0", processes=2)
    results: dict[str, tuple[int, bool]] = {}
    started: set[str] = set()

    def http_stream(i: int) -> None:
        body = {"model": "sim", "prompt": f"drain {i}", "max_tokens": TOKENS}
        body |= {"ignore_eos": True, "stream": True}
        req = urllib.request.Request(
            gw.ready["http"] + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Connection": "close"},
        )
        n, done = 0, False
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    n += 1
                    started.add(f"http{i}")
                done = done or line.strip() == b"data: [DONE]"
        results[f"http{i}"] = (n, done)

    def grpc_stream(i: int) -> None:
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            req = pb.GenerateRequest(
                model="sim",
                text=f"drain grpc {i}",
                sampling=pb.SamplingParams(max_tokens=TOKENS, ignore_eos=True),
            )
            n, done = 0, False
            for resp in pb_grpc.InferenceStub(ch).Generate(req, timeout=120):
                n += len(resp.token_ids) or (1 if resp.text else 0)
                started.add(f"grpc{i}")
                done = done or bool(resp.finish_reason)
            results[f"grpc{i}"] = (n, done)

    threads = [threading.Thread(target=http_stream, args=(i,)) for i in range(HTTP_STREAMS)]
    threads += [threading.Thread(target=grpc_stream, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(started) == len(threads), timeout=60)
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        for t in threads:
            t.join(150)
        assert gw.wait(60) == 0, gw.log_text()[-3000:]
        assert time.monotonic() - t0 > 10  # the streams did outlast the old limits
        assert len(results) == len(threads), results
        for name, (_n, done) in results.items():
            assert done, (name, results)
        log = gw.log_text()  # a drain operators can follow in the log
        assert "draining: new connections refused" in log and "drained in " in log, log[-2000:]
    finally:
        gw.stop()
        worker.stop()


@pytest.mark.parametrize("server", ["fast", "aiohttp"])
def test_drain_timeout_bounds_how_long_streams_may_keep_a_stopping_gateway(server: str) -> None:
    """--drain-timeout: the drain was a fixed 60 s, whatever the streams operators run.
    aiohttp (TLS, --http-server aiohttp) waits twice its timeout and takes 0 as none: a
    2 s drain took 4 s there, and 0 or 12 s ran past the step's budget (exit 1)."""
    # 0.75 s a token: ~75 s for the stream below
    worker = start_sim_worker("--sim-speed", "0.01", preset="llama3-8b-h100")
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--drain-timeout", "4", "--http-server", server,
        "--grpc-port", "0", "--request-log",
    )  # fmt: skip
    outcome: list[str] = []
    grpc_outcome: list[str] = []

    def grpc_stream() -> None:
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            req = pb.GenerateRequest(model="sim", text="long")
            req.sampling.max_tokens, req.sampling.ignore_eos = TOKENS, True
            try:
                for _ in pb_grpc.InferenceStub(ch).Generate(req, timeout=120):
                    grpc_outcome.append("chunk")
            except grpc.RpcError as e:
                grpc_outcome.append(e.code().name)

    def stream() -> None:
        body = {"model": "sim", "prompt": "long", "max_tokens": TOKENS, "stream": True,
                "ignore_eos": True}  # fmt: skip
        req = urllib.request.Request(
            gw.ready["http"] + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                for line in r:
                    if line.startswith(b"data: {"):
                        outcome.append("chunk")
        except Exception as e:  # cut: the drain ended before the stream
            outcome.append(type(e).__name__)

    t = threading.Thread(target=stream)
    g = threading.Thread(target=grpc_stream)
    try:
        t.start()
        g.start()
        wait_for(lambda: "chunk" in outcome and "chunk" in grpc_outcome, timeout=60)
        t0 = time.monotonic()
        gw.signal(signal.SIGTERM)
        assert gw.wait(60) == 0, gw.log_text()[-3000:]
        took = time.monotonic() - t0
        assert took < 30  # 4 s of drain and the other steps, not 60 s
        log = gw.log_text()
        assert "requests in flight get up to 4 s" in log and "unfinished" not in log, log
        drained = float(log.split("drained in ")[1].split(" s")[0])
        assert drained < 6.5, (drained, took)  # its 4 s, not twice them (8 s)
        t.join(60)
        assert outcome.count("chunk") < TOKENS, outcome  # cut, not finished
        # the gateway cut them, not the clients: 503s in the log and metrics, not 499s
        assert "cut mid-stream: the server stopped" in log and "went away" not in log, log
        g.join(60)
        assert grpc_outcome[-1] == "UNAVAILABLE", grpc_outcome
        lines = [json.loads(x[x.index("{") :]) for x in log.splitlines() if '"status"' in x]
        assert sorted(x["status"] for x in lines if x["stream"]) == [503, 503], lines
    finally:
        gw.stop()
        worker.stop()
