"""Load generator: open-loop (Poisson, steps, bursts) and closed-loop traffic, HTTP or gRPC.

    python -m loadtest.loadgen --url http://127.0.0.1:8080 --model M --rate 50 --duration 10
        [--closed N] [--grpc HOST:PORT] [--json] [--plot out.png]
    python -m loadtest.loadgen --self-test

Open loop is the honest way to load a server: arrivals follow their schedule whether or not
earlier answers came back, as real users do, so a slow or failing server shows up as latency
and errors instead of as a politely reduced load (closed loop hides that: N users wait, so
the offered load falls as latency rises). Closed loop is still here, for capacity probes.

Every request is streamed and timed by the generator itself: time to first token, time per
output token, end to end, status, attempts (the gateway's `x-breakwater-attempts`), and
whether it failed after its first token. `loadtest.report` turns records into percentiles,
goodput, a table, JSON and plots. `--self-test` measures the generator's own limit against
`loadtest.trivial_server`, so its figures are known not to be the generator's.

Traffic goes only to the URL or gRPC address given; every request has its own deadline
(the aiohttp session has no total timeout: aiohttp's default would cut long streams).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from loadtest.records import RequestRecord
from loadtest.report import SLO, format_table, percentile, plot_goodput, plot_latency, summarize


@dataclass(frozen=True)
class Target:
    """Where traffic goes: an OpenAI-compatible base URL, or a gRPC `host:port` if set."""

    url: str = ""
    model: str = ""
    grpc: str | None = None
    chat: bool = False
    """POST /v1/chat/completions instead of /v1/completions."""
    headers: dict[str, str] = field(default_factory=dict)
    """Sent with every request (HTTP headers, or gRPC metadata), e.g. Authorization."""
    timeout_s: float = 60.0
    """Per-request deadline, end to end."""

    @property
    def transport(self) -> str:
        return "grpc" if self.grpc else "http"


@dataclass(frozen=True)
class RequestSpec:
    """One request to send; `extra` adds OpenAI body fields (mapped to gRPC where they exist)."""

    prompt: str = "Hello"
    max_tokens: int = 16
    extra: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


RequestFactory = Callable[[int], RequestSpec]


def simple_requests(
    max_tokens: int = 16, prompt: str = "Hello", **extra: Any
) -> Callable[[int], RequestSpec]:
    """The same request every time, with a distinct prompt suffix so no two share a cache hit."""
    return lambda i: RequestSpec(prompt=f"{prompt} #{i}", max_tokens=max_tokens, extra=extra)


# -- schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Open-loop arrivals: `rate` req/s from t=0, changed by `steps` (at_s, rate), plus
    `bursts` (at_s, n) of n requests at once. Poisson by default (exponential gaps, as
    independent users arrive); `poisson=False` spaces them evenly. `offsets` overrides all."""

    rate: float = 0.0
    steps: tuple[tuple[float, float], ...] = ()
    bursts: tuple[tuple[float, int], ...] = ()
    poisson: bool = True
    seed: int = 0
    offsets: tuple[float, ...] | None = None

    def arrivals(self, duration_s: float) -> list[float]:
        """Send offsets in [0, duration_s), sorted."""
        if self.offsets is not None:
            return sorted(t for t in self.offsets if 0 <= t < duration_s)
        rng = random.Random(self.seed)
        changes = [(0.0, self.rate), *sorted(self.steps)]
        out: list[float] = []
        for i, (begin, rate) in enumerate(changes):
            end = min(duration_s, changes[i + 1][0] if i + 1 < len(changes) else duration_s)
            if rate <= 0 or begin >= end:
                continue
            # Poisson arrivals are memoryless, so restarting the clock at a step is exact.
            t, k = begin, 0
            while True:
                k += 1
                t = t + rng.expovariate(rate) if self.poisson else begin + k / rate
                if t >= end:
                    break
                out.append(t)
        out += [at for at, n in self.bursts if 0 <= at < duration_s for _ in range(n)]
        return sorted(out)


# -- transports ------------------------------------------------------------------------------


class Transport(Protocol):
    async def send(self, spec: RequestSpec, rec: RequestRecord, t0: float) -> None: ...


def _now() -> float:
    return time.monotonic()


