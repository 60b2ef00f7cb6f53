"""Routing policies compared on a multi-turn chat workload: prefix-cache hits, TTFT, balance.

    python -m loadtest.routing_bench [--quick] [--json] [--workers 4] [--duration S]
        [--policies round-robin,least-outstanding,prefix-aware]

Sim workers (real scheduler, KV block pool and prefix cache over a GPU timing model) with a
KV cache too small for every system prompt but large enough for a share of them, so where a
request lands decides whether its prefix is still cached. One closed-loop probe on
round-robin measures the fleet's capacity for this workload; then each policy gets its own
gateway and the same open-loop chat traffic at `--load` (0.7) of that capacity: turns arrive
as a Poisson process, each taken by the user who has waited longest since their last answer
(plus think time), or by a new user when nobody is waiting, so a user's turns stay in order.

Hit rates are the workers' own: their lookup counters (Stats over gRPC, differenced around
each run) and, per request, the cached tokens each answer's usage reports. The oracle is one
replica with an infinite cache fed the same prompts in the same order (each run's; the
top-level figure is their mean, they differ only in how turns interleaved). By default the
workers are shared by all runs and each run salts its system prompts, so no run can hit
another's blocks (stale blocks are evicted like free ones): as good as cold caches without
restarting the workers (`--fresh-workers` restarts them anyway).

Prints a table to stderr and, with --json, one JSON object last on stdout. Traffic goes to
127.0.0.1 only; every process started here is stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import random
import statistics
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import aiohttp

from loadtest.chat_workload import (
    BLOCK_SIZE,
    ChatWorkload,
    Messages,
    OracleResult,
    oracle_hits,
)
from loadtest.fleet import Proc, admin_json, start_gateway, start_sim_worker, wait_for
from loadtest.loadgen import HttpTransport, RequestSpec, Schedule, Target, open_transport
from loadtest.records import RequestRecord
from loadtest.redis_server import RedisServer
from loadtest.report import percentile, summarize
from serving.heap import settle

T = TypeVar("T")
MODEL = "sim"
TWO_GATEWAYS = "-2-gateways"
POLICIES = ("round-robin", "least-outstanding", "prefix-aware", "prefix-aware" + TWO_GATEWAYS)
HIT_COUNTER_UNIT = (
    "tokens: each admission adds the request's token count to prefix_cache_queries and its "
    "cached whole blocks x 16 to prefix_cache_hits; hit_rate is hits / queries. A preempted "
    "request is admitted (and counted) again; hit_rate_per_request (cached_tokens of each "
    "answer's usage / its prompt_tokens, once per request) is not"
)


@dataclass(frozen=True)
class BenchConfig:
    workers: int = 4
    policies: tuple[str, ...] = POLICIES
    duration_s: float = 60.0
    """Open-loop arrivals per policy; answers still in flight are then awaited."""
    load: float = 0.7
    """Offered rate as a share of the measured capacity."""
    rate: float | None = None
    """Offered req/s; skips the capacity probe when set."""
    probe_s: float = 20.0
    probe_users_per_worker: int = 16
    preset: str = "llama3-8b-h100"
    sim_speed: float = 0.1
    """Slows the modelled GPU so the fleet, not this machine's CPU, is the bottleneck."""
    kv_tokens: int | None = None
    """Per worker; None: half the tokens of all system prompts, so one worker cannot hold
    them all but holds a quarter of them with room left for histories and running requests."""
    max_model_len: int = 4096
    system_prompts: int = 24
    turns: tuple[int, int] = (3, 6)
    max_tokens: int = 16
    think_s: float = 1.0
    seed: int = 0
    timeout_s: float = 60.0
    fresh_workers: bool = False


QUICK = BenchConfig(duration_s=6.0, probe_s=4.0)


# -- fleet -----------------------------------------------------------------------------------


def kv_tokens_for(cfg: BenchConfig, system_prompt_tokens: Sequence[int]) -> int:
    """KV tokens per worker: `cfg.kv_tokens`, else half the tokens of all system prompts
    (rounded up to 256), so one worker cannot hold them all but holds a share of them."""
    return cfg.kv_tokens or math.ceil(sum(system_prompt_tokens) / 2 / 256) * 256


def start_workers(cfg: BenchConfig, kv_tokens: int, *extra: str) -> list[Proc]:
    """Sim workers started in parallel (each imports torch: seconds on 2 cores); `extra`
    flags go to every worker (`--http-port 0` for an OpenAI port of its own, say)."""
    args = [
        "--sim-speed",
        str(cfg.sim_speed),
        "--sim-kv-tokens",
        str(kv_tokens),
        "--max-model-len",
        str(cfg.max_model_len),
        *extra,
    ]
    procs: list[Proc | None] = [None] * cfg.workers
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            procs[i] = start_sim_worker(*args, preset=cfg.preset)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(cfg.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [p for p in procs if p is not None]
    if errors or len(started) != cfg.workers:
        stop_all(started)
        raise RuntimeError(f"a worker failed to start: {errors[:1]}")
    return started


def stop_all(procs: Sequence[Proc | None]) -> None:
    for p in procs:
        if p is not None:
            p.stop()


STAT_FIELDS = (
    "prefix_cache_hits",
    "prefix_cache_queries",
    "prompt_tokens_total",
    "generation_tokens_total",
    "num_preemptions",
    "running",
    "queue_depth",
    "in_flight",
)


def worker_stats(addr: str) -> dict[str, int]:
    """The worker's own counters (gRPC Stats): the figures no client-side guess can give."""
    import grpc

    from proto import inference_pb2 as pb
    from proto import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(addr) as ch:
        resp = pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=10)
    return {k: int(getattr(resp, k)) for k in STAT_FIELDS}


