"""Hostile and malformed OpenAI requests are refused with a 400 (413 for the body) that
names the offending field, never a 500: the parsers, the shared HTTP routes in process,
and property tests over arbitrary JSON for the parsers, the SSE encoder and the reverse
mapping used to front OpenAI-compatible servers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from proto import inference_pb2 as pb
from proto.limits import DEFAULT_LIMITS, MiB, RequestLimits
from proto.openai_compat import (
    MAX_SESSION_KEY,
    ROLES,
    OpenAIError,
    ParsedRequest,
    ResponseBuilder,
    check_generate,
    from_openai_chunk,
    parse_chat,
    parse_completion,
    session_key,
    sse,
    to_openai_body,
)
from serving.calls import CallInfo
from serving.openai_http import OpenAIRoutes
from serving.openapi import build_openapi

L = DEFAULT_LIMITS
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def chat(**fields: Any) -> dict[str, Any]:
    return {**CHAT, **fields}


def comp(**fields: Any) -> dict[str, Any]:
    return {**COMPLETION, **fields}


def msg(content: Any = "hi", role: Any = "user", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


PARSERS = {"chat": parse_chat, "completion": parse_completion}

# (endpoint, body, param named in the 400)
HOSTILE: list[tuple[str, Any, str | None]] = [
    # the body itself
    ("chat", [], None),
    ("chat", "a string", None),
    ("chat", None, None),
    ("completion", 42, None),
    ("completion", [COMPLETION], None),
    # model
    ("chat", {"messages": CHAT["messages"]}, "model"),
    ("chat", chat(model=123), "model"),
    ("chat", chat(model=["m"]), "model"),
    ("chat", chat(model="m" * (L.max_model_chars + 1)), "model"),
    # messages: shape, count, roles, content
    ("chat", chat(messages="hi"), "messages"),
    ("chat", chat(messages={"role": "user", "content": "hi"}), "messages"),
    ("chat", chat(messages=[]), "messages"),
    ("chat", chat(messages=[msg()] * (L.max_messages + 1)), "messages"),
    ("chat", chat(messages=[1]), "messages[0]"),
    ("chat", chat(messages=[msg(), ["user", "hi"]]), "messages[1]"),
    ("chat", chat(messages=[{"content": "hi"}]), "messages[0].role"),
    ("chat", chat(messages=[msg(role="wizard")]), "messages[0].role"),
    ("chat", chat(messages=[msg(role=5)]), "messages[0].role"),
    ("chat", chat(messages=[msg(role=["user"])]), "messages[0].role"),
    ("chat", chat(messages=[msg(content=5)]), "messages[0].content"),
    ("chat", chat(messages=[msg(content=True)]), "messages[0].content"),
    ("chat", chat(messages=[msg(content={"text": "x"})]), "messages[0].content"),
    ("chat", chat(messages=[msg(content=[["nested"]])]), "messages[0].content"),
    ("chat", chat(messages=[msg(content=["plain string part"])]), "messages[0].content"),
    (
        "chat",
        chat(messages=[msg(content=[{"type": "text", "text": ["x"]}])]),
        "messages[0].content",
    ),
    ("chat", chat(messages=[msg(content=[{"type": "text", "text": 7}])]), "messages[0].content"),
    (
        "chat",
        chat(messages=[msg(content=[{"type": "image_url", "image_url": {"url": "x"}}])]),
        "messages[0].content",
    ),
    ("chat", chat(messages=[msg(content="x" * (L.max_message_chars + 1))]), "messages[0].content"),
    ("chat", chat(messages=[msg(content="x" * L.max_message_chars)] * 3), "messages"),
    # sampling numbers
    ("chat", chat(temperature="0.5"), "temperature"),
    ("chat", chat(temperature=3), "temperature"),
    ("chat", chat(temperature=-0.1), "temperature"),
    ("chat", chat(temperature=10**400), "temperature"),
    ("chat", chat(temperature=float("nan")), "temperature"),
    ("chat", chat(temperature=float("inf")), "temperature"),
    ("chat", chat(temperature=[1]), "temperature"),
    ("chat", chat(temperature=True), "temperature"),
    ("chat", chat(top_p=0), "top_p"),
    ("chat", chat(top_p=1e-50), "top_p"),
    ("chat", chat(top_p=1.5), "top_p"),
    ("chat", chat(top_k="1"), "top_k"),
    ("chat", chat(top_k=2**40), "top_k"),
    ("chat", chat(top_k=-2), "top_k"),
    ("chat", chat(seed=2**70), "seed"),
    ("chat", chat(seed=1.5), "seed"),
    ("chat", chat(presence_penalty=1), "presence_penalty"),
    ("chat", chat(frequency_penalty="x"), "frequency_penalty"),
    ("chat", chat(logit_bias={"1": 5}), "logit_bias"),
    # stream
    ("chat", chat(stream="true"), "stream"),
    ("chat", chat(stream=1), "stream"),
    ("chat", chat(stream=False, stream_options={"include_usage": True}), "stream_options"),
    ("chat", chat(stream=True, stream_options=[]), "stream_options"),
    (
        "chat",
        chat(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
    ),
    # max_tokens
    ("chat", chat(max_tokens=0), "max_tokens"),
    ("chat", chat(max_tokens=-1), "max_tokens"),
    ("chat", chat(max_tokens=L.max_tokens + 1), "max_tokens"),
    ("chat", chat(max_tokens="10"), "max_tokens"),
    ("chat", chat(max_tokens=1.5), "max_tokens"),
    ("chat", chat(max_tokens=True), "max_tokens"),
    ("chat", chat(max_completion_tokens=10**6), "max_completion_tokens"),
    ("chat", chat(max_completion_tokens=8, max_tokens=10**6), "max_tokens"),
    ("completion", comp(max_tokens=L.max_tokens + 1), "max_tokens"),
    ("completion", comp(max_tokens=0), "max_tokens"),
    # stop
    ("chat", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("chat", chat(stop="x" * (L.max_stop_chars + 1)), "stop"),
    ("chat", chat(stop=5), "stop"),
    ("chat", chat(stop=[["a"]]), "stop"),
    ("chat", chat(stop=[""]), "stop"),
    ("chat", chat(stop=""), "stop"),
    ("chat", chat(stop={"a": 1}), "stop"),
    ("chat", chat(stop=[1]), "stop"),
    ("completion", comp(stop_token_ids="1"), "stop_token_ids"),
    ("completion", comp(stop_token_ids=[-1]), "stop_token_ids"),
    ("completion", comp(stop_token_ids=[2**31]), "stop_token_ids"),
    ("completion", comp(stop_token_ids=[True]), "stop_token_ids"),
    ("completion", comp(stop_token_ids=[0] * (L.max_stop_token_ids + 1)), "stop_token_ids"),
    # logprobs, n, best_of
    ("chat", chat(logprobs="yes"), "logprobs"),
    ("chat", chat(logprobs=1), "logprobs"),
    ("chat", chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("chat", chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("chat", chat(logprobs=True, top_logprobs="5"), "top_logprobs"),
    ("chat", chat(top_logprobs=3), "top_logprobs"),  # needs logprobs: true, as OpenAI's
    ("chat", chat(tool_choice="auto"), "tool_choice"),  # nothing to choose from (vLLM's rule)
    ("chat", chat(tool_choice={"type": "function", "function": {"name": "f"}}), "tool_choice"),
    ("chat", chat(function_call={"name": "f"}), "function_call"),
    ("chat", chat(logprobs=False, top_logprobs=0), "top_logprobs"),
    ("completion", comp(logprobs=21), "logprobs"),
    ("completion", comp(logprobs=True), "logprobs"),
    ("completion", comp(logprobs=-1), "logprobs"),
    ("chat", chat(n=2), "n"),
    ("chat", chat(n=0), "n"),
    ("chat", chat(n="2"), "n"),
    ("completion", comp(best_of=2), "best_of"),
    ("completion", comp(best_of=0), "best_of"),
    # flags, priority, user
    ("chat", chat(ignore_eos="no"), "ignore_eos"),
    ("chat", chat(include_stop_str_in_output=0), "include_stop_str_in_output"),
    ("chat", chat(skip_special_tokens=1), "skip_special_tokens"),
    ("chat", chat(priority=[]), "priority"),
    ("chat", chat(priority={"a": 1}), "priority"),
    ("chat", chat(priority=True), "priority"),
    ("chat", chat(priority="urgent"), "priority"),
    ("chat", chat(priority=2), "priority"),
    ("chat", chat(user=5), "user"),
    # completion prompts
    ("completion", {"model": "m"}, "prompt"),
    ("completion", comp(prompt=""), "prompt"),
    ("completion", comp(prompt=5), "prompt"),
    ("completion", comp(prompt={"text": "hi"}), "prompt"),
    ("completion", comp(prompt=[]), "prompt"),
    ("completion", comp(prompt=["a", "b"]), "prompt"),
    ("completion", comp(prompt=["a"] * 10_000), "prompt"),
    ("completion", comp(prompt=[[1], [2]]), "prompt"),
    ("completion", comp(prompt=[1, "a"]), "prompt"),
    ("completion", comp(prompt=[[["a"]]]), "prompt"),
    ("completion", comp(prompt=[[]]), "prompt"),
    ("completion", comp(prompt=[""]), "prompt"),
    ("completion", comp(prompt=[-1]), "prompt"),
    ("completion", comp(prompt=[2**31]), "prompt"),
    ("completion", comp(prompt=[2**64]), "prompt"),
    ("completion", comp(prompt=[True]), "prompt"),
    ("completion", comp(prompt=[1.0]), "prompt"),
    ("completion", comp(prompt=[None]), "prompt"),
    ("completion", comp(prompt=[1] * (L.max_prompt_token_ids + 1)), "prompt"),
    ("completion", comp(prompt=[[1] * (L.max_prompt_token_ids + 1)]), "prompt"),
    ("completion", comp(prompt="x" * (L.max_prompt_chars + 1)), "prompt"),
    ("completion", comp(echo=True), "echo"),
    ("completion", comp(suffix="x"), "suffix"),
    # falsy values of the wrong type: the OpenAPI document calls them invalid, so they are
    ("completion", comp(echo=0), "echo"),
    ("completion", comp(echo="yes"), "echo"),
    ("completion", comp(suffix=0), "suffix"),
    ("chat", chat(logit_bias=""), "logit_bias"),
    ("chat", chat(logit_bias=[1]), "logit_bias"),
    # tools and structured output: shapes (what they ask is ParsedRequest.unsupported)
    ("chat", chat(tools="x"), "tools"),
    ("chat", chat(tools=[1]), "tools"),
    ("chat", chat(tools={"type": "function"}), "tools"),
    ("chat", chat(tool_choice="sometimes"), "tool_choice"),
    ("chat", chat(tool_choice=1), "tool_choice"),
    ("chat", chat(functions="f"), "functions"),
    ("chat", chat(function_call=["f"]), "function_call"),
    ("chat", chat(response_format="json_object"), "response_format"),
    ("chat", chat(response_format={"type": 1}), "response_format"),
    ("completion", comp(response_format={}), "response_format"),
]


def _id(case: tuple[str, Any, str | None]) -> str:
    kind, _, param = case
    return f"{kind}-{param}"


@pytest.mark.parametrize(("kind", "body", "param"), HOSTILE, ids=[_id(c) for c in HOSTILE])
def test_hostile_body_is_a_400_naming_the_field(kind: str, body: Any, param: str | None) -> None:
    with pytest.raises(OpenAIError) as e:
        PARSERS[kind](body)
    assert e.value.status == 400
    assert e.value.param == param
    err = e.value.body()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    # Short enough to log and return: a refused value is never echoed back whole.
    assert len(err["message"]) < 300


# What real clients send stays inside the limits (and unknown fields are ignored).
ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("chat", chat()),
    (
        "chat",
        chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice="auto",
            response_format={"type": "json_object"},
            metadata={"a": "b"},
            store=False,
            parallel_tool_calls=True,
            service_tier="auto",
            unknown_field={"deeply": [{"nested": [1, 2, None]}]},
        ),
    ),
    ("chat", chat(messages=[msg(role=r) for r in sorted(ROLES)])),
    ("chat", chat(messages=[msg(name="alice"), msg(None, "assistant", tool_calls=[])])),
    ("chat", chat(messages=[msg([{"type": "text", "text": "a"}, {"type": "text"}])])),
    ("chat", chat(messages=[msg()] * L.max_messages)),
    ("chat", chat(messages=[msg("x" * L.max_message_chars)] * 2)),
    ("chat", chat(max_tokens=L.max_tokens, temperature=2, top_p=1, top_k=-1, seed=-1)),
    ("chat", chat(max_completion_tokens=1, max_tokens=None)),
    ("chat", chat(stop=["x" * L.max_stop_chars] * L.max_stop)),
    ("chat", chat(stop=None, stop_token_ids=[0, 2**31 - 1])),
    ("chat", chat(stop=[])),
    ("chat", chat(logprobs=True, top_logprobs=L.max_logprobs)),
    ("chat", chat(logprobs=False, top_logprobs=None)),
    ("chat", chat(n=1, best_of=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={})),
    ("chat", chat(stream=True, stream_options={"include_usage": True})),
    ("chat", chat(priority="batch", user="u" * 10_000, ignore_eos=False)),
    ("chat", chat(priority=1, skip_special_tokens=True, include_stop_str_in_output=True)),
    ("completion", comp()),
    ("completion", comp(prompt=["hello"])),
    ("completion", comp(prompt=[1, 2, 3])),
    ("completion", comp(prompt=[[1, 2, 3]])),
    ("completion", comp(prompt=[0] * L.max_prompt_token_ids)),
    ("completion", comp(prompt="x" * L.max_prompt_chars)),
    ("completion", comp(logprobs=L.max_logprobs, echo=False, suffix=None, max_tokens=None)),
]


@pytest.mark.parametrize(("kind", "body"), ACCEPTED)
def test_what_clients_send_is_accepted(kind: str, body: dict[str, Any]) -> None:
    parsed = PARSERS[kind](body)
    parsed.request.SerializeToString()  # every value fits the wire contract


def test_parsed_values() -> None:
    p = parse_completion(comp(prompt=[[5, 6]], max_tokens=None))
    assert list(p.request.token_ids.ids) == [5, 6]
    assert p.request.sampling.max_tokens == 16
    p = parse_chat(chat(max_completion_tokens=7, max_tokens=9))
    assert p.request.sampling.max_tokens == 7  # the newer name wins
    p = parse_chat(chat(logprobs=True))
    assert p.logprobs == 0 and p.request.sampling.logprobs == 0
    p = parse_chat(chat(logprobs=False))
    assert p.logprobs is None and not p.request.sampling.HasField("logprobs")
    # null is "not set" for stream too (a 400 before), as OpenAI and vLLM take it
    assert parse_chat(chat(stream=None)).stream is False
    assert parse_completion(comp(stream=None)).stream is False
    # text parts one per line, as vLLM joins them (they ran together), and the parts vLLM
    # takes as text: an assistant turn replayed with its refusal was a 400
    parts = [
        {"type": "text", "text": "Hello world."},
        {"type": "input_text", "text": "What is this?"},
        {"type": "refusal", "refusal": "I can't."},
    ]
    p = parse_chat(chat(messages=[msg(parts)]))
    assert p.request.chat.messages[0].content == "Hello world.\nWhat is this?\nI can't."


TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}


@pytest.mark.parametrize(
    ("kind", "body", "param"),
    [
        ("chat", chat(tools=[TOOL]), "tools"),
        ("chat", chat(tools=[TOOL], tool_choice="auto"), "tools"),
        ("chat", chat(tools=[TOOL], tool_choice="required"), "tools"),
        ("chat", chat(tools=[TOOL], tool_choice={"type": "function"}), "tools"),
        ("chat", chat(functions=[TOOL["function"]]), "functions"),
        ("chat", chat(response_format={"type": "json_object"}), "response_format"),
        ("completion", comp(response_format={"type": "json_schema"}), "response_format"),
        ("chat", chat(tools=[], response_format={"type": "json_object"}), "response_format"),
        ("chat", chat(tools=[TOOL], tool_choice="none"), None),
        ("chat", chat(tools=[], functions=None, response_format={"type": "text"}), None),
        ("completion", comp(tools=[TOOL]), None),  # not a completions field: ignored
        ("chat", chat(tools=[], tool_choice="required"), None),  # nothing to call: text
        ("chat", chat(repetition_penalty=1.2), "repetition_penalty"),
        ("completion", comp(min_tokens=4), "min_tokens"),
        ("completion", comp(min_p=0.1), "min_p"),
        ("chat", chat(allowed_token_ids=[5]), "allowed_token_ids"),
        ("chat", chat(prompt_logprobs=1), "prompt_logprobs"),
        ("chat", chat(use_beam_search=True), "use_beam_search"),
        # the values that ask for nothing, as a router that re-serializes bodies sends them
        ("chat", chat(repetition_penalty=1.0, min_p=0.0, min_tokens=0, bad_words=[]), None),
        ("completion", comp(use_beam_search=False, truncate_prompt_tokens=None), None),
    ],
)
def test_what_the_engine_cannot_do_is_named_for_it(
    kind: str, body: dict[str, Any], param: str | None
) -> None:
    """Parsed (the gateway relays such a body to an OpenAI upstream as is), with the refusal
    a Breakwater engine answers with."""
    parsed = PARSERS[kind](body)
    if param is None:
        assert parsed.unsupported is None
    else:
        assert parsed.unsupported is not None
        assert (parsed.unsupported.status, parsed.unsupported.param) == (400, param)
        assert "not supported by Breakwater's engine" in parsed.unsupported.message


def test_limits_are_configurable() -> None:
    tight = RequestLimits(max_messages=2, max_tokens=8, max_stop=1, max_prompt_token_ids=3)
    parse_chat(chat(messages=[msg()] * 2, max_tokens=8, stop="a"), tight)
    for body, param in [
        (chat(messages=[msg()] * 3), "messages"),
        (chat(max_tokens=9), "max_tokens"),
        (chat(stop=["a", "b"]), "stop"),
    ]:
        with pytest.raises(OpenAIError) as e:
            parse_chat(body, tight)
        assert e.value.param == param
    with pytest.raises(OpenAIError) as e:
        parse_completion(comp(prompt=[1, 2, 3, 4]), tight)
    assert e.value.param == "prompt"


# -- the shared HTTP routes, in process ------------------------------------------------------


class _Backend:
    """One-delta answers for model "m"."""

    def models(self) -> list[str]:
        return ["m"]

    def has_model(self, model: str) -> bool:
        return model == "m"

    def workers(self) -> list[dict[str, Any]]:
        return []

    def is_ready(self, model: str | None = None) -> bool:
        return True

    async def generate(
        self, request: pb.GenerateRequest, timeout: float | None, info: CallInfo | None = None
    ) -> AsyncIterator[pb.GenerateResponse]:
        yield pb.GenerateResponse(
            request_id=request.request_id,
            text="ok",
            token_ids=[1],
            finish_reason=pb.FINISH_REASON_STOP,
            usage=pb.Usage(prompt_tokens=1, completion_tokens=1),
        )


async def _http_cases(limits: RequestLimits) -> list[tuple[int, dict[str, Any]]]:
    app = web.Application(client_max_size=64)  # the routes' own bound applies, not this
    OpenAIRoutes(_Backend(), limits=limits).add_to(app)
    async with TestClient(TestServer(app)) as client:

        async def post(data: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
            r = await client.post("/v1/chat/completions", data=data, **kw)
            assert r.content_type == "application/json"
            return r.status, await r.json()

        async def chunked() -> AsyncIterator[bytes]:
            for _ in range(limits.max_body_bytes // 1000 + 2):
                yield b" " * 1000

        return [
            await post(orjson.dumps(chat())),
            await post(b" " * (limits.max_body_bytes + 1)),
            await post(chunked()),  # no Content-Length: counted while read
            await post(b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
            await post(b"{not json"),
            await post(b""),
            await post(b"[" * 1500 + b"]" * 1500),  # deeper than orjson nests
            await post(orjson.dumps(chat(messages="hi"))),
            await post(orjson.dumps(chat(priority=[]))),
            await post(b" " * 100 + orjson.dumps(chat())),  # within the limit: still served
        ]


def test_http_routes_answer_hostile_bodies_with_json_errors() -> None:
    limits = RequestLimits(max_body_bytes=4096)
    results = asyncio.run(_http_cases(limits))
    ok, big, streamed, utf8, bad_json, empty, deep, wrong, unhashable, last = results
    assert ok[0] == 200 and ok[1]["choices"][0]["message"]["content"] == "ok"
    for status, body in (big, streamed):
        assert status == 413
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["code"] == "request_too_large"
        assert "4096 bytes" in body["error"]["message"]
    for status, body in (utf8, bad_json, empty, deep):
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert wrong == (400, wrong[1]) and wrong[1]["error"]["param"] == "messages"
    assert unhashable[0] == 400 and unhashable[1]["error"]["param"] == "priority"
    assert last[0] == 200


# -- properties ------------------------------------------------------------------------------

PROPS = settings(max_examples=200, deadline=None)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["user", "text", "batch", "stop", "m", ""])
)
jsonish = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "seed", "n", "best_of", "stop", "stop_token_ids", "logprobs",
    "top_logprobs", "stream", "stream_options", "priority", "user", "ignore_eos",
    "skip_special_tokens", "include_stop_str_in_output", "presence_penalty", "logit_bias",
    "echo", "suffix", "role", "content", "type", "text", "include_usage",
]  # fmt: skip
keys = st.sampled_from(FIELDS) | st.text(max_size=8)
messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name"]), jsonish | st.sampled_from(sorted(ROLES))
    ),
    max_size=4,
)
bodies = st.one_of(
    jsonish,
    st.dictionaries(keys, jsonish, max_size=8),
    st.builds(
        lambda extra, m: {**CHAT, "messages": m, **extra},
        st.dictionaries(keys, jsonish, max_size=6),
        messages,
    ),
    st.builds(lambda extra: {**COMPLETION, **extra}, st.dictionaries(keys, jsonish, max_size=6)),
)


# Bodies of the right shape, so that the properties also cover requests that parse.
sampling = st.fixed_dictionaries(
    {},
    optional={
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "top_k": st.integers(-1, 2**31 - 1),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "max_tokens": st.integers(1, L.max_tokens),
        "stop": st.text(min_size=1, max_size=8)
        | st.lists(st.text(min_size=1, max_size=8), max_size=L.max_stop),
        "stop_token_ids": st.lists(st.integers(0, 2**31 - 1), max_size=4),
        "ignore_eos": st.booleans(),
        "user": st.text(max_size=8),
        "stream": st.booleans(),
    },
)
well_formed_chat = st.builds(
    lambda m, s, lp: {"model": "m", "messages": m, **s, **lp},
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(sorted(ROLES)), "content": st.text(max_size=20)}
        ),
        min_size=1,
        max_size=4,
    ),
    sampling,
    st.fixed_dictionaries(
        {}, optional={"logprobs": st.booleans(), "top_logprobs": st.integers(0, L.max_logprobs)}
    ),
)
well_formed_completion = st.builds(
    lambda p, s, lp: {"model": "m", "prompt": p, **s, **lp},
    st.text(min_size=1, max_size=20) | st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=8),
    sampling,
    st.fixed_dictionaries({}, optional={"logprobs": st.integers(0, L.max_logprobs)}),
)
requests = st.one_of(
    st.tuples(st.sampled_from(["chat", "completion"]), bodies),
    st.tuples(st.just("chat"), well_formed_chat),
    st.tuples(st.just("completion"), well_formed_completion),
)


def _parse_or_refuse(kind: str, body: Any) -> ParsedRequest | None:
    try:
        parsed = PARSERS[kind](body)
    except OpenAIError as e:
        assert e.status == 400 and e.type == "invalid_request_error"
        return None
    parsed.request.SerializeToString()
    check_generate(parsed.request)  # what HTTP accepts, the gRPC front end does too
    return parsed


@PROPS
@given(request=requests)
def test_parsers_raise_only_openai_errors(request: tuple[str, Any]) -> None:
    """Any JSON value: a parsed request that fits the wire, or a clean 400."""
    _parse_or_refuse(*request)


def _sampling(req: pb.GenerateRequest) -> dict[str, Any]:
    sp = req.sampling
    names = ("temperature", "top_p", "top_k", "seed", "max_tokens", "logprobs")
    fields = {n: getattr(sp, n) for n in names if sp.HasField(n)}
    return {
        **fields,
        "stop": list(sp.stop),
        "stop_token_ids": list(sp.stop_token_ids),
        "ignore_eos": sp.ignore_eos,
    }


@PROPS
@given(request=requests)
def test_to_openai_body_reparses_to_the_same_request(request: tuple[str, Any]) -> None:
    """What the gateway sends an OpenAI-compatible upstream passes the same validation and
    means the same: prompt and sampling survive the round trip."""
    parsed = _parse_or_refuse(*request)
    if parsed is None:
        return
    path, out = to_openai_body(parsed.request)
    again = (parse_chat if path.endswith("chat/completions") else parse_completion)(
        orjson.loads(orjson.dumps(out))
    )
    a, b = parsed.request, again.request
    assert a.WhichOneof("prompt") == b.WhichOneof("prompt")
    assert (a.text, a.token_ids, a.chat.messages) == (b.text, b.token_ids, b.chat.messages)
    assert _sampling(a) == _sampling(b)


chunks = st.one_of(
    jsonish,
    st.fixed_dictionaries(
        {},
        optional={
            "choices": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "delta": jsonish | st.dictionaries(st.just("content"), jsonish),
                        "text": jsonish,
                        "finish_reason": jsonish | st.sampled_from(["stop", "length", "x"]),
                    },
                )
                | jsonish,
                max_size=2,
            )
            | jsonish,
            "usage": st.dictionaries(
                st.sampled_from(["prompt_tokens", "completion_tokens", "prompt_tokens_details"]),
                jsonish
                | st.integers(0, 2**31 - 1)
                | st.dictionaries(st.just("cached_tokens"), jsonish),
            )
            | jsonish,
        },
    ),
)


@PROPS
@given(chunk=chunks)
def test_from_openai_chunk_raises_only_clean_errors(chunk: Any) -> None:
    try:
        delta = from_openai_chunk(chunk, "r")
    except OpenAIError as e:
        assert e.status == 502 and e.type == "upstream_error"
        return
    delta.SerializeToString()


def test_from_openai_chunk_reads_well_formed_chunks() -> None:
    d = from_openai_chunk({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]}, "r")
    assert d.text == "hi" and not d.finish_reason
    d = from_openai_chunk(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 1},
            },
        },
        "r",
    )
    assert (d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.cached_prompt_tokens) == (
        3,
        2,
        1,
    )
    d = from_openai_chunk({"choices": [{"text": "x", "finish_reason": "length"}]}, "r")
    assert d.text == "x" and d.finish_reason == pb.FINISH_REASON_LENGTH


def _sse_events(stream: bytes) -> list[str]:
    """Events' data as a client following the SSE spec reads them."""
    events: list[str] = []
    data: list[str] = []
    for line in re.split(r"\r\n|\r|\n", stream.decode()):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    return events


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=16,
)


