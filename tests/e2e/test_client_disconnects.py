"""A client that leaves mid-response is normal traffic: no stack trace, no leaked slot."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import Proc, start_gateway, start_sim_worker, wait_for


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Proc, Proc]]:
    worker = start_sim_worker()
    gateway = start_gateway("--worker", worker.ready["grpc"])
    yield worker, gateway
    gateway.stop()
    worker.stop()


def _post(gateway: Proc, body: dict[str, object]) -> socket.socket:
    host, port = gateway.ready["http"].removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw
    )
    return s


def _in_flight(worker: Proc) -> int:
    with grpc.insecure_channel(worker.ready["grpc"]) as ch:
        return pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10).in_flight


def test_disconnects_are_counted_not_logged_as_errors(fleet: tuple[Proc, Proc]) -> None:
    worker, gateway = fleet
    stream = {"model": "sim", "prompt": "bye", "max_tokens": 400, "stream": True}
    whole = {"model": "sim", "prompt": "bye", "max_tokens": 400}
    left = 0
    for i in range(12):
        s = _post(gateway, stream if i % 3 else whole)
        if i % 3:
            assert b"200 OK" in s.recv(4096)  # streaming has started
        else:
            time.sleep(0.05)  # the request is in flight, nothing answered yet
        s.close()
        left += 1
    wait_for(lambda: _in_flight(worker) == 0, timeout=60)
    log = gateway.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    # Each departure is at most one INFO line.
    assert 1 <= log.count("client went away") <= left, log[-3000:]
