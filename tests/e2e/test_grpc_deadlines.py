"""The gRPC front door honours a client's deadline as HTTP honours X-Request-Timeout-Ms:
up to --max-request-timeout, with --request-timeout for calls that set none; a deadline
that runs out is the caller's, not the replica's."""

from __future__ import annotations

import grpc
import pytest

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import start_gateway, start_sim_worker

TOKENS = 20
"""~3 s at the sim speed below: past --request-timeout, well within the client's 60 s."""


def _request() -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    return pb.GenerateRequest(model="sim", text="deadlines", sampling=sampling)


def test_a_client_deadline_is_honoured_up_to_the_maximum() -> None:
    worker = start_sim_worker("--sim-speed", "0.05", preset="llama3-8b-h100")
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--grpc-port", "0",
        "--request-timeout", "1", "--max-request-timeout", "60",
    )  # fmt: skip
    try:
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            stub = pb_grpc.InferenceStub(ch)
            answers = list(stub.Generate(_request(), timeout=60))
            assert answers[-1].finish_reason
            assert sum(len(a.token_ids) for a in answers) == TOKENS
            # no deadline of its own: the gateway's default (1 s) cuts it, and says whose
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(_request()))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "request's deadline" in (e.value.details() or ""), e.value.details()
            assert worker.ready["grpc"] not in (e.value.details() or "")
    finally:
        gw.stop()
        worker.stop()