@PROPS
@given(payload=st.dictionaries(st.text(), json_values, max_size=6))
def test_sse_json_payload_round_trips_as_one_event(payload: dict[str, Any]) -> None:
    encoded = sse(payload)
    assert encoded.startswith(b"data: ") and encoded.endswith(b"\n\n")
    assert b"\n" not in encoded[:-2] and b"\r" not in encoded
    assert [orjson.loads(e) for e in _sse_events(encoded)] == [payload]
    # Events written back to back stay apart.
    assert len(_sse_events(encoded + sse({"next": 1}))) == 2


@PROPS
@given(text=st.text())
def test_sse_text_payload_round_trips_as_one_event(text: str) -> None:
    encoded = sse(text)
    assert encoded.endswith(b"\n\n") and b"\n\n" not in encoded[:-2]
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert _sse_events(encoded) == [expected]


def test_sse_done_is_unchanged() -> None:
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_body_limit_default_is_four_mib() -> None:
    assert RequestLimits().max_body_bytes == 4 * MiB


# -- the gRPC front end's bounds (check_generate) ---------------------------------------------


def _gen(**fields: Any) -> pb.GenerateRequest:
    """A Generate request for "hi", with `fields` set (`sampling` merged)."""
    req = pb.GenerateRequest(model="m", text="hi")
    for name, value in fields.items():
        if name == "sampling":
            req.sampling.MergeFrom(value)
        else:
            setattr(req, name, value)
    return req


