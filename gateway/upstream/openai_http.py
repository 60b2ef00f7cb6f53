"""Any OpenAI-compatible HTTP server (vLLM, SGLang, TGI, llama.cpp) as an upstream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import aiohttp

from gateway.registry.base import WorkerInfo, WorkerState
from proto import inference_pb2 as pb
from proto.openai_compat import from_openai_chunk, to_openai_body
from serving.calls import (
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    UpstreamError,
)

_STATUS = {
    400: INVALID_ARGUMENT,
    404: NOT_FOUND,
    429: RESOURCE_EXHAUSTED,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}


def _retry_after_ms(headers: aiohttp.typedefs.LooseHeaders) -> int | None:
    h = dict(headers)  # type: ignore[arg-type]
    if "retry-after-ms" in h:
        return int(float(h["retry-after-ms"]))
    if "Retry-After" in h:
        try:
            return int(float(h["Retry-After"]) * 1000)
        except ValueError:
            return None
    return None


class OpenAIHTTPUpstream:
    def __init__(self, worker_id: str, base_url: str) -> None:
        self.worker_id = worker_id
        self.base_url = base_url.rstrip("/")
        # No total timeout: aiohttp's default (5 min) would cut long streams; the gateway
        # passes each call's own deadline instead.
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0)
            )
        return self._session

    async def generate(
        self, request: pb.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        path, body = to_openai_body(request)
        headers = {"X-Request-Id": request.request_id} if request.request_id else {}
        try:
            async with self.session().post(
                self.base_url + path,
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=2.0),
            ) as resp:
                if resp.status != 200:
                    text = await resp.text()
                    try:
                        message = json.loads(text)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = text[:500]
                    raise UpstreamError(
                        _STATUS.get(resp.status, INTERNAL), message, _retry_after_ms(resp.headers)
                    )
                # OpenAI sends usage in its own chunk after the finishing one; hold the
                # finishing delta back so the last delta carries both, as our workers do.
                final: pb.GenerateResponse | None = None
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        err = chunk["error"]
                        raise UpstreamError(INTERNAL, str(err.get("message", err)))
                    delta = from_openai_chunk(chunk, request.request_id)
                    if final is not None:
                        if delta.HasField("usage"):
                            final.usage.CopyFrom(delta.usage)
                        continue
                    if delta.finish_reason:
                        final = delta
                    elif delta.text or delta.token_ids:
                        yield delta
                if final is not None:
                    yield final
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
            raise UpstreamError(UNAVAILABLE, f"{self.base_url}: {e}") from None
        except TimeoutError:
            raise UpstreamError(DEADLINE_EXCEEDED, "upstream deadline exceeded") from None

    async def probe(self, info: WorkerInfo) -> WorkerInfo:
        try:
            async with self.session().get(
                self.base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=1.0)
            ) as resp:
                ok = resp.status == 200
                data = await resp.json() if ok else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            ok, data = False, {}
        info.state = WorkerState.SERVING if ok else WorkerState.NOT_SERVING
        if ok:
            info.models = [m["id"] for m in data.get("data", []) if "id" in m]
        info.updated_at = time.time()
        return info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
