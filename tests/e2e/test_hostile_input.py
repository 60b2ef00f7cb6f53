"""Hostile requests over real HTTP, to a real gateway over a simulated worker (and to the
worker's own OpenAI port, which shares the routes): each is a JSON error naming the field,
never a 500 or a text page, and the gateway serves normally afterwards. The gateway's gRPC
front end refuses the same out-of-bounds requests with INVALID_ARGUMENT."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from proto.limits import DEFAULT_LIMITS
from tests.procs import Proc, metric_total, start_gateway, start_sim_worker, wait_for

MODEL = "sim"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def sim_worker() -> Iterator[Proc]:
    w = start_sim_worker("--http-port", "0", name=MODEL)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def sim_gateway(sim_worker: Proc) -> Iterator[Proc]:
    g = start_gateway("--worker", sim_worker.ready["grpc"], "--grpc-port", "0")
    yield g
    g.stop()


def post(url: str, body: bytes) -> tuple[int, str, Any]:
    """(status, content type, decoded JSON body) of a POST."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers.get_content_type(), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), json.loads(e.read())


def chat(**fields: Any) -> bytes:
    return json.dumps({**CHAT, **fields}).encode()


HOSTILE: list[tuple[str, bytes, int, str | None]] = [
    ("oversized body", b" " * (DEFAULT_LIMITS.max_body_bytes + 1), 413, None),
    (
        "10k messages",
        chat(messages=[{"role": "user", "content": "x"}] * 10_000),
        400,
        "messages",
    ),
    ("bad JSON", b'{"model": "sim", "messages": [', 400, None),
    ("invalid UTF-8", b'{"model": "sim", "messages": "\xff"}', 400, None),
    ("not an object", b'["model", "sim"]', 400, None),
    ("messages a string", chat(messages="hi"), 400, "messages"),
    (
        "content a number",
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
    ),
    ("unknown role", chat(messages=[{"role": "root", "content": "x"}]), 400, "messages[0].role"),
    ("temperature a string", chat(temperature="hot"), 400, "temperature"),
    ("stream not a bool", chat(stream="yes"), 400, "stream"),
    ("priority a list", chat(priority=["batch"]), 400, "priority"),
    ("max_tokens over the ceiling", chat(max_tokens=10**9), 400, "max_tokens"),
    ("five stop strings", chat(stop=list("abcde")), 400, "stop"),
    ("n above 1", chat(n=4), 400, "n"),
    ("tools a string", chat(tools="x"), 400, "tools"),
    ("tool_choice unknown", chat(tools=[], tool_choice="sometimes"), 400, "tool_choice"),
    ("response_format a string", chat(response_format="json"), 400, "response_format"),
    # what the engine cannot do is refused, not answered with text that looks like success
    ("tools to call", chat(tools=[TOOL]), 400, "tools"),
    ("tools to call, streamed", chat(tools=[TOOL], stream=True), 400, "tools"),
    ("a function to call", chat(functions=[TOOL["function"]]), 400, "functions"),
    ("JSON output", chat(response_format={"type": "json_object"}), 400, "response_format"),
]


@pytest.mark.parametrize("port", ["gateway", "worker"])
def test_hostile_bodies_are_json_errors_and_service_goes_on(
    port: str, sim_gateway: Proc, sim_worker: Proc
) -> None:
    base = (sim_gateway if port == "gateway" else sim_worker).ready["http"]
    url = base + "/v1/chat/completions"
    for what, body, status, param in HOSTILE:
        got, content_type, answer = post(url, body)
        assert (got, content_type) == (status, "application/json"), what
        err = answer["error"]
        assert err["type"] == "invalid_request_error", what
        assert err["param"] == param, what
        if status == 413:
            assert err["code"] == "request_too_large"
            assert str(DEFAULT_LIMITS.max_body_bytes) in err["message"]
    # Unknown fields are tolerated, tools not to be called too, and the port still
    # answers a normal request.
    got, _, answer = post(
        url,
        chat(
            tools=[TOOL],
            tool_choice="none",
            response_format={"type": "text"},
            metadata={"k": "v"},
            some_extension={"a": [1]},
        ),
    )
    assert got == 200, answer
    assert answer["choices"][0]["message"]["role"] == "assistant"
    got, _, answer = post(
        base + "/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2]}).encode()
    )
    assert got == 200, answer


