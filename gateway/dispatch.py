"""Route a request to a worker and stream its answer, retrying elsewhere before the first token.

The commit point is the first output (a delta, or the first bytes of a relayed OpenAI
response): until it arrives nothing has reached the client, so a failure can be retried on
another replica (within the retry budget and the deadline, after a full-jitter backoff);
after it, an error ends the stream. Every attempt's outcome feeds the replica's circuit
breaker; cancellation feeds nothing.

Two kinds of call share that loop. An HTTP client's OpenAI request to an OpenAI-compatible
upstream is relayed: its body goes up as is and the upstream's bytes come back untouched
(no JSON or protobuf work per chunk). Everything else goes through the Generate contract
as deltas. Per-chunk costs are kept to a read and a write: the idle timeout is a deadline
checked by the read, not a timer task per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import orjson
from opentelemetry.trace import SpanKind, Status, StatusCode
from tenacity import RetryCallState, wait_random_exponential

from gateway.admission.adaptive import DEFAULT_BASELINE_S, AdaptiveConcurrency
from gateway.registry.base import Registry, WorkerInfo, WorkerState, ready_workers
from gateway.resilience.breaker import HALF_OPEN, BreakerBoard, BreakerConfig
from gateway.resilience.retry_budget import RetryBudget
from gateway.routing.policy import CombinedLoads, RoutingPolicy, WeightedLoads
from gateway.upstream.base import Upstream
from gateway.upstream.http_client import HTTPError, Response
from gateway.upstream.openai_http import (
    RELAY_KIND,
    OpenAIHTTPUpstream,
    UpstreamUnreachable,
    error_from,
    wrong_type,
)
from proto import inference_pb2 as pb
from proto.openai_compat import OpenAIError
from proto.prompt_ids import fits_with_ids, with_body_field
from serving.calls import (
    CANCELLED,
    DEADLINE_EXCEEDED,
    INTERNAL,
    INVALID_ARGUMENT,
    NOT_FOUND,
    RESOURCE_EXHAUSTED,
    UNAVAILABLE,
    CallInfo,
    UpstreamError,
)
from serving.tracing import TRACEPARENT, traceparent_of

log = logging.getLogger(__name__)

# Outcomes that say the replica is unhealthy (its breaker counts them). RESOURCE_EXHAUSTED
# is a healthy replica that is busy, and client errors are the caller's fault.
# CANCELLED from an upstream is the replica's doing (the gateway's own cancellations end
# its handler instead): a worker's gRPC server that stops cuts the calls that reached it in
# its last moments, so a rolling restart lost a request now and then (chaos suite,
# rolling-restart over gRPC: 502 "cancelled" after one attempt, 1 run in 10 on 2 loaded
# cores). Like UNAVAILABLE, it is retried elsewhere before the first token.
_HEALTH_FAILURES = {UNAVAILABLE, CANCELLED, INTERNAL, DEADLINE_EXCEEDED, "UNKNOWN", "ABORTED"}
_RETRYABLE = _HEALTH_FAILURES | {RESOURCE_EXHAUSTED}


@dataclass
class DispatchSettings:
    max_attempts: int = 3
    ttft_timeout_s: float = 60.0
    """Per attempt: no first delta by then counts as a failure and is retried elsewhere."""
    idle_timeout_s: float = 60.0
    """Between deltas once streaming."""
    backoff_base_s: float = 0.02
    backoff_max_s: float = 0.5
    retry_budget_ratio: float = 0.2
    retry_budget_floor: int = 10
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    relay_to_workers: bool = True
    """An HTTP client's OpenAI stream to a Breakwater worker that serves an OpenAI port too
    goes there as is, and its SSE bytes come back untouched: 2.4x less gateway CPU than the
    gRPC round trip's JSON -> protobuf -> JSON per delta (peer_bench --workload chat)."""
    forward_token_ids: bool = True
    """Requests carry the token ids routing computed to workers with the same tokenizer."""


RELAY_RETRY_S = 60.0
"""A worker's OpenAI port that refused a connection is left alone (gRPC instead) this long:
a port the worker listens on but the network does not let through (a firewall, a Service
that maps only the gRPC port) must not cost every request a failed connect."""


def _with_model(body: bytes, model: str) -> bytes:
    data = orjson.loads(body)
    data["model"] = model
    return orjson.dumps(data)


