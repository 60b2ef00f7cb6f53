"""Merging the gateway processes' metric snapshots: counters and histograms add up, breaker
states keep the worst."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import merge_expositions


def exposition(requests: int, breaker: float, latency: list[float], queued: int) -> str:
    r = CollectorRegistry()
    Counter("breakwater_requests", "r", ["status"], registry=r).labels("200").inc(requests)
    Gauge("breakwater_breaker_state", "b", ["worker"], registry=r).labels("w0").set(breaker)
    Gauge("breakwater_queue_depth", "q", registry=r).set(queued)
    h = Histogram("breakwater_request_duration_seconds", "l", buckets=(0.1, 1.0), registry=r)
    for x in latency:
        h.observe(x)
    return generate_latest(r).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_sums_and_worst_breaker() -> None:
    merged = samples(
        merge_expositions([exposition(3, 0.0, [0.05, 2.0], 1), exposition(4, 2.0, [0.5], 2)])
    )
    assert merged[("breakwater_requests_total", (("status", "200"),))] == 7
    assert merged[("breakwater_breaker_state", (("worker", "w0"),))] == 2.0
    assert merged[("breakwater_queue_depth", ())] == 3
    assert merged[("breakwater_request_duration_seconds_count", ())] == 3
    assert merged[("breakwater_request_duration_seconds_bucket", (("le", "0.1"),))] == 1
    assert merged[("breakwater_request_duration_seconds_bucket", (("le", "1.0"),))] == 2


def test_a_replica_is_ready_only_if_every_process_says_so() -> None:
    def ready(value: float) -> str:
        r = CollectorRegistry()
        Gauge("breakwater_worker_ready", "r", ["worker"], registry=r).labels("w0").set(value)
        return generate_latest(r).decode()

    merged = samples(merge_expositions([ready(1.0), ready(0.0), ready(1.0)]))
    assert merged[("breakwater_worker_ready", (("worker", "w0"),))] == 0.0
    assert (
        samples(merge_expositions([ready(1.0), ready(1.0)]))[
            ("breakwater_worker_ready", (("worker", "w0"),))
        ]
        == 1.0
    )


def test_a_retired_process_keeps_its_counts_not_its_gauges() -> None:
    """A sibling that restarted starts from zero: its previous life's counters and
    histograms are still added in (they went backwards), its gauges are not."""
    old, new = exposition(5, 2.0, [0.05], 7), exposition(1, 0.0, [0.5], 1)
    merged = samples(merge_expositions([new], retired=[old]))
    assert merged[("breakwater_requests_total", (("status", "200"),))] == 6
    assert merged[("breakwater_request_duration_seconds_count", ())] == 2
    assert merged[("breakwater_queue_depth", ())] == 1
    assert merged[("breakwater_breaker_state", (("worker", "w0"),))] == 0.0
    assert "_created" not in merge_expositions([new, old])  # no empty families
