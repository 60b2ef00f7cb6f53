"""The gateway's OpenAI HTTP front end: the shared OpenAI routes over the dispatcher,
behind the gateway's admission (tenants, quotas, the bounded queue).

The request is parsed and validated as everywhere else; then, when the chosen replica is
itself an OpenAI-compatible server, the client's body is relayed as is and the replica's
answer passes through byte for byte (only our headers are added), so a stream costs one
read and one write per socket read, with no JSON or protobuf work per chunk. A relayed
stream that ends without `[DONE]`, or that breaks, ends with an error event as ours do.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from aiohttp import web
from opentelemetry.trace import SpanKind

from gateway.admission.admission import (
    Admission,
    Ticket,
    estimate_prompt_tokens,
    estimate_request_tokens,
)
from gateway.dispatch import Call, Dispatcher, RawRequest
from gateway.frontend.fast_http import FastRequest
from gateway.routing.cache_views import CacheView
from gateway.routing.decision_share import RedisShare, SiblingShare
from gateway.shadow import Mirror, Shadows
from proto import inference_pb2 as pb
from proto.openai_compat import OpenAIError, ParsedRequest, session_key, sse
from proto.prompt_ids import with_member
from serving.calls import CallInfo, UpstreamError
from serving.heap import heap_view
from serving.openai_http import (
    STATUS_OF_TYPE,
    OpenAIRoutes,
    call_headers,
    from_upstream,
    json_response,
    stream_response,
    too_large,
)
from serving.tracing import context_from, request_attributes
from serving.usage_comment import UsageReader

_PATHS = {"completion": b"/v1/completions", "chat": b"/v1/chat/completions"}
_DONE = sse("[DONE]")
_ERROR_EVENT = b'data: {"error"'
"""A worker's error event in a relayed stream (a JSON string cannot hold the bare quote)."""


