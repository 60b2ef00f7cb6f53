"""The gateway relaying OpenAI upstreams byte for byte, against upstreams that misbehave.

A small raw HTTP server in this process plays the upstream; what it does depends on the
prompt, so one gateway process (real, on 127.0.0.1) meets every case.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from loadtest.fleet import admin_json
from tests.e2e.fake_http import FakeHTTPServer
from tests.procs import Proc, metric_total, start_gateway, wait_for

EVENT = b'data: {"id":"x","object":"text_completion","choices":[{"index":0,"text":"tok"}]}\n\n'
WHOLE = b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":"whole"}]}'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Upstream(FakeHTTPServer):
    """An OpenAI-ish HTTP/1.1 server (a fake of a third-party one) on its own loop and thread;
    `busy` answers 429 always."""

    def __init__(self, busy: bool = False) -> None:
        self.busy = busy
        self.requests = 0
        self.last: dict = {}
        """The last request body it was sent."""
        super().__init__()

    async def respond(self, head: bytes, body: bytes, w: asyncio.StreamWriter) -> bool:
        self.requests += 1
        if head.startswith(b"GET /v1/models"):
            data = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
            await w.drain()
            return True
        self.last = json.loads(body)
        return await self._answer(self.last, w)

    async def _answer(self, req: dict, w: asyncio.StreamWriter) -> bool:
        """Write one answer; False closes the connection."""
        prompt = req.get("prompt", "")
        if self.busy:
            data = b'{"error":{"message":"busy","type":"overloaded"}}'
            w.write(
                b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: %d\r\n\r\n%s"
                % (len(data), data)
            )
        elif prompt == "garbage":
            w.write(b"this is not HTTP\r\n\r\n")
            return False
        elif prompt.startswith("slow-whole"):  # a long generation answered whole
            await asyncio.sleep(6)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(WHOLE), WHOLE))
        elif not req.get("stream"):
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(WHOLE), WHOLE))
            if prompt == "close-after":  # closes its keep-alive connection while idle
                await w.drain()
                return False
        else:
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(EVENT) + _chunk(EVENT)
            )
            if prompt == "cut":  # dies mid-stream
                await w.drain()
                return False
            if prompt != "no-done":
                w.write(_chunk(b"data: [DONE]\n\n"))
            w.write(b"0\r\n\r\n")
        await w.drain()
        return True


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    u = Upstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def gateway(upstream: Upstream) -> Iterator[Proc]:
    g = start_gateway("--worker", upstream.url, "--ttft-timeout", "5")
    yield g
    g.stop()


def _post(
    gateway: Proc, body: dict, path: str = "/v1/completions"
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        gateway.ready["http"] + path,
        json.dumps({"model": "m", "max_tokens": 4, **body}).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_stream_passes_through_untouched(gateway: Proc) -> None:
    status, headers, body = _post(gateway, {"prompt": "ok", "stream": True})
    assert status == 200
    assert body == EVENT + EVENT + b"data: [DONE]\n\n"
    assert headers["x-breakwater-attempts"] == "1"


def test_tools_and_structured_output_reach_an_upstream_that_may_serve_them(
    gateway: Proc, upstream: Upstream
) -> None:
    """What Breakwater's engine refuses (tool calls, JSON output) is the upstream's to
    serve: its body goes as is, whole or streamed, chat or completion."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"}]}),
        ("/v1/completions", {"prompt": "ok"}),
    ):
        for stream in (False, True):
            extra = {"response_format": fmt, "stream": stream}
            if path == "/v1/chat/completions":
                extra |= {"tools": tools, "tool_choice": "required"}
            status, _, _ = _post(gateway, {**body, **extra}, path)
            assert status == 200
            assert {k: upstream.last.get(k) for k in extra} == extra


def test_whole_answer_passes_through(gateway: Proc) -> None:
    for _ in range(3):  # over a kept-alive connection, then again
        status, headers, body = _post(gateway, {"prompt": "ok"})
        assert (status, body) == (200, WHOLE)
        assert headers["Content-Type"].startswith("application/json")


def test_a_whole_answers_wait_is_not_taken_for_a_ttft(gateway: Proc) -> None:
    """A relayed non-streamed answer arrives when generation ends: its wait is no time to
    first token. It feeds neither the TTFT histogram nor the replica's TTFT average (the
    slow-replica detector and the learnt limits); a stream does."""

    def ttft_samples() -> float:
        return metric_total(gateway, "breakwater_time_to_first_token_seconds_count", "")

    def ttft_ewma_ms() -> float:
        (w,) = admin_json(gateway, "/admin/workers")["workers"]
        return float(w["breaker"].get("ttft_ewma_ms", 0.0))

    samples, ewma = ttft_samples(), ttft_ewma_ms()
    for _ in range(3):
        assert _post(gateway, {"prompt": "ok"})[0] == 200
    assert (ttft_samples(), ttft_ewma_ms()) == (samples, ewma)
    assert _post(gateway, {"prompt": "ok", "stream": True})[0] == 200
    wait_for(lambda: ttft_samples() == samples + 1, timeout=10)


