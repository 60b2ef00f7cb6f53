"""A trivial server (no model): OpenAI-compatible streaming and gRPC Generate, answered at once.

    python -m loadtest.trivial_server [--port 0] [--grpc-port 0 | --no-grpc]

It exists so the load generator can be measured against something that costs nearly
nothing per request (`python -m loadtest.loadgen --self-test`), and so its tests have a
real server to talk to. Each answer streams a few fixed chunks. The `x-trivial` header (or
gRPC metadata) holds a JSON object that shapes one answer, for tests:

    {"chunks": 4, "delay_s": 0.0, "status": 429, "retry_after_s": 1.5,
     "error_after": 2, "attempts": 2}

`status` rejects at once with Retry-After / retry-after-ms (gRPC: RESOURCE_EXHAUSTED or
UNAVAILABLE with grpc-retry-pushback-ms); `error_after` ends the stream with an error frame
after that many chunks; `attempts` sets `x-breakwater-attempts`. GET /stats counts requests
and the most ever in flight; POST /reset zeroes them.

It prints `TRIVIAL_SERVER_READY http=URL grpc=HOST:PORT` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from loadtest.fleet import read_ready, terminate

READY = "TRIVIAL_SERVER_READY"


@dataclass
class Counters:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def enter(self) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)


@dataclass
class Behaviour:
    chunks: int = 4
    delay_s: float = 0.0
    status: int = 200
    retry_after_s: float = 1.0
    error_after: int | None = None
    attempts: int = 1

    @classmethod
    def parse(cls, raw: str | None, default_chunks: int) -> Behaviour:
        b = cls(chunks=default_chunks)
        if raw:
            for k, v in json.loads(raw).items():
                setattr(b, k, v)
        return b


COUNTERS: web.AppKey[Counters] = web.AppKey("counters", Counters)
CHUNKS: web.AppKey[int] = web.AppKey("chunks", int)


def _frame(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _generate(request: web.Request) -> web.StreamResponse:
    counters = request.app[COUNTERS]
    counters.enter()
    try:
        b = Behaviour.parse(request.headers.get("x-trivial"), request.app[CHUNKS])
        body = await request.json()
        if b.status != 200:
            return web.json_response(
                {
                    "error": {
                        "message": "rejected",
                        "type": "trivial",
                        "code": f"trivial_{b.status}",
                    }
                },
                status=b.status,
                headers={
                    "Retry-After": str(math.ceil(b.retry_after_s)),
                    "retry-after-ms": str(round(b.retry_after_s * 1000)),
                },
            )
        chat = request.path.endswith("/chat/completions")
        kind = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": "trivial", "object": kind, "created": int(time.time()), "model": "trivial"}

        def choice(text: str | None, finish: str | None = None) -> dict[str, Any]:
            if chat:
                delta = {} if text is None else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text or "", "finish_reason": finish}

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-breakwater-attempts": str(b.attempts)}
        )
        await resp.prepare(request)
        if chat:  # the role-only first chunk real servers send: not a token
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            await resp.write(_frame({**base, "choices": [{**first, "finish_reason": None}]}))
        for i in range(b.chunks):
            if b.error_after is not None and i >= b.error_after:
                err = {"message": "trivial failure", "type": "server_error", "code": "trivial"}
                await resp.write(_frame({"error": err}))
                break
            if b.delay_s:
                await asyncio.sleep(b.delay_s)
            await resp.write(_frame({**base, "choices": [choice(f" t{i}")]}))
        else:
            await resp.write(_frame({**base, "choices": [choice(None, "length")]}))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 1, "completion_tokens": b.chunks}
                await resp.write(_frame({**base, "choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    finally:
        counters.in_flight -= 1


async def _stats(request: web.Request) -> web.Response:
    c = request.app[COUNTERS]
    return web.json_response(
        {"requests": c.requests, "in_flight": c.in_flight, "max_in_flight": c.max_in_flight}
    )


async def _reset(request: web.Request) -> web.Response:
    c = request.app[COUNTERS]
    c.requests, c.max_in_flight = 0, c.in_flight
    return web.json_response({})


def make_app(chunks: int = 4, counters: Counters | None = None) -> web.Application:
    app = web.Application()
    app[COUNTERS] = counters or Counters()
    app[CHUNKS] = chunks
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_get("/stats", _stats)
    app.router.add_post("/reset", _reset)
    return app


def make_servicer(chunks: int = 4, counters: Counters | None = None) -> Any:
    """A trivial grpc.aio Inference servicer with the same behaviours as the HTTP side."""
    import grpc

    from proto import inference_pb2 as pb
    from proto import inference_pb2_grpc as pb_grpc

    codes = {429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
    shared = counters or Counters()

    class TrivialInference(pb_grpc.InferenceServicer):
        counters = shared

        async def Generate(
            self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[pb.GenerateResponse]:
            self.counters.enter()
            try:
                md = dict(context.invocation_metadata() or ())
                b = Behaviour.parse(md.get("x-trivial"), chunks)  # type: ignore[arg-type]
                if b.status != 200:
                    ms = str(round(b.retry_after_s * 1000))
                    context.set_trailing_metadata((("grpc-retry-pushback-ms", ms),))
                    await context.abort(codes.get(b.status, grpc.StatusCode.INTERNAL), "rejected")
                await context.send_initial_metadata((("x-breakwater-attempts", str(b.attempts)),))
                rid = request.request_id
                for i in range(b.chunks):
                    if b.error_after is not None and i >= b.error_after:
                        yield pb.GenerateResponse(
                            request_id=rid,
                            finish_reason=pb.FINISH_REASON_ERROR,
                            error="trivial failure",
                        )
                        return
                    if b.delay_s:
                        await asyncio.sleep(b.delay_s)
                    last = i == b.chunks - 1
                    yield pb.GenerateResponse(
                        request_id=rid,
                        text=f" t{i}",
                        token_ids=[i],
                        finish_reason=pb.FINISH_REASON_LENGTH if last else 0,
                        usage=pb.Usage(prompt_tokens=1, completion_tokens=b.chunks)
                        if last
                        else None,
                    )
            finally:
                self.counters.in_flight -= 1

    return TrivialInference()


async def serve(
    host: str = "127.0.0.1", port: int = 0, grpc_port: int | None = 0, chunks: int = 4
) -> None:
    """Serve until SIGTERM/SIGINT; print the READY line with the bound ports."""
    counters = Counters()
    runner = web.AppRunner(make_app(chunks, counters), access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    line = f"{READY} http=http://{host}:{bound}"
    server = None
    if grpc_port is not None:
        import grpc

        from proto import inference_pb2_grpc as pb_grpc

        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(make_servicer(chunks, counters), server)
        gport = server.add_insecure_port(f"{host}:{grpc_port}")
        await server.start()
        line += f" grpc={host}:{gport}"
    print(line, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if server is not None:
        await server.stop(0.2)
    await runner.cleanup()


@dataclass
class RunningServer:
    url: str
    grpc: str | None
    popen: subprocess.Popen[str]

    def stop(self) -> None:
        terminate(self.popen, 5.0)


@contextlib.contextmanager
def start_trivial_server(
    grpc: bool = True, chunks: int = 4, timeout: float = 30.0
) -> Iterator[RunningServer]:
    """The trivial server in its own process on 127.0.0.1, ports bound by the OS (no races),
    so that it never shares a core or an event loop with the generator it measures."""
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "-m", "loadtest.trivial_server", "--chunks", str(chunks)]
    args += ["--grpc-port", "0"] if grpc else ["--no-grpc"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryFile("w+") as errlog:
        popen = subprocess.Popen(
            args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=errlog, text=True
        )
        server = None
        try:
            ready = read_ready(popen, READY, timeout)
            if ready is None:
                errlog.seek(0)
                raise RuntimeError(f"trivial server did not start:\n{errlog.read()[-2000:]}")
            server = RunningServer(ready["http"], ready.get("grpc"), popen)
            yield server
        finally:
            if server is None:
                popen.kill()
                popen.wait()
            else:
                server.stop()
            assert popen.stdout is not None
            popen.stdout.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--no-grpc", action="store_true")
    ap.add_argument("--chunks", type=int, default=4, help="text chunks per answer")
    args = ap.parse_args(argv)
    asyncio.run(serve(args.host, args.port, None if args.no_grpc else args.grpc_port, args.chunks))


if __name__ == "__main__":
    main()
