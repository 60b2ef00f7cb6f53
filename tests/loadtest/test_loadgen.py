"""The load generator against the trivial server (a real process on 127.0.0.1).

Assertions are on counts, statuses and generous ratios, never on tight timings: a loaded
2-core machine may slow every request down, which must not fail these tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.loadgen import (
    RequestRecord,
    RequestSpec,
    Schedule,
    Target,
    measure_limit,
    run_closed_loop,
    run_open_loop,
    simple_requests,
)
from loadtest.report import SLO, format_table, percentile, plot_goodput, plot_latency, summarize
from loadtest.trivial_server import RunningServer, start_trivial_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_trivial_server(grpc=True) as s:
        yield s


def _post(url: str) -> Any:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def shaped(**behaviour: Any) -> RequestSpec:
    """A request the trivial server answers as `behaviour` says (see its docstring)."""
    return RequestSpec(max_tokens=4, headers={"x-trivial": json.dumps(behaviour)})


def max_overlap(records: list[RequestRecord]) -> int:
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records])
    depth = best = 0
    for _, d in events:  # ends sort before starts at equal times
        depth += d
        best = max(best, depth)
    return best


# -- schedules -------------------------------------------------------------------------------


def test_schedule_steps_and_bursts_are_exact_when_evenly_spaced() -> None:
    s = Schedule(rate=10, steps=((1.0, 50), (2.0, 0)), bursts=((2.5, 7),), poisson=False)
    arrivals = s.arrivals(3.0)
    assert sum(t < 1.0 for t in arrivals) == 9  # 0.1 .. 0.9
    assert sum(1.0 <= t < 2.0 for t in arrivals) == 49
    assert sum(t >= 2.0 for t in arrivals) == 7 and arrivals.count(2.5) == 7
    assert arrivals == sorted(arrivals)


def test_poisson_schedule_rate_and_seed() -> None:
    a = Schedule(rate=200, seed=3).arrivals(10.0)
    assert 0.9 * 2000 < len(a) < 1.1 * 2000
    assert a == Schedule(rate=200, seed=3).arrivals(10.0)
    assert a != Schedule(rate=200, seed=4).arrivals(10.0)
    assert all(0 <= t < 10.0 for t in a)


# -- open and closed loop over HTTP ----------------------------------------------------------


def test_open_loop_sends_rate_times_duration(server: RunningServer) -> None:
    rate, duration = 40.0, 1.5
    schedule = Schedule(rate=rate, seed=1)
    before = _get(server.url + "/stats")["requests"]
    records = asyncio.run(
        run_open_loop(Target(url=server.url, model="m"), schedule, None, duration)
    )
    assert len(records) == len(schedule.arrivals(duration))
    assert 0.5 * rate * duration <= len(records) <= 1.5 * rate * duration
    assert _get(server.url + "/stats")["requests"] - before == len(records)
    for r in records:
        assert r.ok, r
        assert r.ttft_s is not None and r.e2e_s is not None and 0 < r.ttft_s <= r.e2e_s
        assert r.output_tokens == 4 and r.chunks == 6 and r.attempts == 1
        assert r.tpot_s is not None and r.tpot_s >= 0
    s = summarize(records, duration_s=duration)
    assert s["ok"] == len(records) and s["goodput_ratio"] == 1.0 and s["errors"] == {}
    assert s["goodput_rps"] <= s["throughput_rps"] <= s["offered_rps"]
    assert s["send_lateness_ms"]["p50"] < 200  # keeps its schedule, generously
    assert "ttft_ms" in format_table(s)


def test_open_loop_is_bounded_by_max_requests(server: RunningServer) -> None:
    t0 = time.monotonic()
    records = asyncio.run(
        run_open_loop(Target(url=server.url, model="m"), Schedule(rate=500), None, 30.0, 25)
    )
    assert len(records) == 25 and all(r.ok for r in records)
    assert time.monotonic() - t0 < 15  # stopped at the count, not at the 30 s duration


def test_burst_sends_all_at_once(server: RunningServer) -> None:
    _post(server.url + "/reset")
    records = asyncio.run(
        run_open_loop(
            Target(url=server.url, model="m"),
            Schedule(bursts=((0.1, 30),)),
            lambda i: shaped(chunks=4, delay_s=0.1),
            0.5,
        )
    )
    assert len(records) == 30 and all(r.ok for r in records)
    assert all(r.scheduled_s == 0.1 for r in records)
    # 30 requests of >= 0.4 s each, sent together: most of them overlap at the server.
    assert _get(server.url + "/stats")["max_in_flight"] >= 15
    assert max_overlap(records) >= 15


def test_closed_loop_keeps_n_in_flight(server: RunningServer) -> None:
    users = 5
    _post(server.url + "/reset")
    records = asyncio.run(
        run_closed_loop(
            Target(url=server.url, model="m"),
            users,
            lambda i: shaped(chunks=3, delay_s=0.03),
            duration_s=1.0,
        )
    )
    assert all(r.ok for r in records) and len(records) >= users
    assert {r.user for r in records} == set(range(users))
    assert _get(server.url + "/stats")["max_in_flight"] == users
    assert max_overlap(records) <= users
    for u in range(users):  # each user waits for its answer before the next request
        mine = [r for r in records if r.user == u]
        assert all(b.start_s >= a.end_s for a, b in itertools.pairwise(mine))


def test_closed_loop_think_time_and_max_requests(server: RunningServer) -> None:
    records = asyncio.run(
        run_closed_loop(
            Target(url=server.url, model="m"), 2, None, duration_s=0.6, think_time_s=0.2
        )
    )
    assert 2 <= len(records) <= 2 * 4  # at most one request per 0.2 s per user
    records = asyncio.run(
        run_closed_loop(Target(url=server.url, model="m"), 4, None, 30.0, max_requests=10)
    )
    assert len(records) == 10


def test_chat_role_chunk_is_not_a_token(server: RunningServer) -> None:
    records = asyncio.run(
        run_closed_loop(
            Target(url=server.url, model="m", chat=True),
            1,
            lambda i: shaped(chunks=5, delay_s=0.05),
            30.0,
            max_requests=2,
        )
    )
    for r in records:
        assert r.ok and r.output_tokens == 5
        # The role-only chunk comes at once; the first text only after delay_s.
        assert r.ttft_s is not None and r.ttft_s >= 0.04


# -- errors ----------------------------------------------------------------------------------


def _mixed(i: int) -> RequestSpec:
    return [
        shaped(status=429, retry_after_s=1.5),
        shaped(status=503, retry_after_s=0.25),
        shaped(chunks=4, error_after=2),
        shaped(chunks=4, attempts=2),
    ][i % 4]


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_errors_are_recorded_with_codes(server: RunningServer, transport: str) -> None:
    target = (
        Target(url=server.url, model="m")
        if transport == "http"
        else Target(grpc=server.grpc, model="m")
    )
    records = asyncio.run(run_closed_loop(target, 1, _mixed, 30.0, max_requests=8))
    assert len(records) == 8
    q429, q503, broken, retried = (records[i::4] for i in range(4))
    for r in q429:
        assert r.rejected and r.retry_after_s == 1.5 and r.ttft_s is None
        assert not r.aborted_after_first_token
    for r in q503:
        assert r.rejected and r.retry_after_s == 0.25
    for r in broken:
        assert r.status == "stream-error" and r.aborted_after_first_token
        assert r.ttft_s is not None and r.output_tokens == 2
    for r in retried:
        assert r.ok and r.attempts == 2 and r.output_tokens == 4
    s = summarize(records)
    if transport == "http":
        assert q429[0].status == "429" and q503[0].status == "503"
        assert s["errors"] == {
            "429:trivial_429": 2,
            "503:trivial_503": 2,
            "stream-error:trivial": 2,
        }
    else:
        assert q429[0].status == "RESOURCE_EXHAUSTED" and q503[0].status == "UNAVAILABLE"
        assert s["errors"] == {
            "RESOURCE_EXHAUSTED": 2,
            "UNAVAILABLE": 2,
            "stream-error:trivial failure": 2,
        }
    assert s["rejected"] == 4 and s["aborted_after_first_token"] == 2 and s["ok"] == 2
    assert s["reject_ms"]["p50"] is not None and 0 < s["reject_ms"]["p50"] < 5000
    assert s["attempts"]["total"] == 10 and s["attempts"]["max"] == 2


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_grpc_and_http_ok_stream(server: RunningServer, transport: str) -> None:
    target = (
        Target(url=server.url, model="m")
        if transport == "http"
        else Target(grpc=server.grpc, model="m")
    )
    records = asyncio.run(
        run_open_loop(target, Schedule(rate=50, poisson=False), simple_requests(4), 0.4)
    )
    assert len(records) == 19
    for r in records:
        assert r.ok and r.output_tokens == 4 and r.ttft_s is not None and r.tpot_s is not None


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_per_request_deadline(server: RunningServer, transport: str) -> None:
    base = (
        Target(url=server.url, model="m")
        if transport == "http"
        else Target(grpc=server.grpc, model="m")
    )
    target = Target(url=base.url, grpc=base.grpc, model="m", timeout_s=0.3)
    t0 = time.monotonic()
    records = asyncio.run(
        run_closed_loop(target, 1, lambda i: shaped(chunks=2, delay_s=5.0), 30.0, max_requests=1)
    )
    assert time.monotonic() - t0 < 4.0
    (r,) = records
    assert r.status == ("timeout" if transport == "http" else "DEADLINE_EXCEEDED")
    assert r.ttft_s is None and not r.aborted_after_first_token


def test_connection_refused_is_recorded() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records = asyncio.run(
        run_closed_loop(
            Target(url=f"http://127.0.0.1:{port}", model="m", timeout_s=5), 1, None, 30.0, 2
        )
    )
    assert [r.status for r in records] == ["connection", "connection"]
    assert summarize(records)["errors"] == {"connection:ClientConnectorError": 2}


# -- report ----------------------------------------------------------------------------------


def _synthetic() -> list[RequestRecord]:
    recs = []
    for i in range(100):  # ttft 1..100 ms, e2e 10x, 11 tokens, one start every 10 ms
        ttft = (i + 1) / 1000
        recs.append(
            RequestRecord(
                index=i,
                scheduled_s=i / 100,
                start_s=i / 100,
                ttft_s=ttft,
                e2e_s=10 * ttft,
                tpot_s=9 * ttft / 10,
                output_tokens=11,
            )
        )
    for i, status in enumerate(["429", "429", "503", "stream-error"]):
        recs.append(
            RequestRecord(
                index=100 + i,
                scheduled_s=0.5,
                start_s=0.5,
                status=status,
                e2e_s=(i + 1) / 1000,
                retry_after_s=1.0 if status != "stream-error" else None,
                error_code="x" if status == "stream-error" else None,
                ttft_s=0.0005 if status == "stream-error" else None,
                aborted_after_first_token=status == "stream-error",
            )
        )
    return recs


def test_summarize_percentiles_are_exact() -> None:
    s = summarize(_synthetic(), SLO(ttft_ms=50, e2e_ms=10_000), duration_s=1.0)
    assert s["ttft_ms"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0}
    assert s["e2e_ms"] == {"p50": 500.0, "p90": 900.0, "p99": 990.0}
    assert s["tpot_ms"] == {"p50": 45.0, "p90": 81.0, "p99": 89.1}
    assert s["reject_ms"]["p50"] == 2.0  # of 1, 2, 3 ms
    assert s["requests"] == 104 and s["ok"] == 100 and s["rejected"] == 3
    assert s["aborted_after_first_token"] == 1
    assert s["errors"] == {"429": 2, "503": 1, "stream-error:x": 1}
    # The last answer ends at 0.99 + 1.0 s: the window is 1.99 s.
    assert s["duration_s"] == 1.99
    assert s["goodput_ratio"] == round(50 / 104, 4)
    assert s["goodput_rps"] == round(50 / 1.99, 3)
    assert s["throughput_rps"] == round(100 / 1.99, 3)
    assert s["output_tok_s"] == round(1100 / 1.99, 3)
    assert s["offered_rps"] == 104.0
    json.dumps(s)


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0], 50) == 1.0 and percentile([1.0, 2.0], 51) == 2.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0 and percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile([float(v) for v in range(1, 1001)], 99.9) == 999.0


def test_plots_write_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    records = _synthetic()
    plot_latency(records, tmp_path / "lat.png")
    runs = [summarize(records[:n], duration_s=1.0) for n in (20, 60, 104)]
    plot_goodput(runs, tmp_path / "goodput.png")
    for name in ("lat.png", "goodput.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


# -- CLI and self-test -----------------------------------------------------------------------


def test_cli_prints_table_then_one_json_object(server: RunningServer) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.loadgen",
            "--url",
            server.url,
            "--model",
            "m",
            "--rate",
            "30",
            "--duration",
            "0.5",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "ttft_ms" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["requests"] > 0 and last["ok"] == last["requests"] and last["rate"] == 30


def test_measure_limit_runs_levels(server: RunningServer) -> None:
    # Criteria no loaded CI machine can miss: the climb itself is under test, not its speed.
    lenient = {"max_lateness_p99_ms": 1e9, "max_e2e_p99_ms": 1e9}
    res = asyncio.run(measure_limit(server.url, rates=(20, 40), step_s=0.4, chunks=4, **lenient))
    assert [lv["offered_rps"] for lv in res["levels"]] == [20, 40]
    assert all(lv["sent"] > 0 and lv["passed"] for lv in res["levels"])
    assert res["limit_requests_per_s"] > 0


def test_measure_limit_stops_at_the_first_level_that_fails(server: RunningServer) -> None:
    res = asyncio.run(
        measure_limit(server.url, rates=(20, 40), step_s=0.4, chunks=4, max_lateness_p99_ms=-1)
    )
    assert [lv["offered_rps"] for lv in res["levels"]] == [20]
    assert not res["levels"][0]["passed"] and res["limit_requests_per_s"] == 0.0