MAX_RELAY_LINE = 16 << 20
"""The longest line a relayed stream may carry. An OpenAI event is one line, the largest
an echoed prompt (a few MiB); an upstream past this is not sending SSE."""


@dataclass(slots=True)
class RawRequest:
    """An HTTP client's OpenAI request, forwarded as is to OpenAI-compatible upstreams."""

    path: bytes
    body: bytes
    stream: bool
    unsupported: OpenAIError | None = None
    """What the body asks that the Generate contract cannot carry (ParsedRequest's): it
    may go as is to an OpenAI-compatible upstream, never over Generate."""


class Call:
    """A committed upstream call: its first output is here, the rest is read with `next`.

    Items are `bytes` (a relayed OpenAI response body, in the pieces it arrived in) when
    `raw`, else `pb.GenerateResponse` deltas. `next` returns None at the end and raises
    UpstreamError if the upstream fails mid-stream; `close` must be called once.
    """

    __slots__ = (
        "_attempt",
        "_closed",
        "_deltas",
        "_idle",
        "_line",
        "_quiet_since",
        "_resp",
        "first",
        "raw",
    )

    def __init__(
        self,
        attempt: _Attempt,
        first: bytes | pb.GenerateResponse,
        idle_s: float,
        deltas: AsyncIterator[pb.GenerateResponse] | None = None,
        resp: Response | None = None,
    ) -> None:
        self._attempt = attempt
        self.first = first
        self._idle = idle_s
        self._deltas = deltas
        self._resp = resp
        self.raw = resp is not None
        self._closed = False
        self._line = 0
        """Bytes since the last newline of a relayed stream."""
        self._quiet_since = 0.0
        """Since when a relayed stream has sent only bytes without an event (0: it has not)."""

    @property
    def worker_id(self) -> str:
        return self._attempt.worker.worker_id

    @property
    def finished(self) -> bool:
        """A relayed response has arrived whole: `next` would return None."""
        return self._resp is not None and self._resp.drained

    async def next(self) -> bytes | pb.GenerateResponse | None:
        limit = min(self._idle, self._attempt.deadline - time.monotonic())
        try:
            if self._resp is not None:
                data = await self._resp.read_some(asyncio.get_running_loop().time() + limit)
                if not data:
                    self._attempt.outcome = True
                    return None
                # Relayed unparsed; two scans that stop at their first hit keep the framing
                # honest: no endless line, and the idle limit counts from the last event,
                # not the last byte (an upstream sending only comments or blank lines).
                nl = data.rfind(b"\n")
                self._line = self._line + len(data) if nl < 0 else len(data) - nl - 1
                if self._line > MAX_RELAY_LINE:
                    raise UpstreamError(
                        INTERNAL, f"{self.worker_id} sent a line over {MAX_RELAY_LINE} bytes"
                    )
                if b"data:" in data:
                    self._quiet_since = 0.0
                elif not self._quiet_since:
                    self._quiet_since = time.monotonic()
                elif time.monotonic() - self._quiet_since > self._idle:
                    raise UpstreamError(
                        DEADLINE_EXCEEDED, f"no events from {self.worker_id} in {self._idle:g} s"
                    )
                return data
            assert self._deltas is not None
            async with asyncio.timeout(max(0.0, limit)):
                return await anext(self._deltas)
        except StopAsyncIteration:
            self._attempt.outcome = True
            return None
        except TimeoutError:
            self._attempt.timed_out(limit == self._idle)
            if limit == self._idle:
                why = f"idle time between tokens exceeded on {self.worker_id}"
            else:  # the caller's deadline, which the replica is not to blame for
                why = "the request's deadline was exceeded"
            raise UpstreamError(DEADLINE_EXCEEDED, why) from None
        except HTTPError as e:
            self._attempt.outcome = False
            raise UpstreamError(UNAVAILABLE, f"{self.worker_id}: {e}") from None
        except UpstreamError as e:
            self._attempt.failed(e)
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._resp is not None:
            if self._resp.complete and self._attempt.outcome is None:
                self._attempt.outcome = True
            self._resp.release()
        try:
            if self._deltas is not None:
                await self._deltas.aclose()
        finally:  # a second cancel during aclose must not keep the replica's count up
            self._attempt.end()


