"""Prometheus metrics on `breakwater up` (gateway and workers), and the request log."""

from __future__ import annotations

import json
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.admission.tenants import hash_key
from loadtest.fleet import Proc, start_gateway, start_sim_worker, wait_for
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc

VLLM_NAMES = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:num_preemptions",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_success",
}
GATEWAY_NAMES = {
    "breakwater_requests",
    "breakwater_request_duration_seconds",
    "breakwater_time_to_first_token_seconds",
    "breakwater_time_per_output_token_seconds",
    "breakwater_queue_depth",
    "breakwater_in_flight",
    "breakwater_admission",
    "breakwater_upstream",
    "breakwater_breaker_state",
    "breakwater_routing_prefix_blocks",
    "breakwater_routing_decisions",
    "breakwater_tokens",
}


def scrape(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str, **labels: str) -> float:
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def wait_counted(gw: Proc, status: str, n: int) -> dict[str, Any]:
    """The gateway's metric families once `n` requests of model sim ended with `status`."""

    def counted() -> dict[str, Any]:
        fams = scrape(gw.ready["http"])
        done = value(fams, "breakwater_requests_total", model="sim", status=status) >= n
        return fams if done else {}

    return wait_for(counted, timeout=30)


def post(url: str, body: dict[str, Any]) -> int:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_up_exposes_vllm_names_on_workers_and_the_gateways_families() -> None:
    up = Proc(
        ["up", "--engine", "sim", "--sim-preset", "tiny", "--workers", "2", "--port", "0"],
        "Breakwater is up",
        timeout=240,
    )
    try:
        text = "\n".join(up.stdout_lines)
        gateway = re.search(r"gateway (http://\S+)", text).group(1)  # type: ignore[union-attr]
        workers = re.findall(r"(http://[\d.:]+)/metrics", text.split("workers:")[1])
        assert len(workers) == 2
        model = re.search(r"model (\S+)\)", text).group(1)  # type: ignore[union-attr]
        messages = [{"role": "user", "content": "count the metrics " * 8}]
        for i in range(6):
            body = {"model": model, "messages": messages, "max_tokens": 4, "stream": i % 2 == 0}
            assert post(gateway, body) == 200
        assert post(gateway, {"model": model, "messages": []}) == 400

        def synced() -> dict[str, Any]:
            # Siblings publish a snapshot once a second: wait for every count the test
            # reads, not only the first (the 400 was served by a process not yet written).
            fams = scrape(gateway)
            done = (
                value(fams, "breakwater_upstream_total", event="requests") >= 6
                and value(fams, "breakwater_requests_total", model=model, status="200") >= 6
                and value(fams, "breakwater_requests_total", status="400") >= 1
                and value(fams, "breakwater_routing_decisions_total") >= 6
                and value(fams, "breakwater_time_to_first_token_seconds_count", model=model) >= 6
            )
            return fams if done else {}

        fams = wait_for(synced, timeout=30)
        assert set(fams) >= GATEWAY_NAMES, GATEWAY_NAMES - set(fams)
        assert value(fams, "breakwater_requests_total", model=model, status="200") == 6
        assert value(fams, "breakwater_requests_total", status="400") == 1
        assert value(fams, "breakwater_time_to_first_token_seconds_count", model=model) == 6
        assert value(fams, "breakwater_breaker_state") == 0  # both closed
        assert value(fams, "breakwater_routing_prefix_blocks_total", kind="routed") > 0
        assert value(fams, "breakwater_routing_decisions_total") == 6  # one per request routed

        for url in workers:
            wf = scrape(url)
            assert set(wf) >= VLLM_NAMES, VLLM_NAMES - set(wf)
            assert value(wf, "vllm:num_requests_waiting", model_name=model) == 0
            assert value(wf, "vllm:prefix_cache_queries_total") >= value(
                wf, "vllm:prefix_cache_hits_total"
            )

        def served() -> float:  # a worker counts a request once its last bytes are out
            return sum(
                value(scrape(url), "vllm:e2e_request_latency_seconds_count", model_name=model)
                for url in workers
            )

        wait_for(lambda: served() >= 6, timeout=30)
        assert served() == 6
        up.signal(signal.SIGINT)
        assert up.wait(90) == 0
    finally:
        up.stop()


def test_one_log_line_per_request_and_no_prompt_text() -> None:
    worker = start_sim_worker()
    gw = start_gateway("--worker", worker.ready["grpc"], "--request-log")
    try:
        secret = "the prompt text stays out of the log"
        for i in range(3):
            body = {"model": "sim", "messages": [{"role": "user", "content": secret}]}
            assert post(gw.ready["http"], {**body, "max_tokens": 3, "stream": i == 1}) == 200
        assert post(gw.ready["http"], {"model": "nope", "messages": [{"role": "user"}]}) == 404

        def lines() -> list[dict[str, Any]]:
            out = [
                json.loads(line.split("breakwater.requests: ", 1)[1])
                for line in gw.log_text().splitlines()
                if "breakwater.requests: " in line
            ]
            return out if len(out) == 4 else []

        records = wait_for(lines, timeout=30)
        assert secret not in gw.log_text()
        ok = [r for r in records if r["status"] == 200]
        assert len(ok) == 3
        for r in ok:
            assert r["model"] == "sim" and r["replica"] and r["attempts"] == 1
            assert r["tenant"] and r["ttft_ms"] is not None and r["latency_ms"] >= r["ttft_ms"]
            assert r["completion_tokens"] == 3
        assert [r["status"] for r in records if r["status"] != 200] == [404]
    finally:
        gw.stop()
        worker.stop()


