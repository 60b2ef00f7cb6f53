"""Any OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp) as an upstream.

Two ways to call it. `relay` forwards a client's OpenAI request body as is and hands back
the raw response, so the gateway can pass the upstream's bytes through untouched (the hot
path for HTTP clients). `generate` speaks the Generate contract (for gRPC clients, and for
anything that needs deltas): it asks for a stream and turns each SSE event into a delta.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import orjson

from gateway.registry.base import WorkerInfo, WorkerState
from gateway.upstream.http_client import ConnectError, HTTPError, HTTPPool, Response
from proto import inference_pb2 as pb
from proto.openai_compat import OpenAIError, from_openai_chunk, to_openai_body
from serving.calls import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UpstreamError,
)
from serving.tls import ClientTLS
from serving.tracing import TRACEPARENT
from serving.usage_comment import USAGE_HEADER

_STATUS = {
    400: INVALID_ARGUMENT,
    404: NOT_FOUND,
    408: DEADLINE_EXCEEDED,
    413: INVALID_ARGUMENT,
    422: INVALID_ARGUMENT,
    429: RESOURCE_EXHAUSTED,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}
PROBE_TIMEOUT_S = 1.0
MAX_ERROR_BODY = 64 << 10
MAX_EVENT_BYTES = 1 << 20
"""The largest SSE event parsed into deltas (one token's chunk, even with 20 logprobs, is
a few KiB): what one stream may hold in memory for an event not yet complete."""
_MEDIA_TYPES = {True: "text/event-stream", False: "application/json"}
_USAGE_LINE = b"%s: 1\r\n" % USAGE_HEADER.encode()


def retry_after_ms(headers: dict[str, str]) -> int | None:
    """An upstream's pushback: `retry-after-ms`, else `Retry-After` in seconds."""
    for name, scale in (("retry-after-ms", 1.0), ("retry-after", 1000.0)):
        raw = headers.get(name)
        if raw is not None:
            try:
                return max(0, int(float(raw) * scale))
            except ValueError:
                return None
    return None


async def error_from(resp: Response, deadline: float | None) -> UpstreamError:
    """A non-200 upstream answer as an UpstreamError with its message and pushback."""
    try:
        text = await resp.read(deadline, MAX_ERROR_BODY)
    except (HTTPError, TimeoutError):
        text = b""
    finally:
        resp.release()
    code = _STATUS.get(resp.status, INTERNAL)
    param = None
    try:
        error = orjson.loads(text)["error"]
        message = str(error["message"])
        if code == INVALID_ARGUMENT and isinstance(error.get("param"), str):
            param = error["param"][:200]  # the field a 400 names goes on to the client
        if code == UNAVAILABLE and error.get("code") == "overloaded":
            # a full queue (a Breakwater worker's 503): busy, not sick; no breaker failure,
            # and the client is told "overloaded", as over gRPC
            code = RESOURCE_EXHAUSTED
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        message = text[:500].decode("utf-8", "replace") or f"HTTP {resp.status}"
    return UpstreamError(code, message, retry_after_ms(resp.headers), param)


def wrong_type(resp: Response, stream: bool) -> str | None:
    """Why a 200 is not the answer asked for (an HTML page from a proxy in between, ...),
    judged by its Content-Type; None when it fits or says nothing."""
    ctype = resp.headers.get("content-type")
    if ctype is None:
        return None
    media = ctype.partition(";")[0].strip().lower()
    expected = _MEDIA_TYPES[stream]
    return None if media == expected else f"answered {media[:64]!r} where {expected} was asked"


class UpstreamUnreachable(UpstreamError):
    """No connection to the upstream could be made: nothing was sent."""


RELAY_KIND = "worker-openai"
"""WorkerInfo.kind of a Breakwater worker's own OpenAI port, where the gateway relays."""