class HTTPAdmission:
    """Admits an HTTP request; raises OpenAIError (401/429/503/504) to refuse it."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def __call__(
        self, request: web.Request, body: dict[str, Any], parsed: ParsedRequest, deadline: float
    ) -> Ticket | None:
        priority = int(parsed.request.priority) if body.get("priority") is not None else None
        headers = request.headers
        retries = headers.get("X-Retry-Count") or headers.get("x-stainless-retry-count")
        ticket = await self.admission.admit(
            headers.get("Authorization"),
            estimate_request_tokens(parsed.request),
            priority,
            deadline,
            retry=retries is not None and retries != "0",
        )
        Admission.salt(parsed.request, ticket)
        return ticket


class GatewayRoutes(OpenAIRoutes):
    relays_bodies = True

    def __init__(
        self,
        dispatcher: Dispatcher,
        default_timeout_s: float,
        max_timeout_s: float,
        admission: Admission,
    ) -> None:
        super().__init__(dispatcher, default_timeout_s, max_timeout_s, HTTPAdmission(admission))
        self.dispatcher = dispatcher
        self.admission = admission
        self.process: dict[str, int] = {"pid": os.getpid(), "index": 0, "processes": 1}
        """Which of the gateway's processes answers (`--processes`), for /admin/workers."""
        self.share: SiblingShare | RedisShare | None = None
        self.session_header = "X-Session-Id"
        """Carries the sticky-routing key; overrides the body's `user`."""
        self.tracer: Any | None = None
        """OpenTelemetry tracer when tracing is on: a server span per request."""
        self.cache_views: Mapping[str, CacheView] | None = None
        """Workers' reported prefix caches, when followed (for /admin/workers)."""
        self.shadows: Shadows | None = None
        """Shadow traffic an operator set up (admin API): mirrors of sampled requests."""

    def _check_key(self, request: web.Request) -> None:
        self.admission.tenants.identify(request.headers.get("Authorization"))

    def _cut_by_server(self, request: web.Request) -> bool:
        # The fast door cancels at its drain's end and says which it cut; aiohttp cancels
        # its handlers after half the drain (cut_from, set by the stopping gateway).
        if isinstance(request, FastRequest):
            return request.protocol.cut
        return super()._cut_by_server(request)

    def _authenticate(self, request: web.Request) -> None:
        # admission identifies the caller again with the body's estimate: a dict look-up
        # and one HMAC, where inflating and parsing a hostile body cost milliseconds
        try:
            self._check_key(request)
        except OpenAIError:
            self.admission.counts["unauthorized"] += 1
            raise

    def _prompt_estimate(self, parsed: ParsedRequest | None) -> int | None:
        return estimate_prompt_tokens(parsed.request) if parsed is not None else None

    def _judge_retry(self, e: OpenAIError) -> None:
        """Failures after admission (no replica could answer) are retryable too: the same
        door budget decides whether the client hears `x-should-retry: true`."""
        self.admission.judge_retry(e)

    async def healthz(self, request: web.Request) -> web.Response:
        # Which of the gateway's processes answered (one port, several processes), its
        # routing-decision exchange with the others, and what it routes on: tokenizers
        # loaded (token blocks, else text) and the replicas whose cache reports it follows
        # (its siblings may differ while they start).
        body: dict[str, Any] = {"status": "ok", "process": self.process["index"]}
        if self.share is not None:
            body["routing_shared"] = {"sent": self.share.sent, "received": self.share.received}
        prefix_aware = getattr(self.dispatcher.policy, "prefix_aware", None)
        pa = prefix_aware() if prefix_aware is not None else None
        if pa is not None and pa.tokenizers is not None:
            body["routing_tokenizers"] = len(pa.tokenizers.loaded())
        if self.cache_views is not None:
            body["cache_reports"] = len(self.cache_views)
        return json_response(body)

    def process_view(self) -> dict[str, Any]:
        view: dict[str, Any] = dict(self.process)
        view["gc"] = heap_view()
        if (concurrency := self.dispatcher.concurrency) is not None:
            # what this process's own event loop adds to the latencies it measures (the
            # adaptive limits excuse 3x it in TTFT, at most 50 ms: admission/adaptive.py)
            view["loop_lag_ms"] = round(concurrency.loop_lag.lag_s * 1000, 2)
        if self.share is not None:
            view["routing_shared"] = {"sent": self.share.sent, "received": self.share.received}
        return view

    def workers_view(self) -> dict[str, Any]:
        """The pool as this gateway process sees it (served by the admin listener)."""
        workers = self.dispatcher.workers()
        if self.cache_views is not None:
            for w in workers:
                v = self.cache_views.get(w["worker_id"])
                w["cache"] = (
                    {"reported": True, "blocks": len(v.held), "digest": v.digest()}
                    if v is not None
                    else {"reported": False}
                )
        view: dict[str, Any] = {
            "workers": workers,
            "process": self.process_view(),
            "admission": self.admission.stats(),
        }
        if (concurrency := self.dispatcher.concurrency) is not None:
            view["admission"]["replica_limits"] = {
                wid: concurrency.limit(wid) for wid in sorted(concurrency.replicas)
            }
        describe = getattr(self.dispatcher.policy, "describe", None)
        if describe is not None:
            view["routing"] = describe()
        return view

    async def _dispatch(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        deadline: float,
        info: CallInfo,
    ) -> web.StreamResponse:
        if session := request.headers.get(self.session_header):
            parsed.request.session_key = session_key(session)  # a header may not be UTF-8
        if self.tracer is None:
            return await self._forward(request, parsed, raw, deadline, info)
        return await self._traced(request, parsed, raw, deadline, info)

    async def _traced(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        deadline: float,
        info: CallInfo,
    ) -> web.StreamResponse:
        """`_forward` in a server span with the GenAI semantic-convention attributes."""
        assert self.tracer is not None
        req = parsed.request
        attributes = request_attributes(req)
        attributes["breakwater.stream"] = parsed.stream
        op = attributes["gen_ai.operation.name"]
        parent = context_from(request.headers) if "traceparent" in request.headers else None
        with self.tracer.start_as_current_span(
            f"{op} {req.model}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            response = await self._forward(request, parsed, raw, deadline, info)
            span.set_attribute("gen_ai.response.model", req.model)
            span.set_attribute("breakwater.attempts", info.attempts)
            span.set_attribute("breakwater.replica", info.worker_id or "")
            span.set_attribute("http.response.status_code", response.status)
            if info.usage:
                span.set_attribute("gen_ai.usage.input_tokens", info.usage[0])
                span.set_attribute("gen_ai.usage.output_tokens", info.usage[1])
            return response

    async def _forward(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        deadline: float,
        info: CallInfo,
    ) -> web.StreamResponse:
        mirror = None
        # A mirror goes over Generate, which cannot carry what `unsupported` names: its
        # answer would be compared with one that could (a tool call, JSON output).
        if self.shadows is not None and self.shadows.config and parsed.unsupported is None:
            mirror = self.shadows.mirror(parsed.request, max(0.001, deadline - time.monotonic()))
        if mirror is None:
            return await self._call(request, parsed, raw, deadline, info, None)
        try:
            return await self._call(request, parsed, raw, deadline, info, mirror)
        finally:
            mirror.done()  # with what was kept; a no-op when the answer was handed in

    async def _call(
        self,
        request: web.Request,
        parsed: ParsedRequest,
        raw: bytes,
        deadline: float,
        info: CallInfo,
        mirror: Mirror | None,
    ) -> web.StreamResponse:
        if salt := parsed.request.cache_salt:  # the tenant's, if it isolates its cache
            raw = with_member(raw, b'"cache_salt":' + orjson.dumps(salt))
            if len(raw) > self.limits.max_body_bytes:  # the worker's limit is the same
                raise too_large(self.limits.max_body_bytes)
        relay = RawRequest(_PATHS[parsed.kind], raw, parsed.stream, parsed.unsupported)
        try:
            call = await self.dispatcher.open(
                parsed.request, max(0.001, deadline - time.monotonic()), info, relay
            )
        except UpstreamError as e:
            raise from_upstream(e) from None
        if parsed.stream or not call.raw:  # a relayed whole answer shows no first token
            info.first_output_at = time.monotonic()
        if not call.raw:
            assert isinstance(call.first, pb.GenerateResponse)
            deltas = _Deltas(call) if mirror is None else _MirroredDeltas(call, mirror)
            return await self._respond(request, parsed, deltas, call.first, info)
        headers = call_headers(parsed.request.request_id, info) | self.cors(request)
        if not parsed.stream:
            await call.close()
            assert isinstance(call.first, bytes)
            info.usage = _usage_of(call.first)
            if mirror is not None:
                mirror.keep(call.first)
            return web.Response(body=call.first, headers=headers, content_type="application/json")
        return await self._relay_stream(request, call, headers, info, mirror)

    async def _relay_stream(
        self,
        request: web.Request,
        call: Call,
        headers: dict[str, str],
        info: CallInfo,
        mirror: Mirror | None = None,
    ) -> web.StreamResponse:
        out = stream_response(
            request,
            {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers},
        )
        sending = self.send_watch.start(request, headers["X-Request-Id"])
        try:
            data: bytes | pb.GenerateResponse | None = call.first
            tail = last = held = b""
            usage = UsageReader()  # the worker's comment, at the end (serving/usage_comment)
            try:
                # headers go out with the first bytes; inside, so the call is closed
                # whatever preparing raises
                await out.prepare(request)
                while data is not None:
                    assert isinstance(data, bytes)
                    data = usage.feed(data)
                    # with the event begun in an earlier read (held), whole once it ends
                    if _ERROR_EVENT in (seen := held + data if held else data):
                        _note_error_event(seen, info)
                    if call.finished:
                        data += usage.flush()
                    info.output_chunks += data.count(b"data: ")
                    if mirror is not None:
                        mirror.keep(data)
                    if call.finished:  # nothing more will come: send it with the end
                        last, rest = _whole_events(held + data)
                        last, held = last + _last_event(rest), b""
                        tail = (tail + last)[-32:]
                        break
                    # Whole events only: the bytes after the last event's end wait for the
                    # rest, so a stream that breaks mid-event sends no half event (a client
                    # parsing it failed on broken JSON and never saw the error event).
                    if held or not data.endswith(b"\n\n"):  # nearly always ends one
                        data, held = _whole_events(held + data)
                    if data:
                        tail = (tail + data)[-32:]
                        await out.write(data)
                        sending.writes += 1
                    data = await call.next()
                else:  # the body ended: an unfinished event is no event (SSE drops it too)
                    last, held = _last_event(held) + usage.flush(), b""
                    tail = (tail + last)[-32:]
                if b"[DONE]" not in tail:
                    last += _ended_early(tail, info)
            except UpstreamError as e:
                last = _ended_early(tail, info, from_upstream(e))
                if mirror is not None:
                    mirror.raw.clear()  # a broken answer is not one to compare
            finally:
                await call.close()
            info.usage = usage.usage or info.usage
            await out.write_eof(last)
        except ConnectionError:
            self._client_left(headers["X-Request-Id"], "mid-stream")
        finally:
            self.send_watch.stop(sending)
        return out


def _usage_of(body: bytes) -> tuple[int, int, int] | None:
    """The usage of a relayed whole answer (it is in memory already; ~5 us to parse).

    An answer that is not a JSON object raises OpenAIError (502): it is not passed on as one.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        raise OpenAIError(502, "the upstream's answer is not a JSON object", "upstream_error")
    try:
        u = doc.get("usage") or {}
        details = u.get("prompt_tokens_details") or {}
        return (
            int(u["prompt_tokens"]),
            int(u["completion_tokens"]),
            int(details.get("cached_tokens") or 0),
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
MAX_HELD = 1 << 20
"""Past this, held bytes go out as they are: an upstream that frames no events at all."""


def _whole_events(data: bytes) -> tuple[bytes, bytes]:
    """(the complete SSE events in `data`, the start of an unfinished one)."""
    cut = 0
    for end in _EVENT_ENDS:
        if (i := data.rfind(end)) >= 0:
            cut = max(cut, i + len(end))
    if cut == 0 and len(data) > MAX_HELD:
        return data, b""
    return data[:cut], data[cut:]


def _last_event(rest: bytes) -> bytes:
    """What a body's unterminated last bytes send: an unfinished event is no event (an SSE
    client drops it too), but a final [DONE] without its blank line still counts."""
    return rest.rstrip() + b"\n\n" if rest.strip() == b"data: [DONE]" else b""


def _ended_early(tail: bytes, info: CallInfo, err: OpenAIError | None = None) -> bytes:
    """An error event and [DONE] after a relayed stream that broke or ended without [DONE]."""
    err = err or OpenAIError(502, "upstream ended early", "upstream_error")
    info.stream_error = (err.status, err.type)
    sep = b"" if not tail or tail.endswith(b"\n\n") else b"\n\n"
    return sep + sse(err.body()) + _DONE


def _note_error_event(data: bytes, info: CallInfo) -> None:
    """The stream failed, though its 200 went out: the log and metrics say how."""
    at = data.find(_ERROR_EVENT) + len(b"data: ")
    end = data.find(b"\n", at)
    try:
        kind = orjson.loads(data[at : end if end >= 0 else None])["error"]["type"]
        info.stream_error = (STATUS_OF_TYPE.get(kind, 502), str(kind))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        info.stream_error = (502, "upstream_error")


class _Deltas:
    """A delta call's items after the first, as the shared routes read them; closing it
    (which they always do) ends the call, even if it was never iterated."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        item = await self.call.next()
        if item is None:
            raise StopAsyncIteration
        assert isinstance(item, pb.GenerateResponse)
        return item

    async def aclose(self) -> None:
        await self.call.close()


class _MirroredDeltas(_Deltas):
    """Deltas that also collect the answer's text for a shadow comparison; the answer is
    handed over at its last delta (the routes stop reading there)."""

    def __init__(self, call: Call, mirror: Mirror) -> None:
        super().__init__(call)
        self.mirror = mirror
        self.parts: list[str] = []
        assert isinstance(call.first, pb.GenerateResponse)
        self._seen(call.first)

    def _seen(self, item: pb.GenerateResponse) -> None:
        self.parts.append(item.text)
        if item.finish_reason and item.finish_reason != pb.FINISH_REASON_ERROR:
            self.mirror.done("".join(self.parts))

    async def __anext__(self) -> pb.GenerateResponse:
        item = await super().__anext__()
        self._seen(item)
        return item
