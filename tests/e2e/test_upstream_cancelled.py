"""A call a replica cancels before its first token is retried elsewhere.

A worker's gRPC server that stops cuts the calls that reached it in its last moments with
CANCELLED; a rolling restart lost a request now and then that way (the chaos suite's
rolling-restart over gRPC). The injected fault stands for that moment, on every call.
"""

from __future__ import annotations

from tests.procs import complete, metric_total, start_gateway, start_sim_worker, wait_for


def _listed(gw_url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(gw_url + "/v1/models", timeout=10) as r:
        return b'"sim"' in r.read()


def test_a_cancelled_call_is_retried_on_another_replica() -> None:
    cutting = start_sim_worker("--fault-fail-rate", "1", "--fault-code", "CANCELLED")
    healthy = start_sim_worker()
    gw = start_gateway(
        "--worker", cutting.ready["grpc"], "--worker", healthy.ready["grpc"],
        "--routing", "round-robin",
    )  # fmt: skip
    try:
        wait_for(lambda: _listed(gw.ready["http"]), timeout=30)
        answers = [complete(gw, i, stream=i % 2 == 1) for i in range(12)]
        assert [status for status, _, _ in answers] == [200] * 12, answers
        retries = 'event="retries"'  # the metrics are gathered every so often: wait
        wait_for(lambda: metric_total(gw, "breakwater_upstream_total", retries) >= 1, 60)
    finally:
        gw.stop()
        healthy.stop()
        cutting.stop()
