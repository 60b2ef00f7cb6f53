"""The gateway's Prometheus metrics and its one-line-per-request log.

A gateway runs several processes on one port (`--processes`), and a scrape reaches any one
of them. Each process keeps its metrics in memory and, once a second, writes their text
exposition to the gateway's shared directory (made by process 0, inherited by siblings);
whichever process answers a scrape merges the others' files with its own live figures:
counters and histograms add up, gauges add up too except breaker states and readiness,
where the worst (highest) wins.

prometheus-client's own multiprocess mode does this on every update, through mmap'd
files: measured here, 65 us per request for one counter and three histograms, against
9 us in memory (a request through the gateway costs ~300 us of CPU in all).

Per request, on the hot path: a counter by model and status, and histograms of latency,
TTFT and time per output token. Everything else (shed requests by reason, attempts and
retries, breaker states, queue depth, routing hits) is copied from the gateway's own
counters once a second, so the request path pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import shared_dir
from serving.openai_http import Finished

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
request_log = logging.getLogger("breakwater.requests")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
BREAKER_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}


UNCHECKED_MODEL = frozenset({400, 404, 408, 413})


@dataclass(slots=True)
class _Series:
    requests: Any
    latency: Any
    ttft: Any
    tpot: Any
    prompt: Any
    completion: Any
    cached: Any


class GatewayMetrics:
    def __init__(
        self,
        sources: Callable[[], Mapping[str, Mapping[str, float]]],
        gauges: Callable[[], Mapping[str, Any]],
        price_per_gpu_hour: float = 0.0,
        log_requests: bool = False,
    ) -> None:
        """`sources()`: named tallies that only grow (copied into counters each second);
        `gauges()`: current values (queue depth, in flight, breaker states, ...)."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry(auto_describe=True)
        self.directory = os.environ.get(shared_dir.ENV)
        self.index = 0
        """This process's index in its gateway (--processes): names its snapshot file."""
        self._sources = sources
        self._gauges = gauges
        self.price_per_gpu_hour = price_per_gpu_hour
        self.log_requests = log_requests
        self.serves: Callable[[str], bool] | None = None
        """Whether the gateway serves a model now (the dispatcher's has_model): a refused
        request's model is a label only then (a gRPC call cancelled before its model was
        checked, say, could name anything)."""
        self._seen: dict[str, Tally[str]] = {}
        self._children: dict[tuple[str, int], _Series] = {}
        self._task: asyncio.Task[None] | None = None
        self._taken = itertools.count(1)
        """Each exposition's order, taken on the event loop with it."""
        self._written = 0
        self._write_lock = threading.Lock()
        self.requests = Counter(
            "breakwater_requests", "Requests answered, by model and HTTP status.",
            ["model", "status"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "breakwater_request_duration_seconds", "End-to-end request latency.",
            ["model"], buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "breakwater_time_to_first_token_seconds", "Time to the first output, gateway side.",
            ["model"], buckets=TTFT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "breakwater_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ["model"], buckets=TPOT_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "breakwater_tokens", "Tokens by kind (prompt, completion, cached) and model.",
            ["model", "kind"],
            registry=r,
        )  # fmt: skip
        self.cost = Counter(
            "breakwater_cost_dollars",
            "Estimated serving cost: replica time at --gpu-hour-price, shared among the "
            "requests in flight on it.",
            ["model", "tenant"],
            registry=r,
        )  # fmt: skip
        self.admission = Counter(
            "breakwater_admission",
            "Admission outcomes: admitted, why refused (shed), or cancelled (the client left "
            "while queued).",
            ["outcome"],
            registry=r,
        )  # fmt: skip
        self.retry_advice = Counter(
            "breakwater_retry_advice", "Retries that arrived (retry_arrived), and refusals "
            "told to retry or not (told_to_retry, told_not_to_retry: x-should-retry).",
            ["advice"],
            registry=r,
        )  # fmt: skip
        self.upstream = Counter(
            "breakwater_upstream", "Upstream calls: requests, attempts, retries and "
            "retry_budget_exhausted.", ["event"],
            registry=r,
        )  # fmt: skip
        self.routing = Counter(
            "breakwater_routing_prefix_blocks", "Prompt blocks routed, and those the chosen "
            "replica held (their ratio is the routing hit rate).", ["kind"],
            registry=r,
        )  # fmt: skip
        self.routing_decisions = Counter(
            "breakwater_routing_decisions", "Prefix-aware decisions by reason: held, "
            "new_prefix, queued_prefill, load_bound, only (gateway.routing.policy.DECISIONS).",
            ["reason"],
            registry=r,
        )  # fmt: skip
        self.shadow = Counter(
            "breakwater_shadow", "Shadow traffic: requests mirrored to another version, and "
            "how their answers compared (matched, mismatched, failed, skipped, dropped).",
            ["outcome"],
            registry=r,
        )  # fmt: skip
        self.client_disconnects = Counter(
            "breakwater_client_disconnects",
            "Clients that left before their answer ended.",
            registry=r,
        )
        self.connections_refused = Counter(
            "breakwater_connections_refused",
            "Connections answered 503 and closed at --max-connections (shed before any "
            "request was read, so in no other family).",
            registry=r,
        )
        self.in_flight = Gauge(
            "breakwater_in_flight", "Requests admitted and not finished.",
            registry=r,
        )  # fmt: skip
        self.queued = Gauge(
            "breakwater_queue_depth", "Requests waiting for an admission slot.",
            registry=r,
        )  # fmt: skip
        self.outstanding = Gauge(
            "breakwater_worker_outstanding", "Calls in flight to each replica.",
            ["worker"],
            registry=r,
        )  # fmt: skip
        self.breaker = Gauge(
            "breakwater_breaker_state", "Each replica's breaker: 0 closed, 1 half-open, 2 open.",
            ["worker"],
            registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "breakwater_worker_ready", "1 while a replica is ready for traffic.",
            ["worker"],
            registry=r,
        )  # fmt: skip

    # -- per request -------------------------------------------------------------------------

    def _series(self, model: str, status: int) -> _Series:
        """The model's children of each family, made once: `labels()` takes a lock and
        builds a key each call, 3% of a relayed request's CPU (py-spy, peer_bench JSON)."""
        key = (model, status)
        series = self._children.get(key)
        if series is None:
            series = self._children[key] = _Series(
                self.requests.labels(model, str(status)),
                self.latency.labels(model),
                self.ttft.labels(model),
                self.tpot.labels(model),
                self.tokens.labels(model, "prompt"),
                self.tokens.labels(model, "completion"),
                self.tokens.labels(model, "cached"),
            )
        return series

    def finished(self, done: Finished) -> None:
        # A model a client named in a request refused before the name was checked (400,
        # 404, 408, 413) is not a label: arbitrary names would grow the series unbounded.
        status = done.status
        model = "unknown" if not done.model or status in UNCHECKED_MODEL else done.model
        if status >= 400 and self.serves is not None and not self.serves(model):
            model = "unknown"
        info = done.info
        series = self._series(model, status)
        series.requests.inc()
        latency = done.ended - done.started
        if status < 400:
            series.latency.observe(latency)
        ttft = (info.first_output_at - done.started) if info.first_output_at else None
        if ttft is not None:
            series.ttft.observe(ttft)
        completion = info.usage[1] if info.usage else info.output_chunks
        if ttft is not None and completion > 1:
            series.tpot.observe((latency - ttft) / (completion - 1))
        if info.usage:
            prompt, comp, cached = info.usage
            series.prompt.inc(prompt)
            series.completion.inc(comp)
            series.cached.inc(cached)
        # what the replica spent: an answer cut after its first token (a deadline the client
        # set just short of the end) used the GPU all the same, whatever its status says
        if self.price_per_gpu_hour and (done.status < 400 or info.first_output_at is not None):
            share = latency / max(1, info.concurrency)
            self.cost.labels(model, done.tenant or "").inc(share * self.price_per_gpu_hour / 3600)
        if self.log_requests:
            request_log.info(self.log_line(done, latency, ttft))

    @staticmethod
    def log_line(done: Finished, latency: float, ttft: float | None) -> str:
        info = done.info
        prompt, completion, cached = info.usage or (None, None, None)
        return orjson.dumps(
            {
                "request_id": done.request_id,
                "tenant": done.tenant,
                "key_id": done.key_id,
                "model": done.model,
                "replica": info.worker_id,
                "status": done.status,
                "stream": done.stream,
                "attempts": info.attempts,
                "prompt_tokens": prompt,
                "completion_tokens": completion if completion is not None else info.output_chunks,
                "cached_tokens": cached,
                "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
                "latency_ms": round(latency * 1000, 2),
                "error": done.error_type,
            }
        ).decode()

    # -- once a second -------------------------------------------------------------------------

    async def start(self, interval_s: float = 1.0) -> None:
        if self.directory:
            await asyncio.to_thread(self._retire_previous)
        self._task = asyncio.create_task(self._loop(interval_s))

    def _retire_previous(self) -> None:
        """Keep the counts of this process's previous life (a sibling restarted after a
        crash): its last snapshot's counters and histograms go into `retired-{index}.prom`,
        which every render adds in. Overwritten by the new process's zeros, the merged
        counters went backwards (12 requests, then 7), and rate() saw a spike."""
        path = self._snapshot_path(self.index)
        try:
            with open(path) as f:
                texts = [f.read()]
        except OSError:
            return
        retired = os.path.join(self.directory or "", f"retired-{self.index}.prom")
        with contextlib.suppress(OSError), open(retired) as f:
            texts.append(f.read())
        with open(retired + ".tmp", "w") as f:
            f.write(merge_expositions([], retired=texts))
        os.replace(retired + ".tmp", retired)
        os.remove(path)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self.sync()  # the last second's counts too
            self._write_snapshot(*self._numbered())

    async def _loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.sync()
                if self.directory:
                    await asyncio.to_thread(self._write_snapshot, *self._numbered())
            except Exception:  # metrics must never take the gateway down
                logging.getLogger(__name__).exception("metrics sync failed")

    def _exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def _snapshot_path(self, index: int) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"metrics-{index}.prom")

    def _numbered(self) -> tuple[bytes, int]:
        return self._exposition(), next(self._taken)

    def _write_snapshot(self, text: bytes, taken: int) -> None:
        """Never an older exposition over a newer one (the loop's, written in a thread,
        and a scrape's, written on the loop, can cross), never two at once on one file."""
        if not self.directory:
            return
        path = self._snapshot_path(self.index)
        with self._write_lock:
            if taken < self._written:
                return
            self._written = taken
            with open(path + ".tmp", "wb") as f:
                f.write(text)
            os.replace(path + ".tmp", path)

    def render(self) -> bytes:
        """This process's live figures merged with its siblings' last snapshots."""
        own, taken = self._numbered()
        if not self.directory:
            return own
        # Written first: the next scrape, answered by a sibling, then merges this process at
        # what this one said, not at its last once-a-second snapshot, which is older. Mixing
        # one live process with the others' snapshots made counters go back between scrapes
        # (33 times in 150 at three processes), and rate() saw each as a reset.
        with contextlib.suppress(OSError):
            self._write_snapshot(own, taken)
        texts, retired = [own.decode()], []
        mine = f"metrics-{self.index}.prom"
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".prom") or name == mine:
                continue
            if name.startswith(("metrics-", "retired-")):
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(self.directory, name)) as f,
                ):
                    (texts if name.startswith("metrics-") else retired).append(f.read())
        if len(texts) == 1 and not retired:
            return own
        return merge_expositions(texts, retired=retired).encode()

    def sync(self) -> None:
        counters = {
            "admission": (self.admission, "outcome"),
            "retry_advice": (self.retry_advice, "advice"),
            "upstream": (self.upstream, "event"),
            "routing": (self.routing, "kind"),
            "routing_decisions": (self.routing_decisions, "reason"),
            "shadow": (self.shadow, "outcome"),
        }
        unlabelled = {
            "client_disconnects": self.client_disconnects,
            "connections_refused": self.connections_refused,
        }
        for name, tally in self._sources().items():
            if name in unlabelled:
                delta = tally.get("", 0) - self._seen.setdefault(name, Tally()).get("", 0)
                if delta > 0:
                    unlabelled[name].inc(delta)
                self._seen[name][""] = tally.get("", 0)
                continue
            metric, _ = counters[name]
            seen = self._seen.setdefault(name, Tally())
            for key, value in tally.items():
                delta = value - seen.get(key, 0)
                if delta > 0:
                    metric.labels(key).inc(delta)
                    seen[key] = value
        g = self._gauges()
        self.in_flight.set(g.get("in_flight", 0))
        self.queued.set(g.get("queued", 0))
        live = set(g.get("ready", {}))
        for gauge, key, value in (
            (self.outstanding, "outstanding", float),
            (self.breaker, "breakers", lambda state: BREAKER_VALUES.get(state, 0.0)),
            (self.ready, "ready", lambda ready: 1.0 if ready else 0.0),
        ):
            for worker, v in g.get(key, {}).items():
                if worker in live:
                    gauge.labels(worker).set(value(v))
            # a replica that left the registry takes its series along: every pod ever
            # seen stayed, and sum(breakwater_worker_ready) counted the gone as ready
            for labels in list(gauge._metrics):  # prometheus-client offers no listing
                if labels[0] not in live:
                    gauge.remove(*labels)


