"""Worker output is untrusted: an OpenAI-compatible upstream that misbehaves in every way an
HTTP server can, behind a real gateway.

Each answer ends as a clean error for its client (an OpenAI JSON error before the first
byte, an SSE error event and [DONE] after it, a gRPC status on the gateway's gRPC port,
which parses the upstream's events into deltas), within a bounded time; the gateway keeps
serving another model throughout, never logs a traceback, and its memory stays bounded.
The fake upstream (a raw asyncio server on its own thread) stands for a broken third-party
server; what it does depends on the prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.e2e.fake_http import FakeHTTPServer
from tests.procs import Proc, metric_total, start_gateway, vm_kb, wait_for

EVENT = b'data: {"id":"x","object":"text_completion","choices":[{"index":0,"text":"tok"}]}\n\n'
FINISH = (
    b'data: {"id":"x","object":"text_completion",'
    b'"choices":[{"index":0,"text":"","finish_reason":"length"}]}\n\n'
)
WHOLE = (
    b'{"id":"x","object":"text_completion","choices":[{"index":0,"text":"whole",'
    b'"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
)
MB = 1 << 20
HUGE = 50 * MB
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
TTFT_S = 3.0
CACHE_LINES = [
    b'{"snapshot": true, "stored": [1, 2], "block_size": 0, "model_id": "m"}\n',
    b'{"snapshot": true, "stored": ["x"], "block_size": 16, "model_id": "m"}\n',
    b'{"snapshot": true, "stored": [1], "block_size": 16, "model_id": "m"}\n{"stored": [-1]',
    b'{"stored": [1e400], "removed": [18446744073709551616]}\n',
    b"[1, 2, 3]\n{not json at all\n",
    b"x" * (1 << 20),  # a line that never ends (the connection closes after it)
]
"""What the hostile upstream streams on GET /cache/watch, one per reconnect."""


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _whole(data: bytes, ctype: bytes = b"application/json", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        ctype,
        len(data),
        data,
    )


class Upstream(FakeHTTPServer):
    """An OpenAI-compatible HTTP/1.1 server (a fake of a third-party one) on its own loop and
    thread, serving `model`; `hostile` ones misbehave as their prompt says."""

    def __init__(self, model: str, hostile: bool) -> None:
        self.model = model
        self.hostile = hostile
        self.cache_watches = 0
        super().__init__()

    async def respond(self, head: bytes, body: bytes, w: asyncio.StreamWriter) -> bool:
        if head.startswith(b"GET /v1/models"):
            w.write(_whole(b'{"object":"list","data":[{"id":"%s"}]}' % self.model.encode()))
            await w.drain()
            return True
        if head.startswith(b"GET /cache/watch"):
            if not self.hostile:
                w.write(_whole(b'{"error":{"message":"not found"}}', status=b"404 Not Found"))
                await w.drain()
                return True
            # A cache stream that is wrong in another way at each reconnect.
            line = CACHE_LINES[self.cache_watches % len(CACHE_LINES)]
            self.cache_watches += 1
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(line)
            )
            await w.drain()
            return False
        req = json.loads(body)
        prompt = req.get("prompt", "") if self.hostile else "ok"
        return await self._answer(prompt, bool(req.get("stream")), w)

    async def _answer(self, prompt: str, stream: bool, w: asyncio.StreamWriter) -> bool:
        """Write one answer; False closes the connection (every hostile answer does)."""
        if prompt == "ok":
            if stream:
                w.write(
                    SSE_HEAD + _chunk(EVENT + FINISH) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
                )
            else:
                w.write(_whole(WHOLE))
            await w.drain()
            return True
        if prompt == "bad-json":
            if stream:
                w.write(SSE_HEAD + _chunk(EVENT + b"data: {not json\n\n" + EVENT + FINISH))
                w.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            else:
                w.write(_whole(b'{"id":"x","choices":['))
        elif prompt == "huge-line":  # 50 MB without a newline, in 1 MB writes
            w.write(SSE_HEAD + _chunk(EVENT) if stream else b"HTTP/1.1 200 OK\r\n")
            if not stream:
                w.write(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % HUGE)
            for _ in range(HUGE // MB):
                w.write(_chunk(b"x" * MB) if stream else b"x" * MB)
                await w.drain()
        elif prompt == "comments":  # blank lines and comments, forever
            if stream:
                w.write(SSE_HEAD + _chunk(EVENT))
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                w.write(b"Transfer-Encoding: chunked\r\n\r\n")
            while True:
                w.write(_chunk(b": keep-alive\n\n \n\n"))
                await w.drain()
                await asyncio.sleep(0.02)
        elif prompt == "cut-mid-event":  # a whole event, then half of one, then the end
            w.write(SSE_HEAD + _chunk(EVENT) + _chunk(EVENT[:30]) + b"0\r\n\r\n")
        elif prompt == "split-error":  # an error event in three reads, then [DONE]
            error = b'data: {"error":{"message":"busy","type":"service_unavailable"}}\n\n'
            w.write(SSE_HEAD + _chunk(EVENT + error[:9]))
            for part in (error[9:20], error[20:] + b"data: [DONE]\n\n"):
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(_chunk(part))
            w.write(b"0\r\n\r\n")
        elif prompt == "no-finish":  # events, and a body that ends properly without a finish
            w.write(SSE_HEAD + _chunk(EVENT + EVENT) + b"0\r\n\r\n")
        elif prompt == "crlf":  # a whole answer, in SSE's CRLF framing (sse-starlette's)
            crlf = (EVENT + EVENT + FINISH + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
            w.write(SSE_HEAD + _chunk(crlf[:50]) + _chunk(crlf[50:]) + b"0\r\n\r\n")
            await w.drain()
            return True
        elif prompt == "bad-param":  # a 400 naming a field no metadata can carry
            error = {"error": {"message": "bad", "type": "invalid_request_error"}}
            error["error"]["param"] = "promptü\nx"
            data = json.dumps(error, ensure_ascii=False).encode()
            w.write(_whole(data, status=b"400 Bad Request"))
        elif prompt == "wrong-type":
            w.write(_whole(b"<html><body>502 Bad Gateway</body></html>", b"text/html"))
        elif prompt == "short":  # Content-Length larger than the body, then close
            ctype = b"text/event-stream" if stream else b"application/json"
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n" % ctype
            )
            w.write(EVENT if stream else WHOLE[:20])
        elif prompt == "garbage":
            w.write(b"\x00\xff\xfe not HTTP at all \x01\x02\r\n\r\n" * 10)
        elif prompt == "no-head":  # headers never finished
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
            await w.drain()
            await asyncio.sleep(3600)
        elif prompt == "huge-head":  # one header line of 50 MB
            w.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
            for _ in range(HUGE // MB):
                w.write(b"a" * MB)
                await w.drain()
        elif prompt == "huge-error":  # a 500 with a 50 MB body
            w.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n\r\n" % HUGE)
            for _ in range(HUGE // MB):
                w.write(b"e" * MB)
                await w.drain()
        await w.drain()
        return False


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Proc, Upstream]]:
    hostile, good = Upstream("m", hostile=True), Upstream("good", hostile=False)
    gw = start_gateway(
        *("--worker", hostile.url, "--worker", good.url, "--grpc-port", "0"),
        *("--ttft-timeout", str(TTFT_S), "--idle-timeout", str(TTFT_S)),
        # prefix-aware (one replica per model either way): it follows upstreams' caches,
        # so the hostile one's GET /cache/watch answers are exercised too
        *("--health-interval", "0.2", "--routing", "prefix-aware"),
    )
    yield gw, hostile
    gw.stop()
    hostile.close()
    good.close()


def _post(
    gw: Proc, model: str, prompt: str, stream: bool, timeout_ms: int | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json"}
    if timeout_ms is not None:
        headers["X-Request-Timeout-Ms"] = str(timeout_ms)
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "stream": stream}
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions", json.dumps(body).encode(), headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Traffic:
    """Requests for the well-behaved model, one after another on a thread, throughout."""

    def __init__(self, gw: Proc) -> None:
        self.gw = gw
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            t = time.monotonic()
            status, _, body = _post(self.gw, "good", "ok", stream=i % 2 == 0)
            self.latencies.append(time.monotonic() - t)
            if status != 200 or not (body == WHOLE or body.endswith(b"data: [DONE]\n\n")):
                self.failures.append(f"{status} {body[:200]!r}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.strip()]


def _assert_clean(status: int, headers: dict[str, str], body: bytes, case: str) -> str:
    """The answer is an OpenAI error (JSON status, or an error event then [DONE] in a 200
    stream); returns its error type."""
    if status != 200:
        assert status in (502, 503, 504), (case, status, body[:300])
        assert headers["Content-Type"].startswith("application/json"), (case, headers)
        return str(json.loads(body)["error"]["type"])
    assert headers["Content-Type"].startswith("text/event-stream"), (case, headers)
    events = _events(body)
    assert events[-1] == b"data: [DONE]", (case, body[-300:])
    if not case.startswith("bad-json"):  # no half event before the error: all JSON
        for event in events[:-1]:
            if event.startswith(b"data: "):
                json.loads(event[6:])
    error = events[-2].split(b"data: ")[-1]
    return str(json.loads(error)["error"]["type"])


# (prompt, stream, a caller's deadline in ms when only the deadline can bound it)
HTTP_CASES = [
    ("bad-json", False, None),
    ("huge-line", True, None),
    ("huge-line", False, None),
    ("comments", True, None),
    ("comments", False, 4000),
    ("cut-mid-event", True, None),
    ("no-finish", True, None),
    ("wrong-type", True, None),
    ("wrong-type", False, None),
    ("short", True, None),
    ("short", False, None),
    ("garbage", True, None),
    ("garbage", False, None),
    ("no-head", True, None),
    ("no-head", False, 4000),
    ("huge-head", True, None),
    ("huge-error", False, None),
]
GRPC_CASES = [
    *("bad-json", "huge-line", "comments", "wrong-type", "short", "garbage", "no-head"),
    *("cut-mid-event", "no-finish"),  # a cut answer is no status OK over gRPC
]


def test_hostile_upstream_answers_end_cleanly_and_service_goes_on(
    fleet: tuple[Proc, Upstream],
) -> None:
    gw, hostile = fleet
    wait_for(lambda: _post(gw, "m", "ok", False)[0] == 200, timeout=30, interval=0.2)
    rss_before = vm_kb(gw.pid, "VmRSS")
    traffic = Traffic(gw)
    outcomes: list[str] = []
    try:
        for prompt, stream, timeout_ms in HTTP_CASES:
            case = f"{prompt} stream={stream}"
            t = time.monotonic()
            status, headers, body = _post(gw, "m", prompt, stream, timeout_ms)
            took = time.monotonic() - t
            kind = _assert_clean(status, headers, body, case)
            assert took < 15, (case, took)
            outcomes.append(f"{case}: {status} {kind} in {took:.1f}s, {len(body)} bytes")
            # the replica is usable again once a probe says so (a failure may mark it down)
            wait_for(lambda s=stream: _post(gw, "m", "ok", s)[0] == 200, timeout=30, interval=0.1)
        with grpc.insecure_channel(gw.ready["grpc"]) as ch:
            stub = pb_grpc.InferenceStub(ch)
            for prompt in GRPC_CASES:
                req = pb.GenerateRequest(
                    model="m", text=prompt, sampling=pb.SamplingParams(max_tokens=4)
                )
                t = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.Generate(req, timeout=60))
                took = time.monotonic() - t
                code = e.value.code()
                assert code in (
                    grpc.StatusCode.INTERNAL,
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ), (prompt, code, e.value.details())
                assert took < 15, (prompt, took)
                outcomes.append(f"grpc {prompt}: {code.name} in {took:.1f}s")
                wait_for(lambda: _post(gw, "m", "ok", True)[0] == 200, timeout=30, interval=0.1)
    finally:
        traffic.stop()
    peak = vm_kb(gw.pid, "VmHWM")
    print("\n".join(outcomes))
    print(f"gateway RSS before {rss_before} kB, peak {peak} kB, +{(peak - rss_before) // 1024} MB")
    print(f"other model: {len(traffic.latencies)} requests, max {max(traffic.latencies):.2f}s")
    assert gw.alive()
    assert hostile.cache_watches >= 2  # it went on asking, backing off, and survived each
    assert not traffic.failures, traffic.failures[:5]
    assert max(traffic.latencies) < 10
    assert peak - rss_before < 100 * 1024, (rss_before, peak)
    log = gw.log_text()
    assert "Traceback" not in log, log[-4000:]


def test_invalid_json_in_a_relayed_stream_is_passed_on_as_sent(
    fleet: tuple[Proc, Upstream],
) -> None:
    """The relay does no JSON work per chunk (its point): an event the upstream got wrong
    reaches the client as sent, and the stream still ends properly. The gateway's gRPC
    port, which parses events, ends the same stream with INTERNAL (above)."""
    gw, _ = fleet
    status, _, body = _post(gw, "m", "bad-json", stream=True)
    assert status == 200
    assert b"data: {not json\n\n" in body
    assert _events(body)[-1] == b"data: [DONE]"


def test_an_error_event_split_across_reads_is_counted_as_its_failure(
    fleet: tuple[Proc, Upstream],
) -> None:
    """The 200 went out before the error: the metrics say 503 all the same, whichever
    reads the event came in (its opening split was missed, counted a success)."""
    gw, _ = fleet
    counted = metric_total(gw, "breakwater_requests_total", 'status="503"')
    status, _, body = _post(gw, "m", "split-error", stream=True)
    assert status == 200 and b'"type":"service_unavailable"' in body
    wait_for(
        lambda: metric_total(gw, "breakwater_requests_total", 'status="503"') == counted + 1,
        timeout=30,
    )


def test_a_crlf_framed_stream_is_read_whole_over_grpc(fleet: tuple[Proc, Upstream]) -> None:
    """SSE allows CRLF line ends: the gRPC port, which parses events, read only the first
    event of such a stream and ended it with status OK."""
    gw, _ = fleet
    with grpc.insecure_channel(gw.ready["grpc"]) as ch:
        req = pb.GenerateRequest(model="m", text="crlf", sampling=pb.SamplingParams(max_tokens=4))
        answers = list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60))
    assert "".join(a.text for a in answers) == "toktok"
    assert answers[-1].finish_reason == pb.FINISH_REASON_LENGTH
    status, _, body = _post(gw, "m", "crlf", stream=True)  # relayed as sent
    assert status == 200 and body.count(b"tok") == 2


def test_grpc_logprobs_from_an_openai_upstream_are_refused_not_dropped(
    fleet: tuple[Proc, Upstream],
) -> None:
    gw, _ = fleet
    with grpc.insecure_channel(gw.ready["grpc"]) as ch:
        sampling = pb.SamplingParams(max_tokens=4, logprobs=2)
        req = pb.GenerateRequest(model="good", text="ok", sampling=sampling)
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs" in (e.value.details() or "")


def test_an_upstream_param_no_metadata_can_carry_is_dropped(fleet: tuple[Proc, Upstream]) -> None:
    """A 400's `param` went into gRPC trailing metadata as sent: non-ASCII or a newline made
    grpc fail the call with INTERNAL 'Invalid metadata' and log a traceback."""
    gw, _ = fleet
    with grpc.insecure_channel(gw.ready["grpc"]) as ch:
        req = pb.GenerateRequest(
            model="m", text="bad-param", sampling=pb.SamplingParams(max_tokens=4)
        )
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "param" not in dict(e.value.trailing_metadata() or ())
    status, _, _ = _post(gw, "m", "bad-param", stream=False)
    assert status == 400
    assert "Traceback" not in gw.log_text()
