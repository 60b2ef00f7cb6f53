"""The gateway's gRPC front end: the same Generate contract, proxied to a worker.

Like the HTTP front end, every call ends in one `Finished` record (metrics and the request
log, through `on_finished`) with its outcome as the HTTP status a gateway would have
answered, and, when tracing is on, in a server span continuing the caller's `traceparent`.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
from opentelemetry.trace import SpanKind, Status, StatusCode, use_span

from gateway.admission.admission import (
    Admission,
    Ticket,
    estimate_prompt_tokens,
    estimate_request_tokens,
)
from gateway.dispatch import Dispatcher
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from proto.limits import DEFAULT_LIMITS, RequestLimits
from proto.openai_compat import MAX_SESSION_KEY, OpenAIError, check_generate
from serving.calls import NOT_FOUND, UNAVAILABLE, CallInfo, UpstreamError
from serving.grpc_requests import refuse_undecodable
from serving.openai_http import Finished, from_upstream, used_tokens
from serving.tracing import context_from, request_attributes

# Admission answers in HTTP terms; gRPC callers get the matching status codes.
_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
CLIENT_LEFT = 499
"""A call that ends without an outcome of its own: the caller cancelled or went away."""
DEADLINE_SLACK_S = 0.05
"""A cancel this close to the caller's deadline is the deadline (a 504), not the caller
leaving: grpc's own timer fired 10-20 ms before the deadline the handler computed."""