def _chat(*messages: tuple[str, str]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="m",
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages]),
    )


def _ids(ids: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="m", token_ids=pb.TokenIds(ids=ids))


SP = pb.SamplingParams
GRPC_HOSTILE: list[tuple[pb.GenerateRequest, str]] = [
    (pb.GenerateRequest(model="m"), "prompt"),
    (_gen(text=""), "text"),
    (_gen(text="x" * (L.max_prompt_chars + 1)), "text"),
    (_ids([]), "token_ids"),
    (_ids([1] * (L.max_prompt_token_ids + 1)), "token_ids"),
    (_ids([3, -1]), "token_ids"),
    (pb.GenerateRequest(model="m", chat=pb.ChatMessages()), "chat.messages"),
    (_chat(*[("user", "x")] * (L.max_messages + 1)), "chat.messages"),
    (_chat(("user", "x"), ("wizard", "x")), "chat.messages[1].role"),
    (_chat(("", "x")), "chat.messages[0].role"),
    (_chat(("user", "x" * (L.max_message_chars + 1))), "chat.messages[0].content"),
    (_chat(*[("user", "x" * L.max_message_chars)] * 3), "chat.messages"),
    (_gen(model="m" * (L.max_model_chars + 1)), "model"),
    (_gen(request_id="é"), "request_id"),
    (_gen(request_id="a\nb"), "request_id"),
    (_gen(request_id="r" * (L.max_request_id_chars + 1)), "request_id"),
    (_gen(sampling=SP(max_tokens=0)), "sampling.max_tokens"),
    (_gen(sampling=SP(max_tokens=-5)), "sampling.max_tokens"),
    (_gen(sampling=SP(max_tokens=L.max_tokens + 1)), "sampling.max_tokens"),
    (_gen(sampling=SP(temperature=float("nan"))), "sampling.temperature"),
    (_gen(sampling=SP(temperature=2.5)), "sampling.temperature"),
    (_gen(sampling=SP(temperature=-1)), "sampling.temperature"),
    (_gen(sampling=SP(top_p=0)), "sampling.top_p"),
    (_gen(sampling=SP(top_p=1e-50)), "sampling.top_p"),
    (_gen(sampling=SP(top_p=1.5)), "sampling.top_p"),
    (_gen(sampling=SP(top_k=-2)), "sampling.top_k"),
    (_gen(sampling=SP(logprobs=L.max_logprobs + 1)), "sampling.logprobs"),
    (_gen(sampling=SP(logprobs=-1)), "sampling.logprobs"),
    (_gen(sampling=SP(stop=["a"] * (L.max_stop + 1))), "sampling.stop"),
    (_gen(sampling=SP(stop=[""])), "sampling.stop"),
    (_gen(sampling=SP(stop=["x" * (L.max_stop_chars + 1)])), "sampling.stop"),
    (_gen(sampling=SP(stop_token_ids=[-1])), "sampling.stop_token_ids"),
    (_gen(sampling=SP(stop_token_ids=[0] * (L.max_stop_token_ids + 1))), "sampling.stop_token_ids"),
    (_gen(priority=7), "priority"),
]