def wait_idle(addrs: Sequence[str], timeout: float = 30.0) -> None:
    """Until no worker runs or queues anything: a run's counters are then complete."""

    def idle() -> bool:
        for a in addrs:
            s = worker_stats(a)
            if s["running"] or s["queue_depth"] or s["in_flight"]:
                return False
        return True

    with contextlib.suppress(AssertionError):
        wait_for(idle, timeout=timeout, interval=0.1)


def start_policy_gateway(
    policy: str | None, addrs: Sequence[str], *extra: str, health_interval: str | None = "0.25"
) -> Proc:
    """A one-process gateway with this routing policy (None: the gateway's default), once
    it sees every worker serving. `addrs` are `--worker` specs: gRPC `host:port`, or
    `http://host:port` for OpenAI HTTP workers. Health probes every 0.25 s unless
    `health_interval` says otherwise (None: the gateway's default, 1 s). Raises
    RuntimeError, with the gateway's own complaint, if it will not start."""
    specs = [a for addr in addrs for a in ("--worker", addr)]
    routing = ("--routing", policy) if policy else ()
    probes = ("--health-interval", health_interval) if health_interval else ()
    gw = start_gateway(*specs, *routing, *probes, *extra, processes=1)

    def routable() -> bool:
        ws = admin_json(gw, "/admin/workers")["workers"]
        return set(addrs) <= {w["worker_id"] for w in ws if w.get("state") == "SERVING"}

    try:
        wait_for(routable, timeout=30)
    except BaseException:
        gw.stop()
        raise
    return gw


def refusal(err: BaseException) -> str:
    """The last line a gateway wrote before exiting: argparse's 'invalid choice', say."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(err)


# -- traffic ---------------------------------------------------------------------------------


@dataclass
class Sent:
    """One turn as sent: its messages (for the oracle) and what the load generator saw."""

    user: int
    turn: int
    messages: Messages
    record: RequestRecord
    usage: dict[str, Any] | None = None
    """The answer's usage frame: the worker's own prompt and cached token counts for it."""

    @property
    def cached_tokens(self) -> int | None:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return details.get("cached_tokens")


class _UsageTap:
    """Stands in for the aiohttp session of one request to the loadgen's HttpTransport: the
    stream passes through unchanged, and the usage frame (whose `cached_tokens` the transport
    does not record) is kept. The loadgen's parsing and timing stay the only ones."""

    def __init__(self, session: aiohttp.ClientSession, sent: Sent) -> None:
        self.session, self.sent = session, sent

    @contextlib.asynccontextmanager
    async def post(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with self.session.post(*args, **kwargs) as resp:
            yield _TappedResponse(resp, self.sent)


class _TappedResponse:
    def __init__(self, resp: aiohttp.ClientResponse, sent: Sent) -> None:
        self._resp, self._sent = resp, sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resp, name)

    @property
    def content(self) -> AsyncIterator[bytes]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[bytes]:
        async for line in self._resp.content:
            if line.startswith(b"data:") and b'"usage"' in line:
                with contextlib.suppress(ValueError, AttributeError):
                    usage = json.loads(line[5:]).get("usage")
                    if usage:
                        self._sent.usage = usage
            yield line


@contextlib.asynccontextmanager
async def chat_sender(
    urls: Sequence[str], cfg: BenchConfig, headers: Mapping[str, str] | None = None
) -> AsyncIterator[Callable[[Sent, float], Coroutine[Any, Any, None]]]:
    """`send(turn, t0)` over one connection pool per gateway: a streamed chat completion
    through the loadgen's HTTP transport, timed by it, usage kept. With several gateways a
    user's turns alternate between them, the worst case for keeping a conversation on the
    replica that holds it."""
    async with contextlib.AsyncExitStack() as stack:
        senders = []
        extra = dict(headers or {})
        for url in urls:
            target = Target(url=url, model=MODEL, chat=True, timeout_s=cfg.timeout_s, headers=extra)
            transport = await stack.enter_async_context(open_transport(target))
            assert isinstance(transport, HttpTransport)
            senders.append((transport.session, target))

        async def send(s: Sent, t0: float) -> None:
            session, target = senders[(s.user + s.turn) % len(senders)]
            # `messages` in extra replaces the single user message the transport would build.
            spec = RequestSpec(
                prompt="",
                max_tokens=cfg.max_tokens,
                extra={"messages": s.messages, "ignore_eos": True},
            )
            tapped = HttpTransport(_UsageTap(session, s), target)  # type: ignore[arg-type]
            await tapped.send(spec, s.record, t0)

        yield send


