"""The worker's Prometheus metrics, under vLLM's names, so dashboards and autoscalers built
for vLLM (HPA on `vllm:num_requests_waiting`, Grafana boards, llm-d's scorers) work as is.

Engine-wide figures (queue, running, KV usage, prefix-cache and token counters) are read
from the engine's stats when scraped, so serving pays nothing for them; per-request
latencies (TTFT, inter-token, end-to-end) are observed as deltas leave the engine, through
`MeteredEngine`, which both the gRPC and the HTTP faces use.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.engine_factory import open_stream

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for these histograms (seconds).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
    5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class _EngineCollector(Collector):
    """Gauges and counters read from the engine's latest stats at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        service = self.service
        engine = service.engine
        model = service.model_name
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([model], value)
            return c

        s = engine.stats() if engine is not None else None
        yield gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            s.num_requests_running if s else 0,
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            service.queue_depth(),
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            s.kv_cache_usage if s else 0.0,
        )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            s.prefix_cache_queries if s else 0,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            s.prefix_cache_hits if s else 0,
        )
        yield counter(
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine.",
            s.num_preemptions if s else 0,
        )
        yield counter(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            s.prompt_tokens_total if s else 0,
        )
        yield counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            s.generation_tokens_total if s else 0,
        )
        yield counter(
            "breakwater_worker_prompts_pretokenized",
            "Prompts taken as the token ids a gateway computed to route them, not tokenized "
            "again here (the gateway's tokenizer had this worker's fingerprint).",
            getattr(s, "prompts_pretokenized", 0) if s else 0,
        )
        yield gauge(
            "breakwater_worker_in_flight",
            "Generate calls accepted and not finished (gRPC and HTTP).",
            service.in_flight,
        )
        state = GaugeMetricFamily(
            "breakwater_worker_state", "1 for the worker's current state.", labels=["state"]
        )
        for name in ("STARTING", "SERVING", "NOT_SERVING", "DRAINING"):  # NOT_SERVING: engine dead
            state.add_metric([name], 1.0 if service.state == name else 0.0)
        yield state


class WorkerMetrics:
    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(service))
        self.service = service
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            labels,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pass an engine's deltas through, timing the request as vLLM does."""
        model = self.service.model_name
        start = last = time.monotonic()
        first = True
        try:
            async for delta in stream:
                now = time.monotonic()
                tokens = len(delta.token_ids)
                if tokens:
                    if first:
                        self.ttft.labels(model).observe(now - start)
                        first = False
                        tokens -= 1
                    if tokens > 0:
                        # one delta may carry several tokens: each gets the mean gap
                        gap = (now - last) / tokens
                        hist = self.itl.labels(model)
                        for _ in range(tokens):
                            hist.observe(gap)
                    last = now
                if delta.finish_reason is not None:
                    self.e2e.labels(model).observe(now - start)
                    if delta.finish_reason in ("stop", "length", "abort"):
                        self.success.labels(model, delta.finish_reason).inc()
                yield delta
        finally:
            if hasattr(stream, "aclose"):
                await stream.aclose()


class MeteredEngine:
    """The engine as the worker's faces see it: the same interface, with `generate` timed."""

    def __init__(self, engine: Any, metrics: WorkerMetrics) -> None:
        self._engine = engine
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, request: Any) -> AsyncIterator[Any]:
        return self._metrics.observe(self._engine.generate(request))

    async def generate_async(self, request: Any) -> AsyncIterator[Any]:
        return self._metrics.observe(await open_stream(self._engine, request))