@pytest.mark.parametrize(("req", "param"), GRPC_HOSTILE, ids=[p for _, p in GRPC_HOSTILE])
def test_grpc_request_out_of_bounds_is_a_400_naming_the_field(
    req: pb.GenerateRequest, param: str
) -> None:
    with pytest.raises(OpenAIError) as e:
        check_generate(req)
    assert (e.value.status, e.value.param) == (400, param)
    assert param in e.value.message  # gRPC callers see the message, not the param
    assert len(e.value.message) < 300


@pytest.mark.parametrize(
    "req",
    [
        _gen(),
        _gen(model=""),  # a worker's own model
        _gen(text="x" * L.max_prompt_chars, request_id="r" * L.max_request_id_chars),
        _ids([0, L.max_token_id]),
        _chat(*[(r, "x") for r in sorted(ROLES)]),
        _chat(("user", "")),
        _gen(
            session_key="s" * 10_000,  # truncated for routing, never refused
            priority=pb.PRIORITY_BATCH,
            sampling=SP(
                max_tokens=L.max_tokens,
                temperature=2,
                top_p=1,
                top_k=-1,
                logprobs=L.max_logprobs,
                stop=["x" * L.max_stop_chars] * L.max_stop,
                stop_token_ids=[0] * L.max_stop_token_ids,
            ),
        ),
    ],
)
def test_grpc_request_in_bounds_passes(req: pb.GenerateRequest) -> None:
    check_generate(req)