async def chat_open_loop(
    urls: Sequence[str],
    workload: ChatWorkload,
    offsets: Sequence[float],
    cfg: BenchConfig,
    salt: str,
) -> list[Sent]:
    """One turn at each offset (open loop): the user ready longest, else a new user. A user
    becomes ready `think` seconds after an answer, if turns remain (failed turns too: the
    history holds the workload's reply either way)."""
    sent: list[Sent] = []
    ready: deque[int] = deque()
    next_turn: dict[int, int] = {}
    new_user = 0
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    async with chat_sender(urls, cfg) as send:
        t0 = time.monotonic()

        async def one(s: Sent) -> None:
            await send(s, t0)
            if s.turn + 1 < workload.user(s.user).turns:
                think = workload.think_s(s.user, s.turn, cfg.think_s)
                timers.append(loop.call_later(think, ready.append, s.user))

        try:
            async with asyncio.TaskGroup() as tg:
                for i, at in enumerate(offsets):
                    delay = t0 + at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if ready:
                        uid = ready.popleft()
                    else:
                        uid, new_user = new_user, new_user + 1
                    k = next_turn.get(uid, 0)
                    next_turn[uid] = k + 1
                    rec = RequestRecord(index=i, scheduled_s=at, user=uid)
                    s = Sent(uid, k, workload.messages(uid, k, salt), rec)
                    sent.append(s)
                    tg.create_task(one(s))
        finally:
            for h in timers:
                h.cancel()
    return sent


REFUSED_WAIT_S = 1.0
"""The longest a closed-loop user waits after a refused turn."""


async def chat_closed_loop(
    urls: Sequence[str],
    workload: ChatWorkload,
    users: int,
    duration_s: float,
    cfg: BenchConfig,
    salt: str,
    headers: Mapping[str, str] | None = None,
) -> list[Sent]:
    """`users` conversations at once, each turn sent as soon as the last answer came; a
    finished conversation is replaced by a new user. For the capacity probe: at the end the
    requests still in flight are cancelled (status 'cancelled'), not waited for.

    A refused turn is followed by the user's next one only after the server's Retry-After
    (at most `REFUSED_WAIT_S`; 0.1 s without one), as a client that honours it would wait.
    Sent at once, the probe's 64 users got a gateway's 503s in a loop: 16,566 refusals
    against 232 answers in one 20 s probe, on the cores whose capacity it measures."""
    sent: list[Sent] = []
    uids = iter(range(10**9))
    async with chat_sender(urls, cfg, headers) as send:
        t0 = time.monotonic()

        async def conversations() -> None:
            while True:
                uid = next(uids)
                for k in range(workload.user(uid).turns):
                    rec = RequestRecord(index=len(sent), scheduled_s=time.monotonic() - t0)
                    s = Sent(uid, k, workload.messages(uid, k, salt), rec)
                    sent.append(s)
                    await send(s, t0)
                    if not rec.ok:
                        await asyncio.sleep(min(rec.retry_after_s or 0.1, REFUSED_WAIT_S))

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration_s), asyncio.TaskGroup() as tg:
                for _ in range(users):
                    tg.create_task(conversations())
    for s in sent:
        if s.record.e2e_s is None:
            s.record.status = "cancelled"
    return sent


def capacity_rps(sent: Sequence[Sent], duration_s: float) -> float:
    """Completions per second after the first quarter of the window (the cold start: every
    conversation begins at once and misses the cache)."""
    warm = duration_s / 4
    done = [s.record for s in sent if s.record.ok and warm <= s.record.end_s <= duration_s]
    return len(done) / (duration_s - warm)


# -- figures ---------------------------------------------------------------------------------


def counter_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    keys = (
        "prefix_cache_hits",
        "prefix_cache_queries",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_preemptions",
    )
    return {k: after[k] - before[k] for k in keys}


def counted(addrs: Sequence[str], traffic: Callable[[], T]) -> tuple[T, list[dict[str, int]]]:
    """`traffic()`'s result and each worker's counter deltas around it (gRPC Stats at
    `addrs`), read once the workers are idle again so the deltas are complete."""
    before = [worker_stats(a) for a in addrs]
    out = traffic()
    wait_idle(addrs)
    after = [worker_stats(a) for a in addrs]
    return out, [counter_delta(b, a) for b, a in zip(before, after, strict=True)]