class OpenAIHTTPUpstream:
    def __init__(
        self,
        worker_id: str,
        base_url: str,
        tls: ClientTLS | None = None,
        system_roots: bool = True,
    ) -> None:
        """`tls`: the gateway's --upstream-* files, for https:// (system roots without).
        `system_roots`: trust them besides --upstream-ca; not for a worker's own port,
        which is trusted as its gRPC port is (the CA alone), so a certificate some public
        CA issued for the host cannot stand in for the worker's."""
        self.worker_id = worker_id
        self.base_url = base_url.rstrip("/")
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"an OpenAI upstream must be http(s)://host:port, got {base_url!r}")
        self._prefix = url.path.encode()
        context = None
        if url.scheme == "https":
            context = (tls or ClientTLS()).ssl_context(system_roots)
        self.pool = HTTPPool(url.hostname, url.port or (443 if context else 80), ssl=context)

    async def relay(
        self,
        path: bytes,
        body: bytes,
        request_id: str,
        deadline: float | None,
        timeout_ms: int | None = None,
        usage: bool = False,
    ) -> Response:
        """POST `body` to `path`; returns the response with status and headers read.

        Raises UpstreamError for a failed connection or a deadline passed before headers
        (UpstreamUnreachable when no connection could be made). `timeout_ms` is the call's
        remaining time, sent as X-Request-Timeout-Ms (Breakwater workers stop there; other
        servers ignore it). `usage`: ask a Breakwater worker to end a stream with its usage
        as a comment (serving/usage_comment.py; others ignore the header).
        """
        headers = b"Content-Type: application/json\r\nX-Request-Id: %s\r\n" % request_id.encode()
        if timeout_ms is not None:
            headers += b"X-Request-Timeout-Ms: %d\r\n" % timeout_ms
        if usage:
            headers += _USAGE_LINE
        if traceparent := TRACEPARENT.get():
            headers += b"traceparent: %s\r\n" % traceparent.encode()
        try:
            return await self.pool.request(b"POST", self._prefix + path, body, headers, deadline)
        except ConnectError as e:
            raise UpstreamUnreachable(UNAVAILABLE, f"{self.base_url}: {e}") from None
        except HTTPError as e:
            raise UpstreamError(UNAVAILABLE, f"{self.base_url}: {e}") from None
        except TimeoutError:
            raise UpstreamError(DEADLINE_EXCEEDED, "upstream deadline exceeded") from None

    async def generate(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        if request.sampling.HasField("logprobs"):  # refused, not dropped without a word
            raise UpstreamError(
                INVALID_ARGUMENT,
                "logprobs over gRPC are not served by an OpenAI-compatible upstream "
                f"({self.base_url}); ask its HTTP API through the gateway's HTTP port",
                param="sampling.logprobs",
            )
        path, body = to_openai_body(request)
        timeout_ms = None if timeout is None else max(1, int(timeout * 1000))
        resp = await self.relay(
            path.encode(), orjson.dumps(body), request.request_id, deadline, timeout_ms
        )
        if resp.status != 200:
            raise await error_from(resp, deadline)
        if (wrong := wrong_type(resp, True)) is not None:
            resp.release()
            raise UpstreamError(INTERNAL, f"{self.base_url}: {wrong}")
        try:
            async for delta in _deltas(resp, request.request_id, deadline):
                yield delta
        except HTTPError as e:
            raise UpstreamError(UNAVAILABLE, f"{self.base_url}: {e}") from None
        except TimeoutError:
            raise UpstreamError(DEADLINE_EXCEEDED, "upstream deadline exceeded") from None
        except OpenAIError as e:  # from_openai_chunk: a chunk of the wrong shape
            raise UpstreamError(INTERNAL, f"{self.base_url}: {e.message}") from None
        except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise UpstreamError(INTERNAL, f"{self.base_url}: malformed stream event: {e}") from None
        finally:
            resp.release()

    async def probe(self, info: WorkerInfo) -> WorkerInfo:
        deadline = asyncio.get_running_loop().time() + PROBE_TIMEOUT_S
        data: dict = {}
        try:
            resp = await self.pool.request(b"GET", self._prefix + b"/v1/models", b"", b"", deadline)
            try:
                raw = await resp.read(deadline)
            finally:
                resp.release()
            ok = resp.status == 200
            if ok:
                data = orjson.loads(raw)
        except (HTTPError, TimeoutError, orjson.JSONDecodeError):
            ok = False
        info.state = WorkerState.SERVING if ok else WorkerState.NOT_SERVING
        if ok and isinstance(data, dict):
            info.models = [m["id"] for m in data.get("data", []) if "id" in m]
        info.updated_at = time.time()
        return info

    async def close(self) -> None:
        await self.pool.close()


async def _deltas(
    resp: Response, request_id: str, deadline: float | None
) -> AsyncIterator[pb.GenerateResponse]:
    """SSE events of an OpenAI stream as deltas.

    OpenAI sends usage in its own chunk after the finishing one; the finishing delta is held
    back so the last delta carries both, as our workers' do.
    """
    final: pb.GenerateResponse | None = None
    tail = b""
    while data := await resp.read_some(deadline):
        buf = tail + data
        if b"\r" in buf:  # SSE allows CRLF and CR line ends: split on LF alone
            held = buf.endswith(b"\r") and not buf.endswith(b"\r\r")  # its LF may follow
            buf = buf[:-1] if held else buf
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        events = buf.split(b"\n\n")
        tail = events.pop()
        if len(tail) > MAX_EVENT_BYTES:
            raise UpstreamError(INTERNAL, f"an upstream stream event over {MAX_EVENT_BYTES} bytes")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    if final is None:
                        raise UpstreamError(INTERNAL, _CUT)
                    yield final
                    return
                chunk = orjson.loads(payload)
                if "error" in chunk:
                    err = chunk["error"]
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    raise UpstreamError(INTERNAL, str(msg))
                delta = from_openai_chunk(chunk, request_id)
                if final is not None:
                    if delta.HasField("usage"):
                        final.usage.CopyFrom(delta.usage)
                    continue
                if delta.finish_reason:
                    final = delta
                elif delta.text or delta.token_ids:
                    yield delta
    if final is None:  # the body ended mid-answer: not a whole answer (gRPC said OK)
        raise UpstreamError(INTERNAL, _CUT)
    yield final


_CUT = "the upstream's stream ended before the answer finished"