class _Attempt:
    """One try on one worker: load accounting, breaker bookkeeping, and its deadline."""

    __slots__ = (
        "board",
        "calm",
        "deadline",
        "dispatcher",
        "outcome",
        "pool",
        "prefill",
        "probe",
        "started",
        "worker",
    )

    def __init__(
        self, dispatcher: Dispatcher, worker: WorkerInfo, pool: list[str], deadline: float
    ) -> None:
        self.dispatcher = dispatcher
        self.worker = worker
        self.deadline = deadline
        self.pool = pool
        """The ready workers' ids when it started: the breaker's ejection limits need them."""
        self.outcome: bool | None = None  # None: cancelled, records nothing
        self.probe = dispatcher.breakers.state(worker.worker_id) == HALF_OPEN
        """It holds the replica's probe slot (allow() just took it, in _pick)."""
        self.started = time.monotonic()
        self.prefill = 0.0
        """Prompt tokens routing expects the replica to prefill for this attempt."""
        out = dispatcher.outstanding
        self.calm = all(out[worker.worker_id] <= out[w] for w in pool)
        """No busier than any peer, from this gateway's view, when it started: only such an
        attempt's TTFT judges the replica's health (a burst routing sent it is no sickness)."""
        out[worker.worker_id] += 1
        if dispatcher.loads_changed is not None:
            dispatcher.loads_changed()

    def prefilled(self) -> None:
        """Hand routing's prefill estimate back (once): the first output came, the attempt
        ended, or, for a whole answer that shows no first token, a typical TTFT passed."""
        if self.prefill:
            self.dispatcher.policy.prefilled(self.worker.worker_id, self.prefill)
            self.prefill = 0.0

    def first_output(self) -> None:
        ttft = time.monotonic() - self.started
        d = self.dispatcher
        self.prefilled()
        d.breakers.observe_ttft(self.worker.worker_id, ttft, self.pool, judged=self.calm)
        if d.concurrency is not None:
            d.concurrency.observe(self.worker.worker_id, ttft)

    def failed(self, e: UpstreamError) -> None:
        if e.code == DEADLINE_EXCEEDED and time.monotonic() >= self.deadline:
            return  # the caller's deadline (passed on to the upstream): see timed_out
        self.outcome = e.code not in _HEALTH_FAILURES
        if e.code in (UNAVAILABLE, CANCELLED):
            self.worker.state = WorkerState.NOT_SERVING  # until a probe says otherwise

    def timed_out(self, own_limit: bool) -> None:
        """A time limit ran out. The gateway's own (TTFT, idle) judge the replica; the
        caller's deadline, as short as a client likes (X-Request-Timeout-Ms), does not:
        counting it would let any client eject healthy replicas by asking for 1 ms."""
        if own_limit:
            self.outcome = False

    def end(self) -> None:
        d = self.dispatcher
        wid = self.worker.worker_id
        self.prefilled()
        d.outstanding[wid] -= 1
        breakers = d.breakers
        if self.probe:
            breakers.release_probe(wid)
        # While a replica is on probation only its probe's outcome counts: a call started
        # before it was ejected (here, or by a sibling or another gateway) freed the probe's
        # slot and closed the breaker with an old success
        if self.outcome is not None and (self.probe or breakers.state(wid) != HALF_OPEN):
            breakers.record(wid, self.outcome, self.pool)
        if d.loads_changed is not None:
            d.loads_changed()