def test_an_upstream_closing_idle_connections_costs_no_error(
    gateway: Proc, upstream: Upstream
) -> None:
    for _ in range(4):
        status, _, body = _post(gateway, {"prompt": "close-after"})
        assert (status, body) == (200, WHOLE)


def _events(body: bytes) -> list[str]:
    return [e.removeprefix(b"data: ").decode() for e in body.split(b"\n\n") if e]


def test_a_stream_cut_midway_ends_with_an_error_event(gateway: Proc) -> None:
    status, _, body = _post(gateway, {"prompt": "cut", "stream": True})
    assert status == 200
    events = _events(body)
    assert events[:2] == [EVENT[6:-2].decode()] * 2
    assert json.loads(events[2])["error"]["type"] == "service_unavailable"
    assert events[3] == "[DONE]"


def test_a_stream_without_done_gets_an_error_event_and_done(gateway: Proc) -> None:
    status, _, body = _post(gateway, {"prompt": "no-done", "stream": True})
    assert status == 200
    events = _events(body)
    assert json.loads(events[2])["error"]["message"] == "upstream ended early"
    assert events[3] == "[DONE]"


def test_garbage_from_the_upstream_is_a_clean_error(gateway: Proc) -> None:
    status, _, body = _post(gateway, {"prompt": "garbage"})
    assert status in (502, 503)
    assert "error" in json.loads(body)
    # The replica is out until its next health probe, then the gateway carries on.
    wait_for(lambda: _post(gateway, {"prompt": "ok"})[0] == 200, timeout=30, interval=0.2)


def test_a_busy_replica_is_retried_elsewhere_then_pushes_back() -> None:
    busy, fine = Upstream(busy=True), Upstream()
    g = start_gateway("--worker", busy.url, "--worker", fine.url, "--routing", "round-robin")
    try:
        for _ in range(4):
            status, headers, body = _post(g, {"prompt": "ok"})
            assert (status, body) == (200, WHOLE)
            assert headers["x-breakwater-worker"] == fine.url
        assert busy.requests >= 1  # round robin sent some there first
    finally:
        g.stop()
    g = start_gateway("--worker", busy.url)
    try:
        status, headers, body = _post(g, {"prompt": "ok"})
        assert status == 503
        assert headers["Retry-After"] == "2"
        assert json.loads(body)["error"]["code"] == "overloaded"
    finally:
        g.stop()
        busy.close()
        fine.close()


def _routed_blocks(gateway: Proc) -> float:
    return metric_total(gateway, "breakwater_routing_prefix_blocks_total", 'kind="routed"')


def test_a_whole_answer_hands_its_prefill_estimate_back_before_it_ends(
    upstream: Upstream,
) -> None:
    """A non-streamed answer shows no first token: routing's estimate of the prefill it
    queued on the replica is handed back after a typical TTFT, not when the answer ends."""
    other = Upstream()  # two replicas: with one there is no choice, and nothing to weigh
    gateway = start_gateway("--worker", upstream.url, "--worker", other.url)
    try:
        whole_answer_hands_back(gateway)
    finally:
        gateway.stop()
        other.close()


def whole_answer_hands_back(gateway: Proc) -> None:
    def both_ready() -> bool:
        workers = admin_json(gateway, "/admin/workers")["workers"]
        return len(workers) == 2 and all(w["state"] == "SERVING" for w in workers)

    wait_for(both_ready, timeout=30)
    before = _routed_blocks(gateway)
    prompt = "slow-whole " + "a system prompt long enough to be cut into blocks " * 6
    done: list[tuple[int, dict[str, str], bytes]] = []
    call = threading.Thread(target=lambda: done.append(_post(gateway, {"prompt": prompt})))
    call.start()
    try:
        wait_for(lambda: _routed_blocks(gateway) > before, timeout=10)  # routed, prefill queued
        wait_for(lambda: admin_json(gateway, "/admin/workers")["routing"]["prefilling"] == {}, 5)
        assert call.is_alive()  # the answer takes 6 s: it was handed back well before
    finally:
        call.join(timeout=30)
    assert done and done[0][0] == 200