def test_session_key_is_stable_valid_utf8() -> None:
    """An HTTP header's undecodable bytes arrive as lone surrogates, which protobuf refuses."""
    raw = "\udce9caf\udcc3" * 100
    key = session_key(raw)
    assert key == session_key(raw) and len(key) <= MAX_SESSION_KEY
    pb.GenerateRequest(session_key=key).SerializeToString()
    assert session_key("plain") == "plain"


async def _header_cases() -> list[tuple[int, dict[str, Any]]]:
    routes = OpenAIRoutes(_Backend())
    app = web.Application()
    routes.add_to(app)
    async with TestClient(TestServer(app)) as client:

        async def post(**headers: str) -> tuple[int, dict[str, Any]]:
            body = orjson.dumps(chat())
            r = await client.post("/v1/chat/completions", data=body, headers=headers)
            assert r.content_type == "application/json"
            return r.status, await r.json()

        return [
            await post(**{"X-Request-Id": "r" * (L.max_request_id_chars + 1)}),
            await post(**{"X-Request-Id": "a\tb"}),
            await post(**{"X-Request-Id": "r" * L.max_request_id_chars}),
            await post(**{"X-Request-Timeout-Ms": "nan"}),
            await post(**{"X-Request-Timeout-Ms": "inf"}),  # the server's maximum
        ]


