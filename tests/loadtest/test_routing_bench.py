"""The routing bench in miniature (2 sim workers, a few conversations, seconds of traffic),
and its oracle and workload offline.

No timing assertions: a loaded 2-core machine may slow every request down. The bench stops
every process it started (by PID) before it returns, even when it fails.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from loadtest.chat_workload import BLOCK_SIZE, ChatWorkload, oracle_hits
from loadtest.routing_bench import BenchConfig, chat_closed_loop, main
from loadtest.trivial_server import start_trivial_server

pytestmark = pytest.mark.timeout(300)

FIGURES = ("hit_rate", "ttft_p50_ms", "ttft_p99_ms", "throughput_rps", "load_imbalance")


@pytest.fixture(scope="module")
def workload() -> ChatWorkload:
    return ChatWorkload(seed=1, system_prompts=3)


def test_oracle_counts_whole_shared_blocks() -> None:
    a = list(range(40))  # 2 full blocks + 8 tokens
    b = [*a, *range(100, 110)]  # a then 10 more: a's 2 full blocks hit
    c = [*range(1000, 1033)]
    res = oracle_hits([a, b, c, c])
    # The last c: 2 of its 2 full blocks are cached, and (33 - 1) // 16 = 2 may hit.
    assert res.per_request == (0, 2 * BLOCK_SIZE, 0, 2 * BLOCK_SIZE)
    assert res.prompt_tokens == 40 + 50 + 33 + 33
    assert 0 < res.hit_rate < 1
    # One token is always computed: a prompt of exactly one block cannot hit it.
    assert oracle_hits([a[:16], a[:16]]).per_request == (0, 0)


def test_workload_is_seeded_and_turns_extend_each_other(workload: ChatWorkload) -> None:
    again = ChatWorkload(seed=1, system_prompts=3)
    assert again.messages(5, 1) == workload.messages(5, 1)
    assert workload.messages(5, 0, salt="run 0") != workload.messages(5, 0, salt="run 1")
    u = workload.user(2)
    assert u.turns >= 2
    prev = workload.prompt_ids(workload.messages(2, 0))
    nxt = workload.prompt_ids(workload.messages(2, 1))
    # The earlier prompt's full blocks are a prefix of the next turn's prompt.
    full = len(prev) // BLOCK_SIZE * BLOCK_SIZE
    assert nxt[:full] == prev[:full]
    res = oracle_hits([prev, nxt])
    assert res.per_request[1] == full


def test_tiny_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "--workers=2",
            "--policies=round-robin,least-outstanding,prefix-aware,no-such-policy",
            "--duration=3",
            "--probe-duration=3",
            "--probe-users=2",
            "--system-prompts=4",
            "--kv-tokens=2048",
            "--sim-speed=1",
            "--think=0.2",
            "--max-tokens=8",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["hit_counter_unit"].startswith("tokens")
    assert out["capacity_rps"] > 0 and out["offered_rps"] > 0
    assert 0 <= out["oracle_hit_rate"] <= 1
    pol = out["policies"]
    assert set(pol) == {"round_robin", "least_outstanding", "prefix_aware", "no_such_policy"}
    assert "no-such-policy" in pol["no_such_policy"]["skipped"]
    for name in ("round_robin", "least_outstanding", "prefix_aware"):
        p = pol[name]
        if name == "prefix_aware" and "skipped" in p:
            continue  # a gateway without the policy yet
        assert set(FIGURES) <= set(p), name
        assert p["requests"] > 0 and p["ok"] == p["requests"], (name, p["errors"])
        assert 0 <= p["hit_rate"] <= 1 and 0 <= p["oracle_hit_rate"] <= 1
        assert 0 <= p["hit_rate_per_request"] <= 1
        assert p["ttft_p50_ms"] <= p["ttft_p99_ms"]
        assert p["load_imbalance"] >= 1
        assert sum(p["requests_per_worker"]) == p["ok"]
        # The worker tokenised exactly what the bench counted for the oracle.
        assert p["prompt_tokens"] == p["prompt_tokens_sent"]
    assert out["timings"]["total_s"] > 0


def test_refused_turns_wait_for_retry_after(workload: ChatWorkload) -> None:
    """The capacity probe's users honour Retry-After: a refused turn is not resent at once
    (that made a storm of 503s, thousands a second, on the cores being measured)."""
    refuse = {"x-trivial": json.dumps({"status": 503, "retry_after_s": 0.5})}
    with start_trivial_server(grpc=False) as server:
        sent = asyncio.run(
            chat_closed_loop([server.url], workload, 4, 2.0, BenchConfig(), "t", refuse)
        )
    refused = [s for s in sent if s.record.status == "503"]
    assert refused and all(s.record.retry_after_s == 0.5 for s in refused)
    # 4 users for 2 s, each waiting 0.5 s after a refusal: at most 5 turns each.
    assert len(sent) <= 4 * 5