class GatewayInference(pb_grpc.InferenceServicer):
    def __init__(
        self,
        dispatcher: Dispatcher,
        default_timeout_s: float,
        admission: Admission | None = None,
        max_timeout_s: float = 3600.0,
    ) -> None:
        self.dispatcher = dispatcher
        self.default_timeout_s = default_timeout_s
        self.max_timeout_s = max_timeout_s
        """A client's own deadline is honoured up to this (as X-Request-Timeout-Ms is);
        without one the call gets `default_timeout_s`."""
        self.admission = admission
        self.session_header = "x-session-id"
        """Metadata key of the sticky-routing key, when the request has no session_key."""
        self.on_finished: Callable[[Finished], None] | None = None
        """Told of every Generate call once it has ended (metrics, the request log)."""
        self.tracer: Any | None = None
        """OpenTelemetry tracer when tracing is on: a server span per Generate call."""
        self.limits: RequestLimits = DEFAULT_LIMITS
        """The HTTP front end's bounds on a request, checked here before admission."""
        self.client_disconnects = 0
        """Calls their caller cancelled (or left) before the answer ended, as the HTTP
        front end counts clients that went away."""
        self.cut_from = math.inf
        """When a stopping gateway's gRPC server cancels the calls left (monotonic): a call
        cancelled from then on was cut by the drain, not left by its caller."""

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        await refuse_undecodable(request, context)
        started = time.monotonic()
        metadata = context.invocation_metadata() or ()
        for key, value in metadata:
            if not isinstance(value, str):
                continue
            if key == "x-request-id" and not request.request_id:
                request.request_id = value  # as HTTP's X-Request-Id; checked below
            elif key == self.session_header and not request.session_key:
                request.session_key = value[:MAX_SESSION_KEY]
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        # Wanted by the gateway's own accounting (tokens, cost, the request log) whether
        # the client asked or not, as the HTTP front end asks; handed on only if it asked.
        usage_wanted = request.stream_options.include_usage
        request.stream_options.include_usage = True
        info = CallInfo()
        # The model as asked (the dispatcher may swap in a version of it), as HTTP records
        # it; a request refused for its id or model logs neither as sent (a 3 MB id made a
        # 3 MB log line).
        logged_id = request.request_id if _valid_id(request.request_id, self.limits) else ""
        logged_model = request.model if len(request.model) <= self.limits.max_model_chars else ""
        done = Finished(
            logged_id or uuid.uuid4().hex,
            logged_model,
            None,
            CLIENT_LEFT,
            started,
            0.0,
            True,
            info,
        )
        code = grpc.StatusCode.CANCELLED
        span = self._start_span(request, metadata) if self.tracer is not None else None
        remaining = context.time_remaining()
        timeout = (
            min(max(remaining, 0.0), self.max_timeout_s)
            if remaining is not None
            else self.default_timeout_s
        )
        deadline = started + timeout
        ticket: Ticket | None = None
        stream: AsyncGenerator[pb.GenerateResponse, None] | None = None
        try:
            check_generate(request, self.limits)
            if self.admission is not None:
                # the key first, as over HTTP: a caller without one must not learn from a
                # NOT_FOUND which model names exist
                self._authenticate(metadata)
            if request.model and not self.dispatcher.has_model(request.model):
                # before admission, as HTTP's 404: an unknown model was charged to the
                # tenant's quota, and its refusals (429) labelled metrics with any name
                raise UpstreamError(
                    NOT_FOUND, f"the model `{request.model}` does not exist", param="model"
                )
            ticket = await self._admit(request, metadata, deadline)
            if ticket is not None:
                done.tenant, done.key_id = ticket.tenant, ticket.key_id
                Admission.salt(request, ticket)
            stream = self.dispatcher.generate(
                request, max(0.001, deadline - time.monotonic()), info
            )
            # The span is current only while the call opens (no yield inside): the attempt
            # spans become its children, and it is never left attached to a suspended
            # generator that something else may close.
            with _current(span):
                resp = await anext(stream, None)
            if resp is not None:
                info.first_output_at = time.monotonic()
            finished = False
            while resp is not None:
                info.output_chunks += len(resp.token_ids)
                finished = bool(resp.finish_reason)
                if finished and resp.HasField("usage"):
                    u = resp.usage
                    info.usage = (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
                    if not usage_wanted:
                        resp.ClearField("usage")
                yield resp
                resp = await anext(stream, None)
            if not finished:  # a cut answer must not end as a whole one (status OK)
                raise UpstreamError(UNAVAILABLE, "the answer ended before it finished")
            done.status, code = 200, grpc.StatusCode.OK
        except OpenAIError as e:  # out of bounds, or refused by admission
            done.status, done.error_type = e.status, e.type
            done.tenant, done.key_id = e.tenant, e.key_id
            code = _GRPC_CODES.get(e.status, grpc.StatusCode.UNKNOWN)
            trailing: list[tuple[str, str]] = []
            if _printable(e.param):  # the offending field, as the worker's service says it
                trailing.append(("param", e.param))
            # gRPC's retry policy: a negative pushback means "do not retry"
            pushback = -1 if e.should_retry is False else e.retry_after_ms
            if pushback is not None:
                trailing.append(("grpc-retry-pushback-ms", str(pushback)))
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            await context.abort(code, e.message)
        except UpstreamError as e:
            # for metrics and the request log: the status the HTTP front end answers
            as_http = from_upstream(e)
            done.status, done.error_type = as_http.status, as_http.type
            # A replica's CANCELLED (a worker stopping) is its failure, as HTTP's 502 says;
            # passed on as is, a client read it as its own cancel, and the log as one.
            code = grpc.StatusCode.UNAVAILABLE if e.code == "CANCELLED" else grpc.StatusCode[e.code]
            if self.admission is not None and info.first_output_at is None:
                # the door's retry budget says whether to retry, as HTTP's x-should-retry
                self.admission.judge_retry(as_http)
            trailing = []
            if _printable(e.param):  # the worker's (its check of the request), passed on
                trailing.append(("param", e.param))
            if as_http.should_retry is False:
                trailing.append(("grpc-retry-pushback-ms", "-1"))
            elif e.retry_after_ms is not None:
                trailing.append(("grpc-retry-pushback-ms", str(e.retry_after_ms)))
            if trailing:
                context.set_trailing_metadata(tuple(trailing))
            await context.abort(code, e.message)
        except Exception:
            done.status, code = 500, grpc.StatusCode.UNKNOWN
            raise
        finally:
            done.ended = time.monotonic()  # when it ended, before the cleanup's awaits
            if stream is not None:
                await stream.aclose()
            if ticket is not None:
                ticket.release(used_tokens(info, estimate_prompt_tokens(request)))
            if (
                done.status == CLIENT_LEFT
                and remaining is not None
                and done.ended >= deadline - DEADLINE_SLACK_S
            ):
                # The caller's own deadline: grpc cancels the handler about when ours fires
                # (a few ms before, as measured), and half the time its cancel won, logged
                # as the caller leaving (499).
                done.status, done.error_type = 504, "timeout"
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            elif done.status == CLIENT_LEFT and done.ended >= self.cut_from:
                done.status, done.error_type = 503, "service_unavailable"  # the drain's cut
                code = grpc.StatusCode.UNAVAILABLE
            if done.status == CLIENT_LEFT:
                self.client_disconnects += 1
            if span is not None:
                _end_span(span, request, done, code)
            if self.on_finished is not None:
                self.on_finished(done)

    def _start_span(self, request: pb.GenerateRequest, metadata: Any) -> Any:
        """A server span with the HTTP front end's GenAI attributes, plus the RPC's."""
        assert self.tracer is not None
        attributes = request_attributes(request)
        op = attributes["gen_ai.operation.name"]
        attributes.update(
            {
                "breakwater.stream": True,
                "rpc.system": "grpc",
                "rpc.service": "breakwater.v1.Inference",
                "rpc.method": "Generate",
            }
        )
        carrier = {k: v for k, v in metadata if k == "traceparent" and isinstance(v, str)}
        parent = context_from(carrier) if carrier else None
        return self.tracer.start_span(
            f"{op} {request.model}", context=parent, kind=SpanKind.SERVER, attributes=attributes
        )

    def _authenticate(self, metadata: Any) -> None:
        assert self.admission is not None
        auth = dict(metadata).get("authorization")
        try:
            self.admission.tenants.identify(str(auth) if auth else None)
        except OpenAIError:
            self.admission.counts["unauthorized"] += 1
            raise

    async def _admit(
        self, request: pb.GenerateRequest, metadata: Any, deadline: float
    ) -> Ticket | None:
        """A ticket, or OpenAIError (in HTTP terms) to refuse the call."""
        if self.admission is None:
            return None
        md = dict(metadata)
        auth = md.get("authorization")
        retries = md.get("x-retry-count") or md.get("grpc-previous-rpc-attempts")
        est = estimate_request_tokens(request)
        return await self.admission.admit(
            str(auth) if auth else None,
            est,
            int(request.priority) if request.HasField("priority") else None,  # None: tenant's
            deadline,
            retry=retries is not None and str(retries) != "0",
        )

    async def WatchCache(
        self, request: pb.WatchCacheRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CacheUpdate]:
        """A worker's RPC; the generated base raised NotImplementedError, which grpc logged
        with a traceback and answered with the exception's class name."""
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "a Breakwater gateway does not report a prefix cache: ask its workers (WatchCache)",
        )
        yield pb.CacheUpdate()  # pragma: no cover - abort raises; this makes a generator

    async def Stats(
        self, request: pb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatsResponse:
        await refuse_undecodable(request, context)
        workers = self.dispatcher.registry.workers()
        ready = [w for w in workers if w.ready]
        return pb.StatsResponse(
            model_id=",".join(self.dispatcher.models()),
            state="SERVING" if ready else "NOT_SERVING",
            queue_depth=int(sum(w.stats.get("queue_depth", 0) for w in ready)),
            running=int(sum(w.stats.get("running", 0) for w in ready)),
            in_flight=sum(self.dispatcher.outstanding.values()),
            kv_cache_usage=(
                sum(w.stats.get("kv_cache_usage", 0.0) for w in ready) / len(ready) if ready else 0
            ),
        )


def _printable(value: str | None) -> bool:
    """Whether `value` may go in metadata: printable ASCII (an upstream's `param` of any
    other character made grpc fail the call with INTERNAL 'Invalid metadata')."""
    return value is not None and all(" " <= c <= "~" for c in value)


def _valid_id(value: str, limits: RequestLimits) -> bool:
    return len(value) <= limits.max_request_id_chars and _printable(value)


def _current(span: Any) -> Any:
    """`span` as the current span (what the dispatcher's attempt spans hang from)."""
    if span is None:
        return contextlib.nullcontext()
    return use_span(span, record_exception=False, set_status_on_exception=False)


def _end_span(
    span: Any, request: pb.GenerateRequest, done: Finished, code: grpc.StatusCode
) -> None:
    info = done.info
    span.set_attribute("gen_ai.response.model", request.model)
    span.set_attribute("breakwater.attempts", info.attempts)
    span.set_attribute("breakwater.replica", info.worker_id or "")
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if info.usage:
        span.set_attribute("gen_ai.usage.input_tokens", info.usage[0])
        span.set_attribute("gen_ai.usage.output_tokens", info.usage[1])
    if done.status >= 500:
        span.set_attribute("error.type", done.error_type or str(done.status))
        span.set_status(Status(StatusCode.ERROR))
    span.end()