def test_http_routes_refuse_hostile_headers() -> None:
    long_id, tab, fits, nan, inf = asyncio.run(_header_cases())
    for status, body in (long_id, tab):
        assert (status, body["error"]["param"]) == (400, "X-Request-Id")
    assert fits[0] == 200 and fits[1]["id"] == "chatcmpl-" + "r" * L.max_request_id_chars
    assert nan[0] == 400 and "X-Request-Timeout-Ms" in nan[1]["error"]["message"]
    assert inf[0] == 200


# -- the OpenAPI document says what the parsers accept ----------------------------------------


async def _served_document(limits: RequestLimits, metrics: bool) -> dict[str, Any]:
    app = web.Application()
    OpenAIRoutes(_Backend(), limits=limits).add_to(app)
    if metrics:

        async def metrics_page(request: web.Request) -> web.Response:
            return web.Response(text="")

        app.router.add_get("/metrics", metrics_page)
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/openapi.json")
        assert r.status == 200 and r.content_type == "application/json"
        return await r.json()


def test_served_document_follows_the_limits() -> None:
    tight = RequestLimits(max_messages=3, max_tokens=9, max_stop=2, max_prompt_token_ids=5)
    doc = asyncio.run(_served_document(tight, metrics=False))
    assert doc == orjson.loads(orjson.dumps(build_openapi(tight, metrics=False)))
    assert "/metrics" not in doc["paths"]
    schemas = doc["components"]["schemas"]
    chat_fields = schemas["ChatCompletionRequest"]["properties"]
    assert chat_fields["messages"]["maxItems"] == 3
    assert chat_fields["max_tokens"]["anyOf"][0]["maximum"] == 9
    assert chat_fields["stop"]["anyOf"][0]["anyOf"][1]["maxItems"] == 2
    assert schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"][1]["maxItems"] == 5
    assert "/metrics" in asyncio.run(_served_document(tight, metrics=True))["paths"]


