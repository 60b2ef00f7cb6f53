"""A gRPC call that names no priority queues at its tenant's, as an HTTP request does.

The proto field was a plain enum whose zero is PRIORITY_INTERACTIVE, so "not set" read
as interactive and a batch tenant's gRPC calls jumped ahead of interactive ones.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import grpc

from gateway.admission.tenants import hash_key
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import start_gateway, start_sim_worker, wait_for

SECRET = "grpc-priority-secret"


def test_a_batch_tenants_grpc_call_waits_behind_an_interactive_one(tmp_path: Path) -> None:
    config = tmp_path / "admission.toml"
    config.write_text(
        f'key_secret = "{SECRET}"\n'
        f'[tenants.batchy]\nkey_digests = ["{hash_key("k-batchy", SECRET)}"]\n'
        'priority = "batch"\n'
        f'[tenants.inter]\nkey_digests = ["{hash_key("k-inter", SECRET)}"]\n'
    )
    worker = start_sim_worker("--sim-speed", "0.05", preset="llama3-8b-h100")
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--grpc-port", "0", "--admission-config", str(config),
        "--max-in-flight", "1", "--max-queue", "10",
    )  # fmt: skip
    finished: list[str] = []
    started: set[str] = set()

    def http(name: str, key: str, tokens: int) -> None:
        body = {"model": "sim", "prompt": name, "max_tokens": tokens, "ignore_eos": True}
        req = urllib.request.Request(
            gw.ready["http"] + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        started.add(name)
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
        finished.append(name)

    def grpc_batch() -> None:
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            req = pb.GenerateRequest(  # no priority of its own
                model="sim", text="batchy", sampling=pb.SamplingParams(max_tokens=2)
            )
            started.add("batchy")
            md = (("authorization", "Bearer k-batchy"),)
            list(pb_grpc.InferenceStub(ch).Generate(req, timeout=120, metadata=md))
        finished.append("batchy")

    def gauge(name: str) -> float:
        with urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=30) as r:
            lines = r.read().decode().splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith(name + " "))

    try:
        holder = threading.Thread(target=http, args=("holder", "k-inter", 40))  # ~6 s
        holder.start()
        wait_for(lambda: gauge("breakwater_in_flight") == 1, timeout=60)  # the one slot
        batch = threading.Thread(target=grpc_batch)
        batch.start()
        wait_for(lambda: gauge("breakwater_queue_depth") == 1, timeout=60)  # queued first
        inter = threading.Thread(target=http, args=("inter", "k-inter", 2))
        inter.start()
        for t in (holder, batch, inter):
            t.join(120)
        assert finished == ["holder", "inter", "batchy"], finished
    finally:
        gw.stop()
        worker.stop()
