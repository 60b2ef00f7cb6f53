"""A fleet through Redis: several gateways share one pool; workers come and go by heartbeat."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
import redis as redis_sync

from loadtest.fleet import admin_json, free_port, start_sim_worker
from serving.registry_record import RegistryKeys
from tests.gateway.redis_server import RedisServer
from tests.procs import Proc, start_gateway, start_worker, wait_for

TTL_S = 3.0  # the workers' default heartbeat TTL


def workers(gw: Proc) -> dict[str, dict]:
    return {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}


def complete(gw: Proc) -> dict:
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions",
        data=json.dumps({"model": "sim", "prompt": "fleet", "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def sim_worker(redis: RedisServer, worker_id: str) -> Proc:
    return start_worker(
        None,
        "--redis-url",
        redis.url,
        "--worker-id",
        worker_id,
        "--sim-preset",
        "tiny",
        engine="sim",
        name="sim",
    )


def test_gateways_share_a_pool_and_follow_heartbeats(redis: RedisServer) -> None:
    a, b = sim_worker(redis, "w-a"), sim_worker(redis, "w-b")
    gws = [start_gateway("--redis-url", redis.url) for _ in range(2)]
    procs = [a, b, *gws]
    try:
        for gw in gws:
            wait_for(lambda gw=gw: {"w-a", "w-b"} <= set(workers(gw)), timeout=20)
            wait_for(lambda gw=gw: complete(gw)["usage"]["completion_tokens"] == 4, timeout=20)

        # SIGKILL: no goodbye, so only the TTL removes it.
        a.signal(signal.SIGKILL)
        t0 = time.monotonic()
        for gw in gws:
            wait_for(lambda gw=gw: "w-a" not in workers(gw), timeout=20)
        left_after = time.monotonic() - t0
        # by its TTL (and a poll), where nothing else would remove it; the margin is a
        # loaded CI machine's
        assert left_after <= TTL_S + 8.0, f"killed worker stayed {left_after:.1f}s"
        assert complete(gws[0])["usage"]["completion_tokens"] == 4

        # A new worker joins every gateway within a heartbeat and a poll of being ready
        # (about 0.6 s; 3.4 s seen on a loaded machine).
        c = sim_worker(redis, "w-c")
        procs.append(c)
        t0 = time.monotonic()
        for gw in gws:
            wait_for(lambda gw=gw: workers(gw).get("w-c", {}).get("state") == "SERVING", timeout=20)
        joined_after = time.monotonic() - t0
        assert joined_after <= 10.0, f"new worker took {joined_after:.1f}s to join"

        # A drained worker withdraws before it exits, not left for its TTL to remove.
        b.signal(signal.SIGTERM)
        assert b.wait(60) == 0
        keys = RegistryKeys()
        store = redis_sync.Redis.from_url(redis.url)
        try:
            assert not store.exists(keys.worker("w-b"))
            assert b"w-b" not in store.smembers(keys.index)
        finally:
            store.close()
        for gw in gws:
            wait_for(lambda gw=gw: "w-b" not in workers(gw), timeout=10)
    finally:
        for p in procs:
            p.stop()


def test_prefix_aware_gateways_share_routing_through_redis(redis: RedisServer) -> None:
    """A conversation that moves between gateway replicas stays on the replica holding it."""
    a, b = sim_worker(redis, "p-a"), sim_worker(redis, "p-b")
    gws = [start_gateway("--redis-url", redis.url, "--routing", "prefix-aware") for _ in range(2)]
    try:
        for gw in gws:
            wait_for(lambda gw=gw: {"p-a", "p-b"} <= set(workers(gw)), timeout=20)
        # Each gateway loads the tokenizer the workers' cache reports name as they arrive,
        # before any request: without it, it could not read the token-block decisions the
        # other one shares (a flake in CI, where one gateway had it and the other not yet).
        for gw in gws:
            wait_for(lambda gw=gw: admin_json(gw, "/admin/workers")["routing"]["tokenizers"], 60)

        def routing_shared(gw: Proc) -> dict[str, int]:
            return admin_json(gw, "/admin/workers")["process"]["routing_shared"]

        def where(gw: Proc, prompt: str) -> str:
            req = urllib.request.Request(
                gw.ready["http"] + "/v1/completions",
                data=json.dumps({"model": "sim", "prompt": prompt, "max_tokens": 2}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.headers["x-breakwater-worker"]

        for n in range(4):
            prompt = f"conversation {n}: " + "a long shared system prompt. " * 20
            before = routing_shared(gws[1])["received"]
            first = where(gws[0], prompt)
            wait_for(lambda b=before: routing_shared(gws[1])["received"] > b, timeout=30)
            assert [where(gws[1], prompt) for _ in range(4)] == [first] * 4
    finally:
        for p in (*gws, a, b):
            p.stop()


def test_gateways_balance_on_each_others_calls_in_flight(redis: RedisServer) -> None:
    """Each gateway tells the others its calls in flight per worker (through Redis), and
    routing bounds load on the sum; they stop counting once the calls end."""
    slow = [
        start_worker(
            None,
            *("--redis-url", redis.url, "--worker-id", wid, "--sim-preset", "tiny"),
            *("--sim-speed", "0.004"),  # 50 ms a step: 100 tokens take 5 s
            engine="sim",
            name="sim",
        )
        for wid in ("l-a", "l-b")
    ]
    gws = [start_gateway("--redis-url", redis.url) for _ in range(2)]
    try:
        for gw in gws:
            wait_for(lambda gw=gw: {"l-a", "l-b"} <= set(workers(gw)), timeout=20)

        def elsewhere(gw: Proc) -> dict[str, int]:
            return {
                wid: w.get("outstanding_elsewhere", -1)
                for wid, w in workers(gw).items()
                if wid.startswith("l-")
            }

        def stream() -> None:
            req = urllib.request.Request(
                gws[0].ready["http"] + "/v1/completions",
                data=json.dumps(
                    {"model": "sim", "prompt": "load", "max_tokens": 100, "stream": True}
                ).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()

        calls = [threading.Thread(target=stream) for _ in range(6)]
        for t in calls:
            t.start()
        try:
            wait_for(lambda: sum(elsewhere(gws[1]).values()) == 6, timeout=30)

            def own() -> dict[str, int]:
                return {w: workers(gws[0])[w]["outstanding"] for w in ("l-a", "l-b")}

            # what the first gateway has on each (shared every 0.5 s: read until they agree)
            wait_for(lambda: elsewhere(gws[1]) == own(), timeout=10)
            assert elsewhere(gws[0]) == {"l-a": 0, "l-b": 0}  # not its own calls again
        finally:
            for t in calls:
                t.join(120)
        wait_for(lambda: elsewhere(gws[1]) == {"l-a": 0, "l-b": 0}, timeout=30)
    finally:
        for p in (*gws, *slow):
            p.stop()


def post_status(gw: Proc) -> int:
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions",
        data=json.dumps({"model": "sim", "prompt": "outage", "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_a_replica_back_during_a_redis_outage_serves_again() -> None:
    """A failed call marks its replica NOT_SERVING until a probe says otherwise; while Redis
    is out the gateway probes such replicas itself (before, one stayed out of routing for
    the whole outage, though it was up again)."""
    with RedisServer() as redis:  # its own: this test pauses it
        port = free_port()
        args = ("--redis-url", redis.url, "--worker-id", "w-back")
        worker = start_sim_worker(*args, grpc_port=port)
        procs = [worker]
        try:
            gw = start_gateway("--redis-url", redis.url)
            procs.append(gw)
            wait_for(lambda: workers(gw).get("w-back", {}).get("state") == "SERVING", 20)
            assert post_status(gw) == 200
            redis.pause()
            worker.signal(signal.SIGKILL)
            worker.wait(30)
            assert post_status(gw) != 200  # the call fails: the replica is marked
            worker = start_sim_worker(*args, grpc_port=port)
            procs.append(worker)
            wait_for(lambda: post_status(gw) == 200, timeout=30, interval=0.5)
            assert redis.paused  # served again while Redis was still out
        finally:
            redis.resume()
            for p in procs:
                p.stop()