def _integral_float(value: Any) -> bool:
    """JSON Schema's `integer` takes 8.0; the parsers (like the wire) take only 8."""
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, list):
        return any(_integral_float(v) for v in value)
    if isinstance(value, dict):
        return any(_integral_float(v) for v in value.values())
    return False


def test_document_request_schemas_agree_with_the_parsers() -> None:
    """For any body: the parser accepts it exactly when the document's schema does (short of
    integers written as 8.0, which JSON Schema cannot tell apart)."""
    jsonschema = pytest.importorskip("jsonschema")  # with openapi-spec-validator, dev extra
    doc = build_openapi()
    validators = {
        kind: jsonschema.Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        )
        for kind, name in (("chat", "ChatCompletionRequest"), ("completion", "CompletionRequest"))
    }

    @PROPS
    @given(request=requests)
    def agree(request: tuple[str, Any]) -> None:
        kind, body = request
        accepted = _parse_or_refuse(kind, body) is not None
        valid = validators[kind].is_valid(body)
        if accepted or not _integral_float(body):
            assert accepted == valid, (kind, body)

    agree()


def test_an_upstream_chunks_stop_reason_is_kept() -> None:
    chunk = {"choices": [{"index": 0, "text": "", "finish_reason": "stop", "stop_reason": "END"}]}
    assert from_openai_chunk(chunk, "r").stop_reason == "END"
    chunk["choices"][0]["stop_reason"] = 128001  # a stop token id
    assert from_openai_chunk(chunk, "r").stop_reason == "128001"