def served_vs_oracle(
    sent: Sequence[Sent], workload: ChatWorkload, oracle: OracleResult
) -> dict[str, Any]:
    """Hit rate from each answer's usage (the worker's count for that request, taken once,
    unlike its lookup counters), and where it fell short of the oracle: in the system
    prompt, or in the user's own history."""
    prompt = cached = missed_sys = missed_hist = 0
    for s, best in zip(sent, oracle.per_request, strict=True):
        if s.usage is None or s.cached_tokens is None:
            continue
        got = s.cached_tokens
        prompt += int(s.usage["prompt_tokens"])
        cached += got
        in_sys = max(0, min(best, workload.system_span(s.messages)) - got)
        missed_sys += in_sys
        missed_hist += max(0, best - got) - in_sys
    return {
        "hit_rate_per_request": round(cached / prompt, 4) if prompt else None,
        "missed_vs_oracle": {
            "system_prompt": round(missed_sys / prompt, 4) if prompt else None,
            "history": round(missed_hist / prompt, 4) if prompt else None,
        },
    }


def affinity(sent: Sequence[Sent], workload: ChatWorkload) -> dict[str, Any]:
    """Where conversations landed: the share of follow-up turns served by another worker than
    the turn before, and how many workers served each system prompt."""
    last: dict[int, str] = {}
    moved = follow_ups = 0
    by_system: dict[int, set[str]] = {}
    for s in sorted(sent, key=lambda s: s.record.start_s):
        w = s.record.worker
        if not (s.record.ok and w):
            continue
        if s.user in last:
            follow_ups += 1
            moved += last[s.user] != w
        last[s.user] = w
        by_system.setdefault(workload.user(s.user).system, set()).add(w)
    spread = [len(ws) for ws in by_system.values()]
    return {
        "follow_up_turns_moved": round(moved / follow_ups, 4) if follow_ups else None,
        "workers_per_system_prompt": round(statistics.mean(spread), 2) if spread else None,
    }


def policy_figures(
    sent: Sequence[Sent],
    workload: ChatWorkload,
    addrs: Sequence[str],
    deltas: Sequence[dict[str, int]],
    duration_s: float,
    requests_per_worker: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The issue's figures first, then what explains them. Requests per worker (for the
    imbalance) are those the gateway's worker header names, unless given."""
    records = [s.record for s in sent]
    summ = summarize(records, duration_s=duration_s)
    hits = sum(d["prefix_cache_hits"] for d in deltas)
    queries = sum(d["prefix_cache_queries"] for d in deltas)
    oracle = oracle_hits(workload.prompt_ids(s.messages) for s in sent)
    if requests_per_worker is None:
        per_worker = Counter(r.worker for r in records if r.ok)
        counts = [per_worker.get(a, 0) for a in addrs]
    else:
        counts = list(requests_per_worker)
    mean = statistics.mean(counts) if counts else 0.0
    return {
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "ttft_p50_ms": summ["ttft_ms"]["p50"],
        "ttft_p99_ms": summ["ttft_ms"]["p99"],
        "throughput_rps": summ["throughput_rps"],
        "load_imbalance": round(max(counts) / mean, 3) if mean else None,
        "oracle_hit_rate": round(oracle.hit_rate, 4),
        **served_vs_oracle(sent, workload, oracle),
        **affinity(sent, workload),
        "requests": summ["requests"],
        "ok": summ["ok"],
        "failed": summ["failed"],
        "errors": summ["errors"],
        "offered_rps": summ["offered_rps"],
        "users": len({s.user for s in sent}),
        "e2e_p50_ms": summ["e2e_ms"]["p50"],
        "e2e_p99_ms": summ["e2e_ms"]["p99"],
        "requests_per_worker": counts,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        "prompt_tokens": sum(d["prompt_tokens_total"] for d in deltas),
        "prompt_tokens_sent": oracle.prompt_tokens,
        "preemptions": sum(d["num_preemptions"] for d in deltas),
        "hit_rate_per_worker": [
            round(d["prefix_cache_hits"] / d["prefix_cache_queries"], 4)
            if d["prefix_cache_queries"]
            else None
            for d in deltas
        ],
    }


