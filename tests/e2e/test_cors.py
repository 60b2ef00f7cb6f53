"""CORS, on request (`--allowed-origins`): browser apps (the OpenAI JS SDK, chat UIs) could
not call the gateway at all, its preflight a 405 and no answer readable by their scripts."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests.procs import Proc, start_gateway, start_sim_worker

APP = "https://app.example"


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Proc, Proc]]:
    worker = start_sim_worker("--http-port", "0")  # streams are relayed from its port
    with_cors = start_gateway("--worker", worker.ready["grpc"], "--allowed-origins", APP)
    without = start_gateway("--worker", worker.ready["grpc"])
    yield with_cors, without
    with_cors.stop()
    without.stop()
    worker.stop()


def ask(
    gw: Proc, method: str, path: str, headers: dict[str, str], body: object = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = gw.ready["http"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        data = json.dumps(body) if body is not None else None
        if data is not None:
            headers = {"Content-Type": "application/json", **headers}
        conn.request(method, path, data, headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def test_allowed_origins_get_cors_headers_on_every_answer(fleet: tuple[Proc, Proc]) -> None:
    gw, _ = fleet
    want = {"Origin": APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
    status, headers, _ = ask(gw, "OPTIONS", "/v1/chat/completions", want)
    assert status == 204
    assert headers["access-control-allow-origin"] == APP
    assert "POST" in headers["access-control-allow-methods"]
    assert "authorization" in headers["access-control-allow-headers"]
    origin = {"Origin": APP}
    for body in (CHAT, {**CHAT, "stream": True}):  # whole and streamed (relayed)
        status, headers, text = ask(gw, "POST", "/v1/chat/completions", origin, body)
        assert status == 200, text
        assert headers["access-control-allow-origin"] == APP
        assert "X-Request-Id" in headers["access-control-expose-headers"]
    status, headers, _ = ask(gw, "GET", "/v1/models", origin)
    assert status == 200 and headers["access-control-allow-origin"] == APP
    status, headers, _ = ask(gw, "POST", "/v1/chat/completions", origin, {"model": "sim"})
    assert status == 400 and headers["access-control-allow-origin"] == APP  # errors too
    # another origin, or none: no CORS headers
    status, headers, _ = ask(gw, "OPTIONS", "/v1/chat/completions", {"Origin": "https://evil"})
    assert status == 403 and "access-control-allow-origin" not in headers
    status, headers, _ = ask(gw, "POST", "/v1/chat/completions", {}, CHAT)
    assert status == 200 and "access-control-allow-origin" not in headers


def test_without_allowed_origins_nothing_changes(fleet: tuple[Proc, Proc]) -> None:
    _, gw = fleet
    status, _, _ = ask(gw, "OPTIONS", "/v1/chat/completions", {"Origin": APP})
    assert status == 405
    status, headers, _ = ask(gw, "POST", "/v1/chat/completions", {"Origin": APP}, CHAT)
    assert status == 200 and "access-control-allow-origin" not in headers