def log_records(gw: Proc) -> list[dict[str, Any]]:
    return [
        json.loads(line.split("breakwater.requests: ", 1)[1])
        for line in gw.log_text().splitlines()
        if "breakwater.requests: " in line
    ]


def test_grpc_requests_show_in_metrics_and_the_request_log(tmp_path: Path) -> None:
    """The gRPC front end is counted like the HTTP one: requests by status (admission
    refusals too), TTFT, tokens, and one log line each."""
    config = tmp_path / "admission.toml"
    config.write_text(
        f'key_secret = "s"\n[tenants.alice]\nkey_digests = ["{hash_key("alice-key", "s")}"]\n'
    )
    worker = start_sim_worker()
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--grpc-port", "0", "--request-log",
        "--admission-config", str(config),
    )  # fmt: skip
    try:
        req = pb.GenerateRequest(
            model="sim",
            text="count me over grpc",
            request_id="grpc-metrics-1",
            sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
            stream_options=pb.StreamOptions(include_usage=True),
        )
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            stub = pb_grpc.InferenceStub(ch)
            auth = (("authorization", "Bearer alice-key"),)
            responses = list(stub.Generate(req, metadata=auth, timeout=60))
            assert responses[-1].usage.completion_tokens == 3
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(req, timeout=60))  # no key: refused by admission
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # an unknown model is NOT_FOUND before admission (it was admitted, charged,
            # and refused ones were labelled with whatever name the caller sent), once the
            # key is checked: a caller without one learns no model names
            for name in ("made-up-1", "made-up-2"):
                unknown = pb.GenerateRequest(model=name, text="x")
                with pytest.raises(grpc.RpcError) as missing:
                    list(stub.Generate(unknown, metadata=auth, timeout=60))
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as keyless:
                list(stub.Generate(pb.GenerateRequest(model="made-up-3", text="x"), timeout=60))
            assert keyless.value.code() == grpc.StatusCode.UNAUTHENTICATED

        fams = wait_counted(gw, "401", 1)

        def unknown_counted() -> dict[str, Any]:
            f = scrape(gw.ready["http"])
            n = value(f, "breakwater_requests_total", model="unknown", status="404")
            return f if n == 2 else {}

        fams = wait_for(unknown_counted, timeout=30)
        labels = [s.labels for f in fams.values() for s in f.samples]
        assert not [x for x in labels if "made-up" in str(x)]
        assert value(fams, "breakwater_requests_total", model="sim", status="200") == 1
        assert value(fams, "breakwater_requests_total", model="sim", status="401") == 1
        assert value(fams, "breakwater_time_to_first_token_seconds_count", model="sim") == 1
        assert value(fams, "breakwater_request_duration_seconds_count", model="sim") == 1
        assert value(fams, "breakwater_tokens_total", model="sim", kind="completion") == 3
        assert value(fams, "breakwater_tokens_total", model="sim", kind="prompt") > 0

        records = wait_for(lambda: log_records(gw) if len(log_records(gw)) == 5 else [], 30)
        ok = next(r for r in records if r["status"] == 200)
        assert ok["request_id"] == "grpc-metrics-1" and ok["tenant"] == "alice"
        assert ok["model"] == "sim" and ok["replica"] == worker.ready["grpc"]
        assert ok["attempts"] == 1 and ok["stream"] is True
        assert ok["completion_tokens"] == 3 and ok["prompt_tokens"] > 0
        assert ok["ttft_ms"] is not None and ok["latency_ms"] >= ok["ttft_ms"]
        no = next(r for r in records if r["status"] == 401 and r["model"] == "sim")
        assert no["status"] == 401 and no["tenant"] is None and no["attempts"] == 0
        assert "count me over grpc" not in gw.log_text()

        # a caller that cancels is a client that went away, as over HTTP (not counted)
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            long = pb.GenerateRequest(
                model="sim", text="cancel me", sampling=pb.SamplingParams(max_tokens=500)
            )
            long.sampling.ignore_eos = True
            call = pb_grpc.InferenceStub(ch).Generate(long, metadata=auth, timeout=60)
            next(call)
            call.cancel()

        def disconnects() -> float:
            return value(scrape(gw.ready["http"]), "breakwater_client_disconnects_total")

        wait_for(lambda: disconnects() == 1, timeout=30)
    finally:
        gw.stop()
        worker.stop()


def test_a_worker_refusal_counts_the_same_status_over_grpc_as_over_http() -> None:
    """A full worker (RESOURCE_EXHAUSTED) is a 503 to an HTTP caller; a gRPC caller gets
    RESOURCE_EXHAUSTED, and both are counted as the 503 dashboards alert on."""
    worker = start_sim_worker("--fault-fail-rate", "1", "--fault-code", "RESOURCE_EXHAUSTED")
    gw = start_gateway("--worker", worker.ready["grpc"], "--grpc-port", "0")
    try:
        body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert post(gw.ready["http"], body) == 503
        req = pb.GenerateRequest(model="sim", text="hi", sampling=pb.SamplingParams(max_tokens=2))
        with (
            grpc.insecure_channel(gw.ready["grpc"]) as ch,
            pytest.raises(grpc.RpcError) as refused,
        ):
            list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        fams = wait_counted(gw, "503", 2)
        assert value(fams, "breakwater_requests_total", model="sim", status="503") == 2
        assert value(fams, "breakwater_requests_total", model="sim", status="429") == 0
    finally:
        gw.stop()
        worker.stop()
