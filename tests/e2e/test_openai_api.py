"""The gateway as OpenAI SDK users and curl users meet it, over a real worker process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import Proc


@pytest.fixture(scope="module")
def client(gateway: Proc) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.ready["http"] + "/v1", api_key="unused", max_retries=0)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_models_and_probes(client: openai.OpenAI, gateway: Proc) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    base = gateway.ready["http"]
    with urllib.request.urlopen(base + "/healthz", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/readyz", timeout=10) as r:
        assert json.loads(r.read())["ready"] is True


def test_chat_and_completion(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None and chat.usage.completion_tokens == 8
    assert isinstance(chat.choices[0].message.content, str)
    comp = client.completions.create(
        model="tiny",
        prompt="hello there",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert comp.usage is not None and comp.usage.completion_tokens == 5
    # Greedy is deterministic: the same request twice gives the same text.
    again = client.completions.create(
        model="tiny",
        prompt="hello there",
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert again.choices[0].text == comp.choices[0].text
    assert again.usage is not None and again.usage.prompt_tokens == comp.usage.prompt_tokens


@pytest.mark.parametrize("include_usage", [False, True])
def test_streaming(client: openai.OpenAI, include_usage: bool) -> None:
    whole = (
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "stream"}],
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "stream"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
        stream_options={"include_usage": True} if include_usage else None,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    usage = [c.usage for c in chunks if c.usage]
    if include_usage:
        assert len(usage) == 1 and usage[0].completion_tokens == 12
        assert chunks[-1].usage is not None and not chunks[-1].choices
    else:
        assert usage == []
    comp = list(
        client.completions.create(
            model="tiny", prompt="x", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert comp[-1].choices[0].finish_reason == "length"


def test_errors(client: openai.OpenAI, gateway: Proc) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model="tiny", prompt="x", temperature=5)
    assert br.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert "maximum context length" in br.value.message
    base = gateway.ready["http"]
    status, body, _ = post(base + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body, _ = post(base + "/v1/chat/completions", json.dumps({"model": "tiny"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    status, body, _ = post(
        base + "/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "n": 3}).encode()
    )
    assert status == 400 and body["error"]["param"] == "n"


def test_request_id_is_propagated_and_returned(gateway: Proc) -> None:
    status, body, headers = post(
        gateway.ready["http"] + "/v1/completions",
        json.dumps({"model": "tiny", "prompt": "id", "max_tokens": 2}).encode(),
        {"X-Request-Id": "my-request-42"},
    )
    assert status == 200
    assert headers["X-Request-Id"] == "my-request-42"
    assert body["id"] == "cmpl-my-request-42"


def test_grpc_front_end_and_worker_health(gateway: Proc, worker: Proc) -> None:
    with grpc.insecure_channel(gateway.ready["grpc"]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(
            model="tiny",
            text="grpc",
            request_id="g-1",
            sampling=pb.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
            stream_options=pb.StreamOptions(include_usage=True),
        )
        responses = list(stub.Generate(req, timeout=60))
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert responses[-1].usage.completion_tokens == 6
        assert sum(len(r.token_ids) for r in responses) == 6
        assert all(r.request_id == "g-1" for r in responses)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(model="nope", text="x"), timeout=30))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert ("param", "model") in (e.value.trailing_metadata() or ())
        with pytest.raises(grpc.RpcError) as e:
            list(
                stub.Generate(
                    pb.GenerateRequest(
                        model="tiny", text="x", sampling=pb.SamplingParams(top_p=0.0)
                    ),
                    timeout=30,
                )
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(worker.ready["grpc"]) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        stats = pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10)
        assert stats.state == "SERVING" and stats.model_id == "tiny"
        assert stats.generation_tokens_total > 0


def test_gateway_fronting_an_openai_http_server(worker: Proc) -> None:
    """The worker's own OpenAI port, fronted by a second gateway as an HTTP upstream."""
    from tests.procs import start_gateway

    gw = start_gateway("--worker", worker.ready["http"])
    try:
        c = openai.OpenAI(base_url=gw.ready["http"] + "/v1", api_key="x", max_retries=0)
        direct = openai.OpenAI(base_url=worker.ready["http"] + "/v1", api_key="x", max_retries=0)
        kw = {
            "model": "tiny",
            "prompt": "front",
            "max_tokens": 6,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        via = c.completions.create(**kw)
        assert via.choices[0].text == direct.completions.create(**kw).choices[0].text
        assert via.usage is not None and via.usage.completion_tokens == 6
        streamed = "".join(
            ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices
        )
        assert streamed == via.choices[0].text
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="x", max_tokens=5000)
    finally:
        gw.stop()