MAX_GAUGES = {"breakwater_breaker_state"}
"""Gauges where processes' values are not added: the worst (highest) one stands."""
MIN_GAUGES = {"breakwater_worker_ready"}
"""Gauges where the worst is the lowest: a replica is ready only if every process says
so (the highest counted it ready while any one did)."""


def merge_expositions(texts: Sequence[str], retired: Sequence[str] = ()) -> str:
    """Prometheus text expositions of the same families, added sample by sample; of the
    `retired` ones (processes gone), only counters and histograms (their gauges were)."""
    from prometheus_client.parser import text_string_to_metric_families

    meta: dict[str, tuple[str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    live = len(texts)
    for i, text in enumerate([*texts, *retired]):
        for fam in text_string_to_metric_families(text):
            if fam.name.endswith("_created") or (
                i >= live and fam.type not in ("counter", "histogram")
            ):
                continue  # _created: dropped below, its family printed empty
            meta.setdefault(fam.name, (fam.type, fam.documentation))
            merged = values.setdefault(fam.name, {})
            pick = max if fam.name in MAX_GAUGES else min if fam.name in MIN_GAUGES else None
            for sample in fam.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = merged.get(key)
                if old is None:
                    merged[key] = sample.value
                else:
                    merged[key] = pick(old, sample.value) if pick else old + sample.value
    lines: list[str] = []
    for name, (kind, doc) in meta.items():
        exposed = name + "_total" if kind == "counter" else name
        lines.append(f"# HELP {exposed} {doc}")
        lines.append(f"# TYPE {exposed} {kind}")
        for (sample, labels), value in values[name].items():
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{label_text}}} {value!r}" if labels else f"{sample} {value!r}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