def test_completion_logprobs_list_the_sampled_token_with_its_alternatives() -> None:
    """As OpenAI's legacy completions and vLLM: `logprobs: N` gives the sampled token and N
    alternatives (before, the sampled one was missing, and `logprobs: 0` gave `{}`); a -inf
    log probability is written as -9999.0, not null."""
    top = [pb.TopLogprob(token="b", logprob=-1.0), pb.TopLogprob(token="c", logprob=-3.0)]
    lps = [
        pb.TokenLogprob(token="a", logprob=-2.0, top=top),
        pb.TokenLogprob(token="b", logprob=-1.0, top=top),
        pb.TokenLogprob(token="d", logprob=float("-inf")),
    ]
    built = ResponseBuilder(parse_completion(comp(logprobs=2)), "r", "m")
    built.add(pb.GenerateResponse(text="abd", logprobs=lps, finish_reason=pb.FINISH_REASON_STOP))
    out = orjson.loads(orjson.dumps(built.whole()))["choices"][0]["logprobs"]
    assert out["top_logprobs"] == [
        {"a": -2.0, "b": -1.0, "c": -3.0},
        {"b": -1.0, "c": -3.0},
        {"d": -9999.0},
    ]
    assert out["token_logprobs"] == [-2.0, -1.0, -9999.0]


def test_an_integer_past_64_bits_is_out_of_range_not_a_float() -> None:
    """orjson reads such an integer as a float: the message said it was no integer."""
    body = orjson.loads(b'{"model": "m", "prompt": "x", "seed": 18446744073709551616}')
    with pytest.raises(OpenAIError) as e:
        parse_completion(body)
    assert e.value.param == "seed" and "between" in e.value.message
