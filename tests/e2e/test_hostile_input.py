"""Hostile requests over real HTTP, to a real gateway over a simulated worker (and to the
worker's own OpenAI port, which shares the routes): each is a JSON error naming the field,
never a 500 or a text page, and the gateway serves normally afterwards."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from proto.limits import DEFAULT_LIMITS
from tests.procs import Proc, start_gateway, start_sim_worker

MODEL = "sim"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def sim_worker() -> Iterator[Proc]:
    w = start_sim_worker("--http-port", "0", name=MODEL)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def sim_gateway(sim_worker: Proc) -> Iterator[Proc]:
    g = start_gateway("--worker", sim_worker.ready["grpc"])
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
    # Unknown fields are tolerated, and the port still answers a normal request.
    got, _, answer = post(url, chat(tools=[], metadata={"k": "v"}, some_extension={"a": [1]}))
    assert got == 200, answer
    assert answer["choices"][0]["message"]["role"] == "assistant"
    got, _, answer = post(
        base + "/v1/completions", json.dumps({"model": MODEL, "prompt": [1, 2]}).encode()
    )
    assert got == 200, answer
