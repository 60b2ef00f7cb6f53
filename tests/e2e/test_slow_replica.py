"""The slow-replica detector against real workers: one whose every answer is slow is
ejected; its healthy peer, busy or not, is not."""

from __future__ import annotations

import json
import time
import urllib.request

from loadtest.fleet import admin_json, start_gateway, start_sim_worker, wait_for


def chat(base: str, n: int) -> str:
    body = {"model": "sim", "messages": [{"role": "user", "content": f"hi {n}"}], "max_tokens": 1}
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Timeout-Ms": "60000"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.headers.get("x-breakwater-worker", "")


def test_a_replica_slow_at_every_answer_is_ejected() -> None:
    fast = start_sim_worker()
    # TTFT ~650 ms, its peer ~2 ms (40 ms on a loaded machine: the gap must outlast 5x that)
    slow = start_sim_worker("--sim-speed", "0.0003")
    gw = start_gateway(
        "--worker", fast.ready["grpc"], "--worker", slow.ready["grpc"], "--routing", "round-robin"
    )
    try:

        def breakers() -> dict[str, dict[str, object]]:
            return {
                w["worker_id"]: w["breaker"] for w in admin_json(gw, "/admin/workers")["workers"]
            }

        wait_for(lambda: len(admin_json(gw, "/admin/workers")["workers"]) == 2, timeout=60)
        sent = [0]

        def ejected() -> bool:
            chat(gw.ready["http"], sent[0])
            sent[0] += 1
            return breakers().get(slow.ready["grpc"], {}).get("times_ejected", 0) == 1

        started = time.monotonic()
        wait_for(ejected, timeout=180, interval=0.0)
        b = breakers()
        assert b[slow.ready["grpc"]]["state"] == "open", b
        assert b[fast.ready["grpc"]].get("times_ejected", 0) == 0, b
        # Ejected after its 20 samples, not before (about 40 requests, half to each; more
        # where a loaded machine slowed the fast one's samples too).
        assert 38 <= sent[0] <= 120, (sent[0], time.monotonic() - started)
        assert {chat(gw.ready["http"], 1000 + i) for i in range(4)} == {fast.ready["grpc"]}
    finally:
        gw.stop()
        fast.stop()
        slow.stop()