def targets(policies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, judged only when both prefix-aware and round-robin ran."""
    pa, rr = policies.get("prefix_aware", {}), policies.get("round_robin", {})
    if "hit_rate" not in pa or "hit_rate" not in rr:
        return {"judged": False}
    vs_oracle = pa["hit_rate"] / pa["oracle_hit_rate"] if pa["oracle_hit_rate"] else 0.0
    speedup = (rr["ttft_p50_ms"] or 0.0) / pa["ttft_p50_ms"] if pa["ttft_p50_ms"] else 0.0
    out = {
        "judged": True,
        "prefix_aware_hit_rate_vs_oracle": round(vs_oracle, 3),
        "ttft_p50_speedup_vs_round_robin": round(speedup, 2),
        "prefix_aware_load_imbalance": pa["load_imbalance"],
        "prefix_aware_hit_rate_per_request_vs_oracle": round(
            (pa["hit_rate_per_request"] or 0.0) / pa["oracle_hit_rate"], 3
        )
        if pa["oracle_hit_rate"]
        else 0.0,
        "hit_rate_ok": vs_oracle >= 0.9,
        "ttft_ok": speedup >= 2.0,
        "balance_ok": pa["load_imbalance"] is not None and pa["load_imbalance"] <= 1.25,
    }
    two = policies.get("prefix_aware_2_gateways", {})
    if two.get("hit_rate") is not None and pa["hit_rate"]:
        out["two_gateways_hit_rate_vs_one"] = round(two["hit_rate"] / pa["hit_rate"], 3)
        out["two_gateways_ok"] = out["two_gateways_hit_rate_vs_one"] >= 0.9
    out["met"] = out["hit_rate_ok"] and out["ttft_ok"] and out["balance_ok"]
    return out


def decision_micro_bench(
    entries: int = 100_000, decisions: int = 2000, reported: bool = False
) -> dict[str, Any]:
    """Cost of one prefix-aware routing decision (choose + record) at a full index.

    The gateway's own policy object, in this process: 4 ready workers, an index filled to
    `entries` block keys by chat requests over 40 system prompts, then `decisions` new
    requests timed one by one (~3 KB prompts: about 45 text blocks each). With `reported`,
    every worker also reports its cache (as over WatchCache) and the decision includes
    rendering the chat template, tokenizing and hashing the engine's token blocks, and
    times what forwarding the prompt's token ids costs the gateway after the decision
    (every other request forwards: `after_decision_us` is tokenizing the last new piece
    and packing the ids, or for the others only tokenizing that piece, as the gateway does
    after every decision) against what it spares the worker (`worker_tokenize_us`:
    rendering and tokenizing the prompt, against `worker_take_ids_us`: unpacking and
    checking the ids; timed after the decisions, not to disturb them). Run with the
    cyclic collector set as a started gateway sets it (`serving.heap.settle`: what the
    process holds by then frozen), so the bench's own records do not slow its collections.
    """
    saved = gc.get_threshold()
    settle()  # the collector as a gateway runs it, once started (serving/heap.py)
    try:
        return _decisions(entries, decisions, reported)
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def _decisions(entries: int, decisions: int, reported: bool) -> dict[str, Any]:
    from gateway.registry.base import WorkerInfo, WorkerState
    from gateway.routing.cache_views import CacheView
    from gateway.routing.policy import PrefixAware
    from gateway.routing.prefix_index import block_keys, prompt_bytes
    from gateway.routing.token_keys import TokenizerStore, token_block_keys
    from proto import inference_pb2 as pb

    rng = random.Random(7)
    pool = [
        WorkerInfo(worker_id=f"w{i}", address=f"a{i}", state=WorkerState.SERVING) for i in range(4)
    ]
    policy = PrefixAware()
    if reported:
        from prompts.tokenizer import Tokenizer
        from worker.engine.demo_model import ensure_demo_model

        tok = Tokenizer(ensure_demo_model())
        policy.tokenizers = TokenizerStore()
        policy.tokenizers.add("m", tok)
        policy.views = {
            w.worker_id: CacheView(BLOCK_SIZE, "m", tok.source_dir, fingerprint=tok.fingerprint)
            for w in pool
        }
    systems = [f"You are assistant number {i}. " * 80 for i in range(40)]

    def request(i: int) -> pb.GenerateRequest:
        r = pb.GenerateRequest(model="m")
        r.chat.messages.add(role="system", content=rng.choice(systems))
        r.chat.messages.add(role="user", content=f"question {i} " * 40)
        return r

    def held() -> int:
        return sum(len(v.held) for v in policy.views.values())

    i = 0
    while len(policy.index) + held() < entries:
        r = request(i)
        w = policy.choose(pool, r, {})
        policy.prefilled(w.worker_id, policy.routed(w, r))
        if reported:  # the worker prefills it and reports the blocks
            keys = token_block_keys(r, tok, BLOCK_SIZE, "m")
            policy.views[w.worker_id].apply(keys, [], time.monotonic())
            policy.tokenizers.pieces(tok).learn()  # type: ignore[union-attr]
        i += 1
    outstanding = {"w0": 3, "w1": 1, "w2": 2}
    times = []
    reqs = [request(i + j) for j in range(decisions)]
    pieces = policy.tokenizers.pieces(tok) if reported and policy.tokenizers else None
    after: tuple[list[float], list[float]] = ([], [])  # forwarding, not
    hints = []
    for i, r in enumerate(reqs):
        t = time.perf_counter()
        w = policy.choose(pool, r, outstanding)
        policy.prefilled(w.worker_id, policy.routed(w, r))
        times.append((time.perf_counter() - t) * 1e6)
        if pieces is not None:
            t = time.perf_counter()
            if i % 2 == 0 and (hint := policy.prompt_ids(w, r)) is not None:
                hints.append((r, hint))
            pieces.learn()  # the gateway does this after the decision, on its loop
            after[i % 2].append((time.perf_counter() - t) * 1e6)
    worker: dict[str, list[float]] = {"tokenize": [], "take": []}
    for r, hint in hints:
        _time_worker(tok, r, hint, worker)
    out = {
        "index_entries": len(policy.index),
        "blocks_per_request": len(block_keys(prompt_bytes(reqs[0]))),
        "decision_us_p50": _pct(times, 0.5),
        "decision_us_p99": _pct(times, 0.99),
        "ok": _pct(times, 0.5) < 200,
    }
    if reported:
        out["reported_blocks"] = held()
        out["token_blocks_per_request"] = len(token_block_keys(reqs[0], tok, BLOCK_SIZE, "m"))
        out["after_decision_us_p50_forwarding"] = _pct(after[0], 0.5)
        out["after_decision_us_p50_not"] = _pct(after[1], 0.5)
        out["forwarded"] = len(hints)
        out["worker_tokenize_us_p50"] = _pct(worker["tokenize"], 0.5)
        out["worker_take_ids_us_p50"] = _pct(worker["take"], 0.5)
    return out


def _pct(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) as the rest of the bench reports it (report.percentile)."""
    p = percentile(values, q * 100)
    return round(p, 1) if p is not None else None


def _time_worker(tok: Any, r: Any, hint: Any, into: dict[str, list[float]]) -> None:
    """What a worker spends on the prompt: tokenizing it itself, or taking the ids (the
    conversion and the engine's vocabulary check), each checked equal to the other."""
    from proto.prompt_ids import prompt_ids_from

    messages = [{"role": m.role, "content": m.content} for m in r.chat.messages]
    t = time.perf_counter()
    own = tok.prompt_ids(None, messages, r.chat.add_generation_prompt)
    into["tokenize"].append((time.perf_counter() - t) * 1e6)
    t = time.perf_counter()
    ids = prompt_ids_from(hint.ids)
    ok = ids is not None and (not ids or max(ids) < tok.vocab_size)
    into["take"].append((time.perf_counter() - t) * 1e6)
    if not ok or ids != own:
        raise AssertionError("the forwarded ids are not the worker's own")


# -- the bench -------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[routing-bench] {msg}", file=sys.stderr, flush=True)


def _key(policy: str) -> str:
    return policy.replace("-", "_")


class _Workers:
    """Shared workers, or fresh ones for every run (`--fresh-workers`)."""

    def __init__(self, cfg: BenchConfig, kv_tokens: int) -> None:
        self.cfg, self.kv_tokens = cfg, kv_tokens
        self.procs: list[Proc] = []
        self.used = False
        self.start_s = 0.0

    def get(self) -> list[str]:
        """Addresses for the next run."""
        if self.cfg.fresh_workers and self.used:
            self.close()
        if not self.procs:
            t = time.monotonic()
            self.procs = start_workers(self.cfg, self.kv_tokens)
            self.start_s += time.monotonic() - t
            cfg = self.cfg
            log(
                f"{cfg.workers} sim workers up: {cfg.preset} at {cfg.sim_speed:g}x speed, "
                f"{self.kv_tokens} KV tokens each"
            )
        self.used = True
        return [p.ready["grpc"] for p in self.procs]

    def close(self) -> None:
        stop_all(self.procs)
        self.procs = []
        self.used = False


def run_policy(
    policy: str, addrs: Sequence[str], traffic: Callable[[list[str]], list[Sent]]
) -> tuple[list[Sent], list[dict[str, int]], int] | str:
    """Traffic through fresh gateways with `policy`: the turns sent, each worker's counter
    deltas and how many times the gateways ejected a replica (breaker or slow-replica
    detector: none should on this healthy fleet), or why a gateway would not start.

    `<policy>-2-gateways` runs two gateway replicas that share state through their own
    Redis (a redis-server on a free port), each user's turns alternating between them.
    """
    replicas = 2 if policy.endswith(TWO_GATEWAYS) else 1
    base = policy.removesuffix(TWO_GATEWAYS)
    with contextlib.ExitStack() as stack:
        extra: tuple[str, ...] = ()
        if replicas > 1:
            redis = stack.enter_context(RedisServer())
            extra = ("--redis-url", redis.url)
        gws: list[Proc] = []
        try:
            for _ in range(replicas):
                gws.append(start_policy_gateway(base, addrs, *extra))
        except RuntimeError as e:
            stop_all(gws)
            return refusal(e)
        try:
            sent, deltas = counted(addrs, lambda: traffic([gw.ready["http"] for gw in gws]))
            return sent, deltas, sum(ejections(gw) for gw in gws)
        finally:
            stop_all(gws)


def ejections(gw: Proc) -> int:
    """Times this gateway ejected any replica since it started."""
    ws = admin_json(gw, "/admin/workers")["workers"]
    return sum(int(w.get("breaker", {}).get("times_ejected", 0)) for w in ws)


def probe_capacity(
    cfg: BenchConfig, workload: ChatWorkload, addrs: Sequence[str]
) -> dict[str, Any]:
    """The fleet's capacity for this workload: a closed loop of many conversations through
    round-robin (its own salt, so the runs after it start cold)."""
    users = cfg.probe_users_per_worker * cfg.workers
    res = run_policy(
        "round-robin",
        addrs,
        lambda urls: asyncio.run(
            chat_closed_loop(urls, workload, users, cfg.probe_s, cfg, "probe")
        ),
    )
    if isinstance(res, str):
        raise RuntimeError(f"the round-robin gateway did not start: {res}")
    sent, deltas, _ = res
    cap = capacity_rps(sent, cfg.probe_s)
    log(f"capacity {cap:.2f} req/s (closed loop, {users} conversations, round-robin)")
    queries = sum(d["prefix_cache_queries"] for d in deltas)
    return {
        "capacity_rps": round(cap, 2),
        "policy": "round-robin",
        "closed_loop_users": users,
        "duration_s": cfg.probe_s,
        "requests": len(sent),
        "failed": sum(s.record.status not in ("ok", "cancelled") for s in sent),
        "cancelled_at_end": sum(s.record.status == "cancelled" for s in sent),
        "hit_rate": round(sum(d["prefix_cache_hits"] for d in deltas) / max(1, queries), 4),
    }


def run(cfg: BenchConfig) -> dict[str, Any]:
    t_start = time.monotonic()
    workload = ChatWorkload(cfg.seed, cfg.system_prompts, turns=cfg.turns)
    timings: dict[str, float] = {"workload_s": round(time.monotonic() - t_start, 1)}
    sys_tokens = workload.system_prompt_tokens()
    kv_tokens = kv_tokens_for(cfg, sys_tokens)
    out: dict[str, Any] = {
        "oracle_hit_rate": None,
        "hit_counter_unit": HIT_COUNTER_UNIT,
        "capacity_rps": None,
        "offered_rps": None,
        "policies": {},
    }
    workers = _Workers(cfg, kv_tokens)
    try:
        rate = cfg.rate
        if rate is None:
            t = time.monotonic()
            out["capacity_probe"] = probe = probe_capacity(cfg, workload, workers.get())
            timings["probe_s"] = round(time.monotonic() - t, 1)
            out["capacity_rps"] = probe["capacity_rps"]
            rate = cfg.load * probe["capacity_rps"]
        if not rate > 0:
            raise RuntimeError("capacity probe completed no requests")
        out["offered_rps"] = round(rate, 2)
        offsets = Schedule(rate=rate, seed=cfg.seed).arrivals(cfg.duration_s)
        for n, policy in enumerate(cfg.policies):
            t = time.monotonic()
            addrs = workers.get()
            log(f"{policy}: {len(offsets)} turns at {rate:.2f} req/s over {cfg.duration_s:g} s")
            res = run_policy(
                policy,
                addrs,
                lambda urls, n=n: asyncio.run(
                    chat_open_loop(urls, workload, offsets, cfg, salt=f"run {n}")
                ),
            )
            if isinstance(res, str):
                log(f"{policy}: skipped, the gateway refused it: {res}")
                out["policies"][_key(policy)] = {"skipped": f"gateway refused it: {res}"}
                continue
            figs = policy_figures(res[0], workload, addrs, res[1], cfg.duration_s)
            figs["replica_ejections"] = res[2]
            out["policies"][_key(policy)] = figs
            timings[f"{_key(policy)}_s"] = round(time.monotonic() - t, 1)
    finally:
        workers.close()
        timings["start_workers_s"] = round(workers.start_s, 1)
    ran = [p for p in out["policies"].values() if "oracle_hit_rate" in p]
    if ran:
        out["oracle_hit_rate"] = round(statistics.mean(p["oracle_hit_rate"] for p in ran), 4)
    out["targets"] = targets(out["policies"])
    out["decision"] = decision_micro_bench()
    out["decision_reported"] = decision_micro_bench(reported=True)
    out["workload"] = workload_info(cfg, sys_tokens, kv_tokens)
    out["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("policies",)}
    timings["total_s"] = round(time.monotonic() - t_start, 1)
    out["timings"] = timings
    return out


def workload_info(cfg: BenchConfig, sys_tokens: Sequence[int], kv_tokens: int) -> dict[str, Any]:
    """The chat workload's shape against the workers' KV cache, for the report."""
    share = sorted(sys_tokens)[-math.ceil(len(sys_tokens) / cfg.workers) :]
    return {
        "system_prompts": len(sys_tokens),
        "system_prompt_tokens": {
            "min": min(sys_tokens),
            "mean": round(statistics.mean(sys_tokens)),
            "max": max(sys_tokens),
            "total": sum(sys_tokens),
        },
        "kv_tokens_per_worker": kv_tokens,
        "all_system_prompts_fit_one_worker": sum(sys_tokens) <= kv_tokens,
        "largest_1_over_workers_fit_one_worker": sum(share) <= kv_tokens,
        "turns_per_user": list(cfg.turns),
        "think_s": cfg.think_s,
        "max_tokens": cfg.max_tokens,
        "block_size": BLOCK_SIZE,
    }


def format_table(res: dict[str, Any]) -> str:
    """Policies side by side, for a terminal."""
    cols = (
        ("hit_rate", "hit rate"),
        ("oracle_hit_rate", "oracle"),
        ("ttft_p50_ms", "TTFT p50"),
        ("ttft_p99_ms", "TTFT p99"),
        ("throughput_rps", "req/s"),
        ("load_imbalance", "imbalance"),
        ("failed", "failed"),
        ("preemptions", "preempt"),
    )
    cap = res["capacity_rps"]
    lines = [
        (f"capacity {cap} req/s (round-robin, closed loop)" if cap else "capacity not measured")
        + f"; offered {res['offered_rps']} req/s; oracle hit rate {res['oracle_hit_rate']}",
        f"{'policy':<20}" + "".join(f"{title:>11}" for _, title in cols),
    ]
    for name, p in res["policies"].items():
        if "skipped" in p:
            lines.append(f"{name:<20} skipped: {p['skipped']}")
            continue
        cells = ("-" if p[k] is None else f"{p[k]:g}" for k, _ in cols)
        lines.append(f"{name:<20}" + "".join(f"{c:>11}" for c in cells))
    t = res["targets"]
    if t.get("judged"):
        lines.append(
            f"targets: prefix-aware hit rate {t['prefix_aware_hit_rate_vs_oracle']:g}x oracle "
            f"(>= 0.9), TTFT p50 {t['ttft_p50_speedup_vs_round_robin']:g}x better than "
            f"round-robin (>= 2), imbalance {t['prefix_aware_load_imbalance']} (<= 1.25): "
            + ("met" if t["met"] else "NOT met")
        )
    if "two_gateways_hit_rate_vs_one" in t:
        lines.append(
            f"two gateways sharing Redis: {t['two_gateways_hit_rate_vs_one']:g}x one gateway's "
            "hit rate (>= 0.9)"
        )
    d = res.get("decision")
    if d:
        lines.append(
            f"routing decision at {d['index_entries']} index entries: p50 "
            f"{d['decision_us_p50']} us, p99 {d['decision_us_p99']} us (< 200)"
        )
    d = res.get("decision_reported")
    if d:
        lines.append(
            f"with reported caches ({d['reported_blocks']} blocks, tokenize + hash "
            f"{d['token_blocks_per_request']} token blocks): p50 {d['decision_us_p50']} us, "
            f"p99 {d['decision_us_p99']} us (< 200)"
        )
        if d.get("forwarded"):
            lines.append(
                "forwarding the token ids: gateway after the decision p50 "
                f"{d['after_decision_us_p50_forwarding']} us (not forwarding: "
                f"{d['after_decision_us_p50_not']} us); worker p50 "
                f"{d['worker_take_ids_us_p50']} us to take them instead of "
                f"{d['worker_tokenize_us_p50']} us to tokenize"
            )
    return "\n".join(lines)


def add_workload_args(ap: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The chat workload's and the sim fleet's flags (shared with peer_bench --workload chat)."""
    ap.add_argument("--workers", type=int, default=BenchConfig.workers)
    ap.add_argument("--rate", type=float, help="offered req/s (skips the capacity probe)")
    ap.add_argument("--load", type=float, default=BenchConfig.load, help="share of capacity")
    ap.add_argument("--probe-duration", type=float, help="capacity probe seconds")
    ap.add_argument(
        "--probe-users",
        type=int,
        default=BenchConfig.probe_users_per_worker,
        help="capacity probe conversations per worker",
    )
    ap.add_argument("--sim-speed", type=float, default=BenchConfig.sim_speed)
    ap.add_argument("--kv-tokens", type=int, help="per worker (default: see BenchConfig)")
    ap.add_argument("--system-prompts", type=int, default=BenchConfig.system_prompts)
    ap.add_argument("--think", type=float, default=BenchConfig.think_s, help="mean, s")
    ap.add_argument("--max-tokens", type=int, default=BenchConfig.max_tokens)
    ap.add_argument("--seed", type=int, default=BenchConfig.seed)


def workload_config(base: BenchConfig, args: argparse.Namespace) -> BenchConfig:
    """`base` with the flags of `add_workload_args` applied."""
    return replace(
        base,
        workers=args.workers,
        duration_s=args.duration or base.duration_s,
        probe_s=args.probe_duration or base.probe_s,
        probe_users_per_worker=args.probe_users,
        rate=args.rate,
        load=args.load,
        sim_speed=args.sim_speed,
        kv_tokens=args.kv_tokens,
        system_prompts=args.system_prompts,
        think_s=args.think,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs: under a minute in all")
    ap.add_argument("--duration", type=float, help="open-loop seconds per policy")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma list")
    add_workload_args(ap)
    ap.add_argument("--fresh-workers", action="store_true", help="restart workers per run")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    args = ap.parse_args(argv)
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    base = QUICK if args.quick else BenchConfig()
    cfg = replace(
        workload_config(base, args),
        policies=policies,
        fresh_workers=args.fresh_workers,
    )
    res = run(cfg)
    print(format_table(res), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