def _retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` (precise) or `Retry-After` (seconds; dates ignored)."""
    for name, scale in (("retry-after-ms", 1000.0), ("Retry-After", 1.0)):
        v = headers.get(name)
        if v is not None:
            with contextlib.suppress(ValueError):
                return float(v) / scale
    return None


def _error_code(body: Any) -> str | None:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        code = err.get("code") or err.get("type")
        return str(code) if code else None
    return str(err)[:40] if err else None


def _read_metadata(md: Any, rec: RequestRecord) -> None:
    """The gateway's attempts and worker headers (HTTP headers or gRPC initial metadata)."""
    with contextlib.suppress(TypeError, ValueError):
        rec.attempts = int(md.get("x-breakwater-attempts") or 1)
    rec.worker = str(md.get("x-breakwater-worker") or rec.worker)


class _Timing:
    """Token arrival bookkeeping shared by both transports."""

    def __init__(self, rec: RequestRecord, began: float) -> None:
        self.rec, self.began, self.first = rec, began, 0.0
        self.tokens = 0
        self.usage: int | None = None

    def delta(self, n: int) -> None:
        if n <= 0:
            return
        if self.rec.ttft_s is None:
            self.first = _now()
            self.rec.ttft_s = self.first - self.began
        self.tokens += n

    def finish(self) -> None:
        end = _now()
        rec = self.rec
        rec.e2e_s = end - self.began
        rec.output_tokens = self.usage if self.usage is not None else self.tokens
        if rec.ttft_s is not None and rec.ok and rec.output_tokens > 1:
            rec.tpot_s = (end - self.first) / (rec.output_tokens - 1)
        rec.aborted_after_first_token = not rec.ok and rec.ttft_s is not None


class HttpTransport:
    """OpenAI streaming over aiohttp: SSE `data:` frames, `[DONE]`, `{"error": ...}` frames."""

    def __init__(self, session: aiohttp.ClientSession, target: Target) -> None:
        self.session, self.target = session, target
        path = "/v1/chat/completions" if target.chat else "/v1/completions"
        self.endpoint = target.url.rstrip("/") + path

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.target.model,
            "max_tokens": spec.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.target.chat:
            body["messages"] = [{"role": "user", "content": spec.prompt}]
        else:
            body["prompt"] = spec.prompt
        return body | spec.extra

    async def send(self, spec: RequestSpec, rec: RequestRecord, t0: float) -> None:
        headers = self.target.headers | spec.headers
        body = self.body(spec)
        began = _now()
        rec.start_s = began - t0
        timing = _Timing(rec, began)
        try:
            async with asyncio.timeout(self.target.timeout_s):
                await self._stream(body, headers, rec, timing)
        except TimeoutError:
            rec.status, rec.error_code = "timeout", None
        except (aiohttp.ClientError, OSError) as e:
            rec.status, rec.error_code = "connection", type(e).__name__
        except Exception as e:  # a parse bug must not end the run; it shows in the errors
            rec.status, rec.error_code = "client-error", type(e).__name__
        timing.finish()

    async def _stream(
        self, body: dict[str, Any], headers: dict[str, str], rec: RequestRecord, timing: _Timing
    ) -> None:
        async with self.session.post(self.endpoint, json=body, headers=headers) as resp:
            _read_metadata(resp.headers, rec)
            if resp.status != 200:
                rec.status = str(resp.status)
                rec.retry_after_s = _retry_after(resp.headers)
                raw = await resp.read()
                with contextlib.suppress(ValueError):
                    rec.error_code = _error_code(json.loads(raw))
                return
            done = False
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                rec.chunks += 1
                chunk = json.loads(data)
                if "error" in chunk:
                    rec.status, rec.error_code = "stream-error", _error_code(chunk)
                    return
                for choice in chunk.get("choices") or ():
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    timing.delta(1 if text else 0)
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    timing.usage = int(usage["completion_tokens"])
            if not done:
                rec.status = "incomplete"


class GrpcTransport:
    """The Generate server stream over grpc.aio; rejects carry `grpc-retry-pushback-ms`."""

    def __init__(self, channel: Any, target: Target) -> None:
        from proto import inference_pb2 as pb
        from proto import inference_pb2_grpc as pb_grpc

        self.pb = pb
        self.stub = pb_grpc.InferenceStub(channel)
        self.target = target
        self._sampling_fields = set(pb.SamplingParams.DESCRIPTOR.fields_by_name)

    def request(self, spec: RequestSpec, index: int) -> Any:
        pb = self.pb
        req = pb.GenerateRequest(
            request_id=f"loadgen-{index}-{random.getrandbits(32):08x}",
            model=self.target.model,
            sampling=pb.SamplingParams(max_tokens=spec.max_tokens),
            stream_options=pb.StreamOptions(include_usage=True),
        )
        if self.target.chat:
            req.chat.messages.add(role="user", content=spec.prompt)
            req.chat.add_generation_prompt = True
        else:
            req.text = spec.prompt
        for key, value in spec.extra.items():
            if key in self._sampling_fields:
                field_ = getattr(req.sampling, key)
                if isinstance(value, list):
                    field_.extend(value)
                else:
                    setattr(req.sampling, key, value)
            elif key == "priority":
                req.priority = pb.PRIORITY_BATCH if value in ("batch", 1) else 0
        return req

    async def send(self, spec: RequestSpec, rec: RequestRecord, t0: float) -> None:
        import grpc

        pb = self.pb
        req = self.request(spec, rec.index)
        metadata = tuple((k.lower(), v) for k, v in (self.target.headers | spec.headers).items())
        began = _now()
        rec.start_s = began - t0
        timing = _Timing(rec, began)
        call = self.stub.Generate(req, timeout=self.target.timeout_s, metadata=metadata)
        try:
            async with asyncio.timeout(self.target.timeout_s + 1):  # if the deadline is lost
                async for resp in call:
                    rec.chunks += 1
                    if rec.chunks == 1:
                        _read_metadata(dict(await call.initial_metadata() or ()), rec)
                    if resp.finish_reason == pb.FINISH_REASON_ERROR:
                        rec.status, rec.error_code = "stream-error", (resp.error or "error")[:40]
                        break
                    timing.delta(len(resp.token_ids) or (1 if resp.text else 0))
                    if resp.HasField("usage") and resp.usage.completion_tokens:
                        timing.usage = resp.usage.completion_tokens
        except grpc.aio.AioRpcError as e:
            rec.status = e.code().name
            _read_metadata(dict(e.initial_metadata() or ()), rec)
            ms = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
            with contextlib.suppress(TypeError, ValueError):
                rec.retry_after_s = float(ms) / 1000  # type: ignore[arg-type]
        except TimeoutError:
            rec.status, rec.error_code = "timeout", None
        except Exception as e:
            rec.status, rec.error_code = "client-error", type(e).__name__
        finally:
            call.cancel()  # no-op when finished; frees the stream after an error frame
        timing.finish()


@contextlib.asynccontextmanager
async def open_transport(target: Target) -> AsyncIterator[Transport]:
    """One connection pool (or gRPC channel) for a whole run, closed at its end."""
    if target.grpc:
        import grpc

        async with grpc.aio.insecure_channel(target.grpc) as channel:
            yield GrpcTransport(channel, target)
        return
    # limit=0: an open-loop run must never queue behind a client-side connection cap.
    # total=None: per-request deadlines instead (see the module docstring).
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    ) as session:
        yield HttpTransport(session, target)


# -- runners ---------------------------------------------------------------------------------


def _default_factory(factory: RequestFactory | None) -> RequestFactory:
    return factory if factory is not None else simple_requests()


async def run_open_loop(
    target: Target,
    schedule: Schedule | Sequence[float],
    request_factory: RequestFactory | None = None,
    duration_s: float = 10.0,
    max_requests: int = 100_000,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send a request at each arrival of `schedule` within `duration_s` (at most
    `max_requests`), without waiting for answers; then wait for the stragglers, each bounded
    by the target's per-request deadline. Returns one record per request sent, in send order."""
    offsets = (
        schedule.arrivals(duration_s)
        if isinstance(schedule, Schedule)
        else sorted(t for t in schedule if 0 <= t < duration_s)
    )[:max_requests]
    factory = _default_factory(request_factory)
    records: list[RequestRecord] = []
    async with open_transport(target) as transport:
        t0 = _now()

        async def one(rec: RequestRecord) -> None:
            await transport.send(factory(rec.index), rec, t0)
            if on_record is not None:
                on_record(rec)

        async with asyncio.TaskGroup() as tg:
            for i, at in enumerate(offsets):
                delay = t0 + at - _now()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec = RequestRecord(index=i, scheduled_s=at)
                records.append(rec)
                tg.create_task(one(rec))
    return records


async def run_closed_loop(
    target: Target,
    users: int,
    request_factory: RequestFactory | None = None,
    duration_s: float = 10.0,
    max_requests: int = 100_000,
    think_time_s: float = 0.0,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """`users` concurrent users, each sending its next request when the last one ended (after
    `think_time_s`), until `duration_s` has passed or `max_requests` were sent."""
    factory = _default_factory(request_factory)
    records: list[RequestRecord] = []
    async with open_transport(target) as transport:
        t0 = _now()

        async def user(u: int) -> None:
            while _now() - t0 < duration_s and len(records) < max_requests:
                rec = RequestRecord(index=len(records), scheduled_s=_now() - t0, user=u)
                records.append(rec)
                await transport.send(factory(rec.index), rec, t0)
                if on_record is not None:
                    on_record(rec)
                if think_time_s > 0:
                    await asyncio.sleep(think_time_s)

        async with asyncio.TaskGroup() as tg:
            for u in range(users):
                tg.create_task(user(u))
    return records


# -- self-test -------------------------------------------------------------------------------


async def measure_limit(
    url: str,
    rates: Sequence[float] = (100, 200, 400, 800, 1600, 3200, 6400),
    step_s: float = 2.0,
    chunks: int = 16,
    max_lateness_p99_ms: float = 10.0,
    max_e2e_p99_ms: float = 250.0,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Raise the open-loop rate against a trivial server until the generator stops keeping
    its schedule (p99 send lateness above `max_lateness_p99_ms`), requests fail, or answers
    pile up (e2e p99 above `max_e2e_p99_ms`: then the pair, not the schedule, is saturated).
    The last rate that passed is the generator's limit: figures below it are the server's."""
    target = Target(url=url, model="trivial", timeout_s=10.0)
    factory = simple_requests(max_tokens=chunks)
    header = {"x-trivial": json.dumps({"chunks": chunks})}

    def spec(i: int) -> RequestSpec:
        s = factory(i)
        return RequestSpec(s.prompt, s.max_tokens, s.extra, header)

    async def level(rate: float) -> dict[str, Any]:
        recs = await run_open_loop(target, Schedule(rate=rate, seed=int(rate)), spec, step_s)
        span = max(r.end_s for r in recs) - min(r.start_s for r in recs)
        ok = [r for r in recs if r.ok]
        lat = percentile([r.lateness_s * 1000 for r in recs], 99) or 0.0
        e2e = percentile([r.e2e_s * 1000 for r in ok if r.e2e_s is not None], 99) or math.inf
        out = {
            "offered_rps": rate,
            "sent": len(recs),
            "ok": len(ok),
            "requests_per_s": round(len(ok) / span, 1),
            "chunks_per_s": round(sum(r.chunks for r in ok) / span, 1),
            "lateness_p99_ms": round(lat, 2),
            "e2e_p99_ms": round(e2e, 2),
            "passed": len(ok) == len(recs) and lat <= max_lateness_p99_ms and e2e <= max_e2e_p99_ms,
        }
        log(json.dumps(out))
        return out

    # Warm the connection pool so the first level does not time TCP handshakes.
    await run_open_loop(target, Schedule(rate=50, poisson=False), spec, 0.5)
    levels: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for rate in rates:
        levels.append(await level(rate))
        if not levels[-1]["passed"]:
            break
        best = levels[-1]
    failed = levels[-1]["offered_rps"] if not levels[-1]["passed"] else None
    if best is not None and failed is not None and failed > 1.3 * best["offered_rps"]:
        levels.append(await level(round((failed + best["offered_rps"]) / 2)))  # one bisection
        if levels[-1]["passed"]:
            best = levels[-1]
    return {
        "limit_requests_per_s": best["requests_per_s"] if best else 0.0,
        "limit_chunks_per_s": best["chunks_per_s"] if best else 0.0,
        "chunks_per_request": chunks + 2,  # deltas, the finish chunk, the usage chunk
        "criteria": {
            "lateness_p99_ms": max_lateness_p99_ms,
            "e2e_p99_ms": max_e2e_p99_ms,
            "all_ok": True,
        },
        "levels": levels,
    }


def _self_test(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest.trivial_server import start_trivial_server

    with start_trivial_server(grpc=False) as server:
        log(f"trivial server at {server.url}")
        return asyncio.run(
            measure_limit(server.url, step_s=args.step_duration, chunks=args.chunks, log=log)
        )


# -- CLI -------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[loadgen] {msg}", file=sys.stderr, flush=True)


def _pair(kind: Callable[[str], Any]) -> Callable[[str], tuple[float, Any]]:
    def parse(s: str) -> tuple[float, Any]:
        at, _, v = s.partition(":")
        return float(at), kind(v)

    return parse


def _runs(
    args: argparse.Namespace,
) -> list[tuple[float, Callable[[], Coroutine[Any, Any, list[RequestRecord]]]]]:
    target = Target(
        url=args.url or "",
        model=args.model,
        grpc=args.grpc,
        chat=args.chat,
        headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {},
        timeout_s=args.timeout,
    )
    factory = simple_requests(args.max_tokens, args.prompt)
    if args.closed:
        return [
            (
                float(args.closed),
                lambda: run_closed_loop(
                    target, args.closed, factory, args.duration, args.max_requests, args.think
                ),
            )
        ]
    rates = [float(r) for r in str(args.rate).split(",")]
    return [
        (
            rate,
            lambda rate=rate: run_open_loop(
                target,
                Schedule(rate, tuple(args.step), tuple(args.burst), not args.even, args.seed),
                factory,
                args.duration,
                args.max_requests,
            ),
        )
        for rate in rates
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--grpc", metavar="HOST:PORT", help="use the gRPC Generate API instead")
    ap.add_argument("--model", default="")
    ap.add_argument("--chat", action="store_true", help="/v1/chat/completions")
    ap.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    ap.add_argument("--rate", default="10", help="req/s; a comma list runs one run per rate")
    ap.add_argument("--even", action="store_true", help="evenly spaced instead of Poisson")
    ap.add_argument("--step", type=_pair(float), action="append", default=[], metavar="AT:RATE")
    ap.add_argument("--burst", type=_pair(int), action="append", default=[], metavar="AT:N")
    ap.add_argument("--closed", type=int, metavar="N", help="closed loop with N users")
    ap.add_argument("--think", type=float, default=0.0, help="closed-loop think time, s")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--max-requests", type=int, default=100_000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt", default="Hello")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    ap.add_argument("--e2e-slo-ms", type=float, default=10_000.0)
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--plot", metavar="PNG", help="latency over time (several rates: goodput)")
    ap.add_argument("--self-test", action="store_true", help="measure the generator's limit")
    ap.add_argument("--step-duration", type=float, default=2.0, help="self-test level length")
    ap.add_argument("--chunks", type=int, default=16, help="self-test deltas per request")
    args = ap.parse_args(argv)

    if args.self_test:
        res = _self_test(args)
        print(f"{'offered':>8} {'req/s':>8} {'chunks/s':>9} {'late p99':>9} {'e2e p99':>8}")
        for lv in res["levels"]:
            print(
                f"{lv['offered_rps']:>8} {lv['requests_per_s']:>8} {lv['chunks_per_s']:>9}"
                f" {lv['lateness_p99_ms']:>7}ms {lv['e2e_p99_ms']:>6}ms"
                f"  {'ok' if lv['passed'] else 'behind'}"
            )
        print(
            f"generator limit: {res['limit_requests_per_s']:.0f} req/s, "
            f"{res['limit_chunks_per_s']:.0f} streamed chunks/s "
            f"(send lateness p99 <= {res['criteria']['lateness_p99_ms']} ms, all ok)"
        )
        if args.json:
            print(json.dumps(res))
        return
    if not (args.url or args.grpc) or not args.model:
        ap.error("--url (or --grpc) and --model are required")

    slo = SLO(ttft_ms=args.ttft_slo_ms, e2e_ms=args.e2e_slo_ms)
    summaries: list[dict[str, Any]] = []
    for rate, run in _runs(args):
        log(f"{'closed loop, users' if args.closed else 'open loop, rate'} {rate:g}")
        records = asyncio.run(run())
        s = summarize(records, slo, duration_s=None if args.closed else args.duration)
        s["mode"] = "closed" if args.closed else "open"
        s["rate" if not args.closed else "users"] = rate
        summaries.append(s)
        print(format_table(s), flush=True)
        if args.plot:
            path = args.plot
            if len(str(args.rate).split(",")) > 1:
                path = args.plot.removesuffix(".png") + f"-{rate:g}rps.png"
            unit = "users" if args.closed else "req/s"
            plot_latency(records, path, title=f"{s['mode']} loop, {rate:g} {unit}")
            log(f"wrote {path}")
    if args.plot and len(summaries) > 1:
        plot_goodput(summaries, args.plot)
        log(f"wrote {args.plot}")
    if args.json:
        print(json.dumps(summaries[0] if len(summaries) == 1 else {"runs": summaries}))


if __name__ == "__main__":
    main()
