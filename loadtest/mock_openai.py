"""A mock OpenAI-compatible backend with zero model time, as cheap per request as Python gets.

    python -m loadtest.mock_openai [--port 0] [--model mock]

It exists so a router benchmark (`loadtest.peer_bench`) measures the routers, not the
backends: a raw asyncio Protocol (uvloop when installed) with every answer pre-encoded, no
framework and no per-request JSON encoding. It answers:

- POST /v1/completions (no `stream`): one JSON completion of JSON_TOKENS tokens;
- POST /v1/chat/completions or /v1/completions with `"stream": true`: an SSE stream of
  SSE_CHUNKS token chunks (chunked transfer encoding, one HTTP chunk per event) and
  `data: [DONE]`;
- GET /v1/models (the model listed), /health, /healthz, /health_generate, /get_model_info,
  /get_server_info: routers' health and discovery probes;
- GET /stats: connections accepted and requests by path (whether a router reuses its
  upstream connections shows there).

It prints `MOCK_OPENAI_READY http=URL` once listening, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.fleet import read_ready, terminate

READY = "MOCK_OPENAI_READY"
JSON_TOKENS = 16
SSE_CHUNKS = 32
MAX_HEAD = 64 * 1024
CONNECTIONS = b"#connections"


def token_text(n: int) -> str:
    """The text a mock answer of n tokens carries; checkers compare against it."""
    return "".join(f" t{i}" for i in range(n))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _response(status: str, ctype: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status.encode(),
        ctype,
        len(body),
        body,
    )


def _sse_event(obj: Any) -> bytes:
    event = b"data: " + _dumps(obj) + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


@dataclass(frozen=True)
class Answers:
    """Every answer, encoded once at start: the server then only copies bytes."""

    completion: bytes
    chat_json: bytes
    chat_stream: bytes
    text_stream: bytes
    models: bytes
    health: bytes
    model_info: bytes
    not_found: bytes
    bad_request: bytes

    @classmethod
    def build(cls, model: str) -> Answers:
        created = int(time.time())
        text = token_text(JSON_TOKENS)
        usage = {
            "prompt_tokens": 4,
            "completion_tokens": JSON_TOKENS,
            "total_tokens": 4 + JSON_TOKENS,
        }
        completion = {
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": usage,
        }
        message = {"role": "assistant", "content": text}
        chat = {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
            "usage": usage,
        }
        sse_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        base = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": created}
        base |= {"model": model}
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        chat_events = [_sse_event({**base, "choices": [role]})]
        for i in range(SSE_CHUNKS):
            choice = {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}
            chat_events.append(_sse_event({**base, "choices": [choice]}))
        end = {"index": 0, "delta": {}, "finish_reason": "length"}
        chat_events.append(_sse_event({**base, "choices": [end]}))
        text_base = {**base, "id": "cmpl-mock", "object": "text_completion"}
        text_events = [
            _sse_event({**text_base, "choices": [{"index": 0, "text": f" t{i}"}]})
            for i in range(SSE_CHUNKS)
        ]
        finish = {"index": 0, "text": "", "finish_reason": "length"}
        text_events.append(_sse_event({**text_base, "choices": [finish]}))
        done = b"data: [DONE]\n\n"
        tail = b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done)
        models = {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": created, "owned_by": "mock"}],
        }
        info = {"model_path": model, "tokenizer_path": model, "is_generation": True}
        err = {"error": {"message": "not found", "type": "invalid_request_error"}}
        bad = {"error": {"message": "bad request", "type": "invalid_request_error"}}
        j = b"application/json"
        return cls(
            completion=_response("200 OK", j, _dumps(completion)),
            chat_json=_response("200 OK", j, _dumps(chat)),
            chat_stream=sse_head + b"".join(chat_events) + tail,
            text_stream=sse_head + b"".join(text_events) + tail,
            models=_response("200 OK", j, _dumps(models)),
            health=_response("200 OK", b"text/plain", b"OK"),
            model_info=_response("200 OK", j, _dumps(info)),
            not_found=_response("404 Not Found", j, _dumps(err)),
            bad_request=_response("400 Bad Request", j, _dumps(bad)),
        )


class MockProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive with pipelining; bodies by Content-Length or chunked."""

    def __init__(self, answers: Answers, counts: Counter[bytes]) -> None:
        self.answers = answers
        self.counts = counts
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counts[CONNECTIONS] += 1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and self._one():
            pass
        if len(self.buf) > MAX_HEAD + 1024 * 1024 and self.transport is not None:
            self.transport.close()

    def _one(self) -> bool:
        """Answer one complete request from the buffer; False if more bytes are needed."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end])
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            self._reply(self.answers.bad_request, close=True)
            return False
        method, target, version = parts
        length, chunked, close = 0, False, version == b"HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                close = v == b"close" or (close and v != b"keep-alive")
        start = end + 4
        if chunked:
            got = _dechunk(self.buf, start)
            if got is None:
                return False
            body, used = got
        else:
            if len(self.buf) < start + length:
                return False
            body, used = bytes(self.buf[start : start + length]), start + length
        del self.buf[:used]
        path = target.split(b"?", 1)[0]
        self.counts[path] += 1
        self._reply(self._answer(method, path, body), close)
        return not close

    def _answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        a = self.answers
        if method == b"POST":
            if path not in (b"/v1/completions", b"/v1/chat/completions"):
                return a.not_found
            try:
                stream = bool(json.loads(body).get("stream")) if body else False
            except (ValueError, AttributeError):
                return a.bad_request
            if path == b"/v1/chat/completions":
                return a.chat_stream if stream else a.chat_json
            return a.text_stream if stream else a.completion
        if path == b"/v1/models":
            return a.models
        if path in (b"/health", b"/healthz", b"/health_generate", b"/readiness", b"/liveness"):
            return a.health
        if path in (b"/get_model_info", b"/get_server_info", b"/model_info", b"/server_info"):
            return a.model_info
        if path == b"/stats":
            paths = {k.decode("latin-1"): v for k, v in self.counts.items() if k != CONNECTIONS}
            stats = {"connections": self.counts[CONNECTIONS], "paths": paths}
            return _response("200 OK", b"application/json", _dumps(stats))
        return a.not_found

    def _reply(self, data: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(data)
        if close:
            self.transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked request body from buf[pos:]: (body, bytes used) or None if incomplete."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # no trailers: the CRLF right after "0\r\n"
            if end < 0:
                return None
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


async def serve(host: str = "127.0.0.1", port: int = 0, model: str = "mock") -> None:
    """Serve until SIGTERM/SIGINT; print the READY line with the bound port."""
    loop = asyncio.get_running_loop()
    answers, counts = Answers.build(model), Counter[bytes]()
    server = await loop.create_server(
        lambda: MockProtocol(answers, counts), host, port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"{READY} http=http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def run(coro: Any) -> None:
    """asyncio.run on uvloop where installed: the mock must cost the routers' CPU, not its own."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


@dataclass
class MockBackend:
    url: str
    popen: subprocess.Popen[str]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        terminate(self.popen, 5.0)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@contextlib.contextmanager
def start_mock_backends(
    n: int = 3, model: str = "mock", timeout: float = 30.0
) -> Iterator[list[MockBackend]]:
    """n mock backends, each its own process on 127.0.0.1 with an OS-picked port; all are
    stopped by PID on exit, even if a later one failed to start."""
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    args = [sys.executable, "-m", "loadtest.mock_openai", "--model", model]
    started: list[MockBackend] = []
    with tempfile.TemporaryFile("w+") as errlog:
        try:
            for _ in range(n):
                popen = subprocess.Popen(
                    args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=errlog, text=True
                )
                backend = MockBackend("", popen)
                started.append(backend)
                ready = read_ready(popen, READY, timeout)
                if ready is None:
                    errlog.seek(0)
                    raise RuntimeError(f"mock backend did not start:\n{errlog.read()[-2000:]}")
                backend.url = ready["http"]
            yield started
        finally:
            for b in started:
                b.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="mock")
    args = ap.parse_args(argv)
    run(serve(args.host, args.port, args.model))


if __name__ == "__main__":
    main()
