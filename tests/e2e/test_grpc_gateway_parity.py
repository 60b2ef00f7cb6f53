"""The gateway's gRPC port against its HTTP port: what one counts, logs and advises, the
other does too (usage in the token metrics, the retry budget's word, a replica's CANCELLED,
the caller's request id), and it answers gRPC health checks as /readyz does."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.fleet import admin_json
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import metric_total, start_gateway, start_sim_worker, wait_for


def _generate(target: str, req: pb.GenerateRequest, **kw: object) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(target) as ch:
        return list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60, **kw))


def _unlabelled(url: str, sample: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(sample + " "))


def _refused(target: str, req: pb.GenerateRequest, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _generate(target, req, **kw)
    return info.value


def test_grpc_calls_count_usage_honour_request_ids_and_answer_health_checks() -> None:
    worker = start_sim_worker()
    gw = start_gateway("--worker", worker.ready["grpc"], "--grpc-port", "0", "--request-log")
    try:
        target = gw.ready["grpc"]
        sampling = pb.SamplingParams(max_tokens=5, ignore_eos=True)
        plain = pb.GenerateRequest(model="sim", text="count me", sampling=sampling)
        answers = _generate(target, plain, metadata=(("x-request-id", "my-req-7"),))
        # usage not asked for is not sent, but the gateway counted it all the same
        assert not any(a.HasField("usage") for a in answers)
        assert {a.request_id for a in answers} == {"my-req-7"}
        asked = pb.GenerateRequest(model="sim", text="count me", sampling=sampling)
        asked.stream_options.include_usage = True
        assert _generate(target, asked)[-1].usage.completion_tokens == 5

        def counted() -> float:
            return metric_total(gw, "breakwater_tokens_total", 'kind="completion"')

        assert wait_for(lambda: counted() == 10, timeout=30)
        log = gw.log_text()
        assert '"request_id": "my-req-7"' in log or '"request_id":"my-req-7"' in log

        # a refused id or model is not written to the log as sent
        huge = pb.GenerateRequest(model="sim", text="x", request_id="i" * 300_000)
        assert _refused(target, huge).code() == grpc.StatusCode.INVALID_ARGUMENT
        long_model = pb.GenerateRequest(model="m" * 100_000, text="x")
        assert _refused(target, long_model).code() == grpc.StatusCode.INVALID_ARGUMENT
        wait_for(lambda: metric_total(gw, "breakwater_requests_total", 'status="400"') == 2, 30)
        assert "i" * 1000 not in gw.log_text() and "m" * 1000 not in gw.log_text()

        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "sim"):
                check = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as unknown:
                health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        worker.stop()  # no replica left: not serving, as /readyz says 503

        def not_serving() -> bool:
            with grpc.insecure_channel(target) as ch:
                h = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=30
                )
            return h.status == health_pb2.HealthCheckResponse.NOT_SERVING

        assert wait_for(not_serving, timeout=60)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(gw.ready["http"] + "/readyz", timeout=30)
    finally:
        gw.stop()
        worker.stop()


def test_a_replicas_cancel_is_its_failure_and_refusals_follow_the_retry_budget() -> None:
    """A worker's CANCELLED reached the gRPC caller as CANCELLED (read as its own cancel,
    logged as 499); a worker's refusals always said "retry", where HTTP's say no once the
    door's retry budget is spent."""
    cutting = start_sim_worker("--fault-fail-rate", "1", "--fault-code", "CANCELLED")
    full = start_sim_worker(
        "--fault-fail-rate",
        "1",
        "--fault-code",
        "RESOURCE_EXHAUSTED",
        "--served-model-name",
        "full",
    )
    gw = start_gateway(
        "--worker", cutting.ready["grpc"], "--worker", full.ready["grpc"], "--grpc-port", "0"
    )
    try:
        target = gw.ready["grpc"]
        req = pb.GenerateRequest(model="sim", text="hi", sampling=pb.SamplingParams(max_tokens=2))
        assert _refused(target, req).code() == grpc.StatusCode.UNAVAILABLE
        wait_for(lambda: metric_total(gw, "breakwater_requests_total", 'status="502"') == 1, 30)
        assert _unlabelled(gw.ready["http"], "breakwater_client_disconnects_total") == 0

        req = pb.GenerateRequest(model="full", text="hi", sampling=pb.SamplingParams(max_tokens=2))
        pushbacks = []
        for _ in range(30):
            e = _refused(target, req, metadata=(("x-retry-count", "1"),))
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            pushbacks.append(dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms"))
        assert "-1" in pushbacks, pushbacks  # the budget ran out: do not retry
        assert pushbacks[0] != "-1"
    finally:
        gw.stop()
        cutting.stop()
        full.stop()


def _cut_by_its_deadline(url: str) -> int:
    """A stream with a deadline shorter than its answer: the status it arrived with."""
    body = {"model": "sim", "prompt": "x", "max_tokens": 900, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Timeout-Ms": "1500"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read().decode()
    except urllib.error.HTTPError as e:  # cut before its first token, on a loaded machine
        return e.code
    assert '"deadline_exceeded"' in raw and raw.endswith("data: [DONE]\n\n"), raw[-300:]
    return 200


@pytest.mark.parametrize("relay", [True, False], ids=["relayed", "over-grpc"])
def test_a_stream_cut_by_its_deadline_is_counted_as_a_timeout_on_both_doors(relay: bool) -> None:
    """A 200 whose stream then ended in a deadline error was logged and counted as a
    success; a gRPC caller's own deadline, about half the time, as the caller leaving (499)."""
    worker = start_sim_worker("--http-port", "0", "--sim-speed", "0.001")
    flags = () if relay else ("--no-relay-to-workers",)
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--grpc-port", "0", "--gpu-hour-price", "3600", *flags
    )
    try:

        def listed() -> bool:
            workers = admin_json(gw, "/admin/workers")["workers"]
            return bool(workers) and (not relay or bool(workers[0].get("openai_url")))

        wait_for(listed, timeout=30)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(_cut_by_its_deadline, [gw.ready["http"]] * 3))
            assert set(statuses) <= {200, 504}, statuses

            def generate(i: int) -> grpc.StatusCode:
                sampling = pb.SamplingParams(max_tokens=900, ignore_eos=True)
                req = pb.GenerateRequest(model="sim", text=f"deadline {i}", sampling=sampling)
                with grpc.insecure_channel(gw.ready["grpc"]) as ch:
                    try:
                        for _ in pb_grpc.InferenceStub(ch).Generate(req, timeout=1.0):
                            pass
                    except grpc.RpcError as e:
                        return e.code()
                return grpc.StatusCode.OK

            codes = list(pool.map(generate, range(8)))
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes

        def timeouts() -> float:
            return metric_total(gw, "breakwater_requests_total", 'status="504"')

        assert wait_for(lambda: timeouts() == 11, timeout=60), timeouts()
        for status in ("200", "499"):
            assert metric_total(gw, "breakwater_requests_total", f'status="{status}"') == 0
        assert _unlabelled(gw.ready["http"], "breakwater_client_disconnects_total") == 0
        # the replica's time was spent all the same: a client must not escape its cost by
        # cutting its own stream short
        assert metric_total(gw, "breakwater_cost_dollars_total", 'model="sim"') > 0
    finally:
        gw.stop()
        worker.stop()