def post_raw(base: str, path: str, body: bytes, headers: dict[str, bytes]) -> tuple[int, Any]:
    """A POST whose header values are sent as the bytes given (urllib would encode them)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        assert resp.headers.get_content_type() == "application/json"
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("port", ["gateway", "worker"])
def test_hostile_headers_are_json_errors(port: str, sim_gateway: Proc, sim_worker: Proc) -> None:
    """Headers found by fuzzing: a request id that gRPC metadata cannot carry (a 500 and
    then a 502 that counted against the replica), a session key that is not UTF-8 (a 500),
    a NaN deadline."""
    base = (sim_gateway if port == "gateway" else sim_worker).ready["http"]
    path = "/v1/chat/completions"
    most = DEFAULT_LIMITS.max_request_id_chars
    for value in ("é".encode("latin-1"), "é".encode(), b"r" * (most + 1)):
        for _ in range(4):  # more than a breaker would take from a replica
            status, answer = post_raw(base, path, chat(), {"X-Request-Id": value})
            assert (status, answer["error"]["param"]) == (400, "X-Request-Id"), value[:8]
    status, answer = post_raw(base, path, chat(), {"X-Request-Timeout-Ms": b"nan"})
    assert status == 400, answer
    for headers in ({"X-Session-Id": "é".encode("latin-1")}, {"X-Request-Id": b"r" * most}):
        status, answer = post_raw(base, path, chat(), headers)
        assert status == 200, answer
    if port == "gateway":
        assert answer["id"] == "chatcmpl-" + "r" * most


def test_tight_deadlines_do_not_eject_the_replica(sim_gateway: Proc) -> None:
    """A caller's own deadline running out says nothing of the replica: counted as its
    failure, a client asking for 1 ms a few times took the only replica out of service."""
    base = sim_gateway.ready["http"]
    for _ in range(8):
        status, answer = post_raw(
            base, "/v1/chat/completions", chat(), {"X-Request-Timeout-Ms": b"1"}
        )
        assert status in (200, 504), answer
    status, answer = post_raw(base, "/v1/chat/completions", chat(), {})
    assert status == 200, answer


def _requests_400(gw: Proc) -> float:
    return metric_total(gw, "breakwater_requests_total", 'status="400"')


L = DEFAULT_LIMITS


def _gen(**fields: Any) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=MODEL, text="hi", sampling=pb.SamplingParams(max_tokens=4))
    for name, value in fields.items():
        if name == "sampling":
            req.sampling.MergeFrom(value)
        elif name == "token_ids":
            req.token_ids.ids.extend(value)
        elif name == "messages":
            req.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in value)
        else:
            setattr(req, name, value)
    return req


GRPC_HOSTILE: list[tuple[str, pb.GenerateRequest, str]] = [
    ("too many token ids", _gen(token_ids=[1] * (L.max_prompt_token_ids + 1)), "token_ids"),
    ("a negative token id", _gen(token_ids=[5, -1]), "token_ids"),
    ("oversized prompt", _gen(text="x" * (L.max_prompt_chars + 1)), "text"),
    ("no prompt", pb.GenerateRequest(model=MODEL), "prompt"),
    ("too many messages", _gen(messages=[("user", "x")] * (L.max_messages + 1)), "chat.messages"),
    ("unknown role", _gen(messages=[("user", "x"), ("root", "x")]), "chat.messages[1].role"),
    (
        "max_tokens over the ceiling",
        _gen(sampling=pb.SamplingParams(max_tokens=L.max_tokens + 1)),
        "sampling.max_tokens",
    ),
    ("five stop strings", _gen(sampling=pb.SamplingParams(stop=list("abcde"))), "sampling.stop"),
    (
        "logprobs over the cap",
        _gen(sampling=pb.SamplingParams(logprobs=L.max_logprobs + 1)),
        "sampling.logprobs",
    ),
    ("a long model name", _gen(model="m" * (L.max_model_chars + 1)), "model"),
    ("a request id gRPC metadata cannot carry", _gen(request_id="é"), "request_id"),
]


def refuses_every_hostile_request(stub: pb_grpc.InferenceStub) -> None:
    """Each of GRPC_HOSTILE is INVALID_ARGUMENT, naming its field (also as `param`)."""
    for what, req, field in GRPC_HOSTILE:
        call = stub.Generate(req, timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, e.value.details())
        assert field in e.value.details(), (what, e.value.details())
        assert ("param", field) in (call.trailing_metadata() or ()), what


def test_a_workers_own_grpc_port_refuses_them_too(sim_worker: Proc) -> None:
    """Callers may reach a worker without a gateway (a sidecar, a test rig): same bounds."""
    with grpc.insecure_channel(sim_worker.ready["grpc"]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        refuses_every_hostile_request(stub)
        out = list(stub.Generate(_gen(), timeout=60))
        assert out[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def test_grpc_front_end_refuses_out_of_bounds_requests(sim_gateway: Proc) -> None:
    before = _requests_400(sim_gateway)
    with grpc.insecure_channel(
        sim_gateway.ready["grpc"], options=[("grpc.max_send_message_length", -1)]
    ) as ch:
        stub = pb_grpc.InferenceStub(ch)
        refuses_every_hostile_request(stub)
        # past the body limit: INVALID_ARGUMENT, not to be retried (it was grpc's own
        # RESOURCE_EXHAUSTED, the code load shedding uses, which clients retry)
        too_big = _gen(text="x" * L.max_body_bytes)
        call = stub.Generate(too_big, timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert f"at most {L.max_body_bytes} are allowed" in (e.value.details() or "")
        assert ("grpc-retry-pushback-ms", "-1") in (call.trailing_metadata() or ())
        # and a normal request is served
        out = list(stub.Generate(_gen(), timeout=60))
        assert out[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    # every refusal ended as a request answered 400, like the HTTP front end counts it
    wait_for(lambda: _requests_400(sim_gateway) - before >= len(GRPC_HOSTILE), timeout=10)
    assert _requests_400(sim_gateway) - before == len(GRPC_HOSTILE)


def test_grpc_refusals_from_the_worker_and_the_gateway_say_why(sim_gateway: Proc) -> None:
    """A worker's refusal keeps its field (`param`) through the gateway, and the gateway
    answers WatchCache (a worker's RPC) as unimplemented in words (found in review: the
    gateway dropped the field, and its WatchCache told the caller the class name of a
    NotImplementedError and logged a traceback)."""
    with grpc.insecure_channel(sim_gateway.ready["grpc"]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        # within the gateway's bounds, past the sim worker's 1,024-token context
        call = stub.Generate(_gen(sampling=pb.SamplingParams(max_tokens=5000)), timeout=60)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "maximum context length" in e.value.details()
        assert ("param", "max_tokens") in (call.trailing_metadata() or ())
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.WatchCache(pb.WatchCacheRequest(), timeout=30)))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "does not report a prefix cache" in e.value.details()


@pytest.mark.parametrize("port", ["gateway", "worker"])
def test_no_such_route_is_an_openai_error_too(
    port: str, sim_gateway: Proc, sim_worker: Proc
) -> None:
    """An unknown path (404) or method (405) was aiohttp's plain text (found in review)."""
    base = (sim_gateway if port == "gateway" else sim_worker).ready["http"]
    for method, path, status in (
        ("GET", "/nope", 404),
        ("GET", "/v1/completions", 405),
        ("PATCH", "/v1/chat/completions", 405),
    ):
        req = urllib.request.Request(base + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert (e.value.code, e.value.headers["Content-Type"]) == (status, "application/json")
        err = json.loads(e.value.read())["error"]
        assert err["type"] == "invalid_request_error" and path in err["message"]
        if status == 405:
            assert e.value.headers["Allow"] == "POST"


@pytest.mark.parametrize("port", ["gateway", "worker"])
def test_undecodable_grpc_requests_are_invalid_arguments(
    port: str, sim_gateway: Proc, sim_worker: Proc
) -> None:
    """Bytes that are no request (found in review: UNKNOWN, naming protobuf's DecodeError
    class, with a traceback in the log for every call)."""
    proc = sim_gateway if port == "gateway" else sim_worker
    bad_text = b"\x1a\x02\xff\xfe"  # GenerateRequest.text of bad UTF-8
    with grpc.insecure_channel(proc.ready["grpc"]) as ch:
        methods = [("Generate", True), ("Stats", False), ("WatchCache", True)]
        # the gateway answers WatchCache UNIMPLEMENTED, whatever it is sent
        for method, streams in methods[:2] if port == "gateway" else methods:
            path = f"/breakwater.v1.Inference/{method}"
            call = ch.unary_stream(path) if streams else ch.unary_unary(path)
            for raw in (bad_text, b"\xff" * 5) if method == "Generate" else (b"\xff" * 5,):
                with pytest.raises(grpc.RpcError) as e:
                    out = call(raw, timeout=30)
                    if streams:
                        list(out)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, raw)
                assert "is not a valid" in e.value.details(), e.value.details()
        # and it goes on serving
        out = list(pb_grpc.InferenceStub(ch).Generate(_gen(), timeout=60))
        assert out[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    log = proc.log_text()
    at = log.find("Traceback")
    assert at < 0, log[max(0, at - 400) : at + 3000]  # the whole of it, to say why


def test_a_workers_tokenize_reads_bodies_as_its_generate_routes_do(sim_worker: Proc) -> None:
    """POST /tokenize (vLLM's, which routers call) takes a gzip body too, and the limit."""
    import gzip

    url = sim_worker.ready["http"] + "/tokenize"
    for body, headers in (
        (json.dumps({"prompt": "hello there"}).encode(), {}),
        (
            gzip.compress(json.dumps({"prompt": "hello there"}).encode()),
            {"Content-Encoding": "gzip"},
        ),
    ):
        req = urllib.request.Request(url, body, {"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["count"] > 0
    huge = gzip.compress(json.dumps({"prompt": "a" * (8 << 20)}).encode())
    req = urllib.request.Request(url, huge, {"Content-Encoding": "gzip"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413
    # Another model's name is a 404, and ids outside the vocabulary a 400, as generate
    # answers them (both were a 200 that echoed the ids).
    for body, status, param in (
        ({"model": "not-this-one", "prompt": "hi"}, 404, "model"),
        ({"prompt": [1, 2, 99_999_999]}, 400, "prompt"),
    ):
        req = urllib.request.Request(url, json.dumps(body).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == status, body
        assert json.loads(e.value.read())["error"]["param"] == param