class Dispatcher:
    def __init__(
        self,
        registry: Registry,
        policy: RoutingPolicy,
        make_upstream: Callable[[WorkerInfo], Upstream],
        settings: DispatchSettings | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self._make_upstream = make_upstream
        self._upstreams: dict[tuple[str, str, str], Upstream] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._retiring: list[Upstream] = []
        self._relay_refused: dict[str, tuple[str, float]] = {}
        """worker_id -> (its OpenAI URL that refused a connection, until when it is skipped)."""
        self.outstanding: Counter[str] = Counter()
        self.settings = s = settings or DispatchSettings()
        self.breakers = BreakerBoard(s.breaker)
        self.retry_budget = RetryBudget(s.retry_budget_ratio, s.retry_budget_floor)
        # tenacity computes the backoff; the loop is ours because an attempt is a stream
        # whose first delta is the commit point, which tenacity's retry loop cannot express.
        self._wait = wait_random_exponential(multiplier=s.backoff_base_s, max=s.backoff_max_s)
        self.counters: Counter[str] = Counter()
        self.blocked: Callable[[str], bool] = lambda _worker_id: False
        """An operator keeps new requests away from these (drained or ejected)."""
        self.resolve_model: Callable[[str], str] = lambda model: model
        """The version a request for `model` goes to (an operator's traffic split)."""
        self.concurrency: AdaptiveConcurrency | None = None
        """Per-replica concurrency limits learnt from TTFT (admission/adaptive.py): routing
        prefers replicas under theirs."""
        self.weights: Callable[[], Mapping[str, float]] = dict
        """Operator-set replica weights (absent: 1; 0: no new requests, like a drain)."""
        self.model_aliases: Callable[[], Iterable[str]] = tuple
        """Model names that exist only as splits over versions."""
        self.tracer: Any | None = None
        """OpenTelemetry tracer when tracing is on (serving.tracing): a span per attempt."""
        self.loads_changed: Callable[[], None] | None = None
        """Told of every change of `outstanding` (the routing share tells the others)."""
        self.remote_loads: Callable[[], Mapping[str, int]] | None = None
        """Calls in flight per replica from the fleet's other gateway processes: routing
        balances on the sum (decision_share.RemoteLoads)."""

    def upstream_for(self, info: WorkerInfo) -> Upstream:
        key = (info.worker_id, info.address, info.kind)
        up = self._upstreams.get(key)
        if up is None:
            up = self._upstreams[key] = self._make_upstream(info)
        return up

    def _relay_for(self, info: WorkerInfo, up: Upstream, stream: bool) -> OpenAIHTTPUpstream | None:
        """Where an HTTP client's OpenAI request goes as is (None: over `up`'s deltas)."""
        if isinstance(up, OpenAIHTTPUpstream):
            return up
        url = info.openai_url
        # Streams only: a whole answer relayed shows no first token, and over gRPC its TTFT
        # still feeds the metrics, the slow-replica detector and the concurrency limits.
        if not (url and stream and self.settings.relay_to_workers):
            return None
        refused = self._relay_refused.get(info.worker_id)
        if refused is not None:
            if refused[0] == url and time.monotonic() < refused[1]:
                return None
            del self._relay_refused[info.worker_id]
        key = (info.worker_id, url, RELAY_KIND)
        relay = self._upstreams.get(key)
        if relay is None:
            for old in [k for k in self._upstreams if k[0] == info.worker_id and k[1] != url]:
                if old[2] == RELAY_KIND:  # the port it had before a restart
                    self._retire(old)
            made = self._make_upstream(WorkerInfo(info.worker_id, url, RELAY_KIND))
            relay = self._upstreams[key] = made
        assert isinstance(relay, OpenAIHTTPUpstream)
        return relay

    def prune_upstreams(self, live: set[str]) -> None:
        """Close the clients of replicas no longer listed (deregistered), once their calls
        have finished: a deregistration never cuts a call short."""
        for key in [k for k in self._upstreams if k[0] not in live]:
            self._retire(key)

    def _retire(self, key: tuple[str, str, str]) -> None:
        up = self._upstreams.pop(key)
        self._retiring.append(up)
        task = asyncio.get_running_loop().create_task(self._close_when_idle(key[0], up))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, worker_id: str, up: Upstream) -> None:
        deadline = time.monotonic() + 3600.0
        while self.outstanding.get(worker_id, 0) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        self._retiring.remove(up)
        await up.close()

    def models(self) -> list[str]:
        served = {m for w in self.registry.workers() for m in w.models}
        return sorted(served.union(self.model_aliases()))

    def has_model(self, model: str) -> bool:
        return any(model in w.models for w in self.registry.workers()) or (
            model in self.model_aliases()
        )

    def workers(self) -> list[dict[str, Any]]:
        breakers = self.breakers.snapshot()
        out = []
        for w in self.registry.workers():
            d = asdict(w)
            d["state"] = str(w.state)
            d["outstanding"] = self.outstanding.get(w.worker_id, 0)
            if self.remote_loads is not None:
                d["outstanding_elsewhere"] = self.remote_loads().get(w.worker_id, 0)
            d["breaker"] = breakers.get(w.worker_id, {"state": "closed"})
            if w.worker_id in self._relay_refused:  # its OpenAI port refused: streams on gRPC
                d["openai_url_refused"] = True
            out.append(d)
        return out

    def healthy(self, model: str | None = None) -> list[WorkerInfo]:
        return [
            w
            for w in ready_workers(self.registry, model)
            if self.breakers.state(w.worker_id) != "open" and not self.blocked(w.worker_id)
        ]

    def is_ready(self, model: str | None = None) -> bool:
        return bool(self.healthy(model))

    def _backoff(self, retry_number: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = retry_number
        return float(self._wait(state))

    async def open(
        self,
        request: pb.GenerateRequest,
        timeout: float | None,
        info: CallInfo | None = None,
        raw: RawRequest | None = None,
    ) -> Call:
        """Try workers until one produces its first output; raises UpstreamError if none does.

        With `raw`, OpenAI-compatible upstreams get the client's body as is and the call's
        items are the upstream's bytes; other upstreams (and calls without `raw`) stream deltas.
        """
        s = self.settings
        info = info or CallInfo()
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        if request.model and (target := self.resolve_model(request.model)) != request.model:
            request.model = target
            if raw is not None:  # the upstream must see the version, not the alias
                raw = replace(raw, body=_with_model(raw.body, target))
        model = request.model or None
        if raw is not None and raw.unsupported is not None:
            # judged on every replica of the model, ready or not: one that is down for a
            # moment makes this a 503, not a 400 that says no replica could ever serve it
            serving = [w for w in self.registry.workers() if w.serves(model)]
            if serving and not any(self._takes_body(w) for w in serving):
                e = raw.unsupported  # no replica of this model gets the body as is
                raise UpstreamError(INVALID_ARGUMENT, e.message, param=e.param)
        tried: set[str] = set()
        last: UpstreamError | None = None
        self.retry_budget.on_request()
        self.counters["requests"] += 1
        while info.attempts < s.max_attempts:
            if info.attempts > 0:
                # The budget is spent only on a retry that will happen: one taken first by
                # every call past its own deadline (or with no replica left to try) left
                # nothing for a replica's crash, whose calls then got 503s untried.
                pause = self._backoff(info.attempts)
                if time.monotonic() + pause >= deadline:
                    break
                if not any(w.worker_id not in tried for w in self.healthy(model)):
                    break
                if not self.retry_budget.try_spend():
                    self.counters["retry_budget_exhausted"] += 1
                    break
                await asyncio.sleep(pause)
            picked = self._pick(model, request, tried, raw)
            if picked is None:
                break
            worker, pool = picked
            tried.add(worker.worker_id)
            info.attempts += 1
            info.worker_id = worker.worker_id
            self.counters["attempts"] += 1
            attempt = _Attempt(self, worker, pool, deadline)
            info.concurrency = self.outstanding[worker.worker_id]
            attempt.prefill = self.policy.routed(worker, request)
            hint = self._prompt_ids(worker, request)
            if hint is not None:
                request.prompt_ids.CopyFrom(hint)
            elif request.HasField("prompt_ids"):  # made for another replica's tokenizer
                request.ClearField("prompt_ids")
            span = traced = None
            if self.tracer is not None:
                span = self.tracer.start_span(
                    f"attempt {info.attempts}",
                    kind=SpanKind.CLIENT,
                    attributes={
                        "breakwater.worker_id": worker.worker_id,
                        "server.address": worker.address,
                        "breakwater.attempt": info.attempts,
                    },
                )
                traced = TRACEPARENT.set(traceparent_of(span))
            try:
                return await self._start(attempt, request, raw)
            except UpstreamError as e:
                if span is not None:
                    span.set_attribute("error.type", e.code)
                    span.set_status(Status(StatusCode.ERROR, e.message))
                attempt.end()
                last = e
                log.info(
                    "attempt %d on %s failed before the first token: %s",
                    info.attempts,
                    worker.worker_id,
                    e,
                )
                if e.code not in _RETRYABLE:
                    raise
            except BaseException:
                attempt.end()
                raise
            finally:
                if span is not None and traced is not None:
                    span.end()
                    TRACEPARENT.reset(traced)
        if last is not None:
            raise last
        if model is not None and not self.has_model(model):
            raise UpstreamError(NOT_FOUND, f"the model `{model}` does not exist", param="model")
        what = f" for model `{model}`" if model else ""  # a gRPC request may name none
        raise UpstreamError(UNAVAILABLE, f"no healthy replica{what}", 1000)

    def _prompt_ids(self, worker: WorkerInfo, request: pb.GenerateRequest) -> pb.PromptIds | None:
        if not self.settings.forward_token_ids:
            return None
        get = getattr(self.policy, "prompt_ids", None)
        return get(worker, request) if get is not None else None

    async def _start(
        self, attempt: _Attempt, request: pb.GenerateRequest, raw: RawRequest | None
    ) -> Call:
        """Start the call and wait for its first output (the TTFT timeout); the commit point."""
        s = self.settings
        worker = attempt.worker
        up = self.upstream_for(worker)
        ttft_limit = min(s.ttft_timeout_s, attempt.deadline - attempt.started)
        refused = ""
        relay = self._relay_for(worker, up, raw.stream) if raw is not None else None
        if raw is not None and raw.unsupported is not None and relay is not up:
            e = raw.unsupported  # never over Generate (_pick keeps such replicas away)
            raise UpstreamError(INVALID_ARGUMENT, e.message, param=e.param)
        try:
            if raw is not None and relay is not None:
                try:
                    if request.HasField("prompt_ids") and fits_with_ids(
                        raw.body, request.prompt_ids
                    ):
                        raw = replace(raw, body=with_body_field(raw.body, request.prompt_ids))
                    return await self._start_relay(
                        attempt, relay, request.request_id, raw, ttft_limit
                    )
                except UpstreamUnreachable as e:
                    if relay is up:
                        raise
                    self._relay_refused[worker.worker_id] = (
                        relay.base_url,
                        time.monotonic() + RELAY_RETRY_S,
                    )
                    self.counters["relay_refused"] += 1
                    refused = relay.base_url
                    log.warning(
                        "%s: cannot reach its OpenAI port (%s); over gRPC for %.0f s",
                        worker.worker_id,
                        e.message,
                        RELAY_RETRY_S,
                    )
                    # gRPC gets the time left, and its TTFT is timed from now: the failed
                    # connect is not the replica's slowness
                    attempt.started = time.monotonic()
                    ttft_limit = min(s.ttft_timeout_s, attempt.deadline - attempt.started)
            stream = up.generate(request, max(0.001, attempt.deadline - attempt.started))
            try:
                async with asyncio.timeout(max(0.0, ttft_limit)):
                    first = await anext(stream)
            except BaseException:
                await stream.aclose()
                raise
        except TimeoutError:
            attempt.timed_out(ttft_limit == s.ttft_timeout_s)
            if ttft_limit == s.ttft_timeout_s:
                why = f"time to first token exceeded on {worker.worker_id}"
            else:
                why = "the request's deadline was exceeded before the first token"
            raise UpstreamError(DEADLINE_EXCEEDED, why) from None
        except StopAsyncIteration:
            attempt.outcome = False
            raise UpstreamError(INTERNAL, f"{worker.worker_id} ended without output") from None
        except UpstreamError as e:
            attempt.failed(e)
            if refused and e.code == UNAVAILABLE:
                # gRPC is down too: the worker is, not its OpenAI port; when it is back,
                # its port is tried again at once
                self._relay_refused.pop(worker.worker_id, None)
            raise
        attempt.first_output()
        return Call(attempt, first, s.idle_timeout_s, deltas=stream)

    async def _start_relay(
        self,
        attempt: _Attempt,
        up: OpenAIHTTPUpstream,
        request_id: str,
        raw: RawRequest,
        ttft_limit: float,
    ) -> Call:
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A whole (non-streamed) answer comes only when generation ends: it gets the call's
        # deadline rather than the time-to-first-token limit.
        limit = ttft_limit if raw.stream else attempt.deadline - attempt.started
        if not raw.stream and attempt.prefill:
            # and its first token is never seen: routing's prefill estimate for it is handed
            # back after a typical TTFT instead of when the whole answer is done
            c = self.concurrency
            typical = c.baseline_ttft_s() if c is not None else DEFAULT_BASELINE_S
            loop.call_later(min(typical, limit), attempt.prefilled)
        first_by = now + max(0.0, limit)
        timeout_ms = max(1, int((attempt.deadline - attempt.started) * 1000))
        resp = await up.relay(raw.path, raw.body, request_id, first_by, timeout_ms, raw.stream)
        try:
            if resp.status != 200:
                raise await error_from(resp, first_by)
            if (wrong := wrong_type(resp, raw.stream)) is not None:
                raise UpstreamError(INTERNAL, f"{attempt.worker.worker_id}: {wrong}")
            first = await (resp.read_some(first_by) if raw.stream else resp.read(first_by))
        except HTTPError as e:
            resp.release()
            raise UpstreamError(UNAVAILABLE, f"{attempt.worker.worker_id}: {e}") from None
        except BaseException:
            resp.release()
            raise
        if not first:
            resp.release()
            raise UpstreamError(INTERNAL, f"{attempt.worker.worker_id} ended without output")
        if raw.stream:
            attempt.first_output()
        else:
            # A whole answer's wait is its generation, not a TTFT: fed to the slow-replica
            # detector and the concurrency limits, it would eject a replica that happened
            # to get long answers and shrink limits on output length alone.
            attempt.outcome = True
        return Call(attempt, first, self.settings.idle_timeout_s, resp=resp)

    async def generate(
        self,
        request: pb.GenerateRequest,
        timeout: float | None,
        info: CallInfo | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The Generate contract over `open`: deltas, retried before the first one."""
        call = await self.open(request, timeout, info)
        try:
            item = call.first
            while item is not None:
                assert isinstance(item, pb.GenerateResponse)
                yield item
                item = await call.next()
        finally:
            await call.close()

    def _takes_body(self, worker: WorkerInfo) -> bool:
        """The replica is an OpenAI-compatible server, which gets an HTTP client's body as
        is and may serve what Generate cannot carry. A Breakwater worker's own port (where
        streams are relayed) would refuse it, as its engine cannot serve it either."""
        return isinstance(self.upstream_for(worker), OpenAIHTTPUpstream)

    def pools_of(self, worker_id: str) -> list[list[str]]:
        """The pools (ready replicas of each of its models) a replica's ejection counts in,
        as `_pick` hands them to the breakers."""
        workers = [w for w in ready_workers(self.registry) if not self.blocked(w.worker_id)]
        me = next((w for w in workers if w.worker_id == worker_id), None)
        if me is None:
            return []
        models = me.models or [None]
        return [[w.worker_id for w in workers if w.serves(m)] for m in models]

    def _pick(
        self,
        model: str | None,
        request: pb.GenerateRequest,
        tried: set[str],
        raw: RawRequest | None = None,
    ) -> tuple[WorkerInfo, list[str]] | None:
        """A worker not yet tried whose breaker lets a call through, and the ready pool;
        for a body Generate cannot carry (`raw.unsupported`), a worker that gets it as is."""
        blocked = self.blocked
        ready = [w for w in ready_workers(self.registry, model) if not blocked(w.worker_id)]
        loads: Mapping[str, float] = self.outstanding
        if self.remote_loads is not None and (others := self.remote_loads()):
            loads = CombinedLoads(loads, others)
        if weights := self.weights():
            ready = [w for w in ready if weights.get(w.worker_id, 1.0) > 0]
            loads = WeightedLoads(loads, weights)
        candidates = [w for w in ready if w.worker_id not in tried]
        if raw is not None and raw.unsupported is not None:
            candidates = [w for w in candidates if self._takes_body(w)]
        tiers = [candidates]
        if (c := self.concurrency) is not None and len(candidates) > 1:
            # a replica at its limit would queue the request in its engine: others first,
            # but only first (those with room may all be ejected: they have room because
            # nothing is sent to them)
            out = self.outstanding
            room: list[WorkerInfo] = []
            full: list[WorkerInfo] = []
            for w in candidates:
                (room if out.get(w.worker_id, 0) < c.limit(w.worker_id) else full).append(w)
            if room and full:
                tiers = [room, full]
        for tier in tiers:
            while tier:
                worker = self.policy.choose(tier, request, loads)
                if self.breakers.allow(worker.worker_id):
                    return worker, [w.worker_id for w in ready]
                tier.remove(worker)
        return None

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        for up in [*self._upstreams.values(), *self._retiring]:
            await up.close()
