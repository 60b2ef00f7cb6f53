"""Operator actions on the fleet through the admin API, against real gateways and workers:
replica weights, upstreams registered and deregistered at run time, shadow traffic, and
tenants' quotas, each followed by every process of the gateway."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.admission.tenants import hash_key
from loadtest.fleet import (
    Proc,
    admin_call,
    admin_json,
    start_gateway,
    start_sim_worker,
    wait_for,
)
from tests.procs import complete


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Proc]]:
    ws = [start_sim_worker() for _ in range(2)]
    yield ws
    for w in ws:
        w.stop()


def metrics_text(gw: Proc) -> str:
    with urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=10) as r:
        return r.read().decode()


def served_by(gw: Proc, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(n):
        code, headers, _ = complete(gw, i)
        seen[headers.get("x-breakwater-worker", str(code))] += 1
    return seen


def test_weights_shift_round_robin_shares_and_zero_takes_nothing(workers: list[Proc]) -> None:
    specs = [x for w in workers for x in ("--worker", w.ready["grpc"])]
    gw = start_gateway(*specs, "--routing", "round-robin")
    try:
        ids = sorted(w["worker_id"] for w in admin_json(gw, "/admin/workers")["workers"])
        wait_for(lambda: len(served_by(gw, 4)) == 2, timeout=60)
        code, body = admin_call(gw, "POST", f"/admin/workers/{ids[0]}/weight", {"weight": 3})
        assert code == 200 and body["weight"] == 3.0
        view = {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}
        assert view[ids[0]]["weight"] == 3.0 and view[ids[1]]["weight"] == 1.0
        assert served_by(gw, 40) == {ids[0]: 30, ids[1]: 10}  # smooth weighted round-robin
        admin_call(gw, "POST", f"/admin/workers/{ids[1]}/weight", {"weight": 0})
        assert set(served_by(gw, 10)) == {ids[0]}
        code, body = admin_call(gw, "POST", f"/admin/workers/{ids[1]}/weight", {"weight": -1})
        assert code == 400 and body["error"]["param"] == "weight"
        code, _ = admin_call(gw, "POST", f"/admin/workers/{ids[1]}/weight", {"weight": 1})
        assert code == 200 and len(served_by(gw, 4)) == 2
        actions = [e["action"] for e in admin_json(gw, "/admin/audit")["entries"]]
        assert actions.count("weight") == 3
    finally:
        gw.stop()


def test_upstreams_register_and_deregister_at_run_time_in_every_process(
    workers: list[Proc],
) -> None:
    gw = start_gateway(
        "--worker", workers[0].ready["grpc"], "--routing", "round-robin", processes=2
    )
    first = workers[0].ready["grpc"]
    try:
        wait_for(lambda: set(served_by(gw, 4)) == {first}, timeout=60)
        code, body = admin_call(gw, "POST", "/admin/upstreams", {"address": "nowhere"})
        assert code == 400 and body["error"]["param"] == "address"
        code, body = admin_call(gw, "POST", "/admin/upstreams", {"address": first})
        assert code == 409 and body["error"]["param"] == "worker_id"
        # a replica the gateway was not started with, under an id of the operator's choosing
        code, body = admin_call(
            gw, "POST", "/admin/upstreams", {"address": workers[1].ready["grpc"], "worker_id": "b"}
        )
        assert code == 200 and body["worker_id"] == "b"
        wait_for(lambda: set(served_by(gw, 8)) == {first, "b"}, timeout=60)
        view = {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}
        assert view["b"]["registered"] == "admin" and view[first]["registered"] == "config"
        # deregistered: the added one, then the configured one (then no one serves: 404)
        wait_for(lambda: 'worker="b"' in metrics_text(gw), timeout=30)
        assert admin_call(gw, "DELETE", "/admin/upstreams/b")[0] == 200
        wait_for(lambda: set(served_by(gw, 8)) == {first}, timeout=30)
        # its series go with it (they stayed, the gone replica still counted as ready)
        wait_for(lambda: 'worker="b"' not in metrics_text(gw), timeout=30)
        assert admin_call(gw, "DELETE", f"/admin/upstreams/{first}")[0] == 200
        wait_for(lambda: set(served_by(gw, 4)) == {"404"}, timeout=30)
        assert admin_call(gw, "DELETE", "/admin/upstreams/b")[0] == 404
        # and registered again
        assert admin_call(gw, "POST", "/admin/upstreams", {"address": first})[0] == 200
        wait_for(lambda: set(served_by(gw, 4)) == {first}, timeout=60)
        # the configured id, deregistered again, stays out (deleting the operator's entry
        # brought the configured replica back) ...
        assert admin_call(gw, "DELETE", f"/admin/upstreams/{first}")[0] == 200
        wait_for(lambda: set(served_by(gw, 4)) == {"404"}, timeout=30)
        # ... and registered at another address, is there (the configured one lost before)
        second = workers[1].ready["grpc"]
        body = {"address": second, "worker_id": first}
        assert admin_call(gw, "POST", "/admin/upstreams", body)[0] == 200

        def address_of(worker_id: str) -> str | None:
            view = {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}
            return view.get(worker_id, {}).get("address")

        wait_for(lambda: address_of(first) == second, timeout=30)
        wait_for(lambda: set(served_by(gw, 4)) == {first}, timeout=60)
        actions = [e["action"] for e in admin_json(gw, "/admin/audit")["entries"]]
        assert actions == [
            "register",
            "deregister",
            "deregister",
            "register",
            "deregister",
            "register",
        ]
    finally:
        gw.stop()


def test_shadow_traffic_is_mirrored_compared_and_never_returned() -> None:
    # v1 behind its OpenAI HTTP port (relayed bytes), v2 over gRPC (deltas)
    v1 = start_sim_worker("--http-port", "0", name="chat-v1")
    v2 = start_sim_worker(name="chat-v2")
    gw = start_gateway("--worker", v1.ready["http"], "--worker", v2.ready["grpc"])
    try:
        wait_for(lambda: complete(gw, 0, "chat-v2")[0] == 200, timeout=60)
        wait_for(lambda: complete(gw, 0, "chat-v1")[0] == 200, timeout=60)
        code, body = admin_call(gw, "PUT", "/admin/shadows/chat-v1", {"target": "chat-v9"})
        assert code == 400 and body["error"]["param"] == "target"
        code, body = admin_call(
            gw, "PUT", "/admin/shadows/chat-v1", {"target": "chat-v2", "percent": 0}
        )
        assert code == 400 and body["error"]["param"] == "percent"
        code, _ = admin_call(
            gw, "PUT", "/admin/shadows/chat-v1", {"target": "chat-v2", "percent": 50}
        )
        assert code == 200
        for i in range(20):
            code, headers, raw = complete(gw, i, "chat-v1", stream=i % 2 == 1)
            assert code == 200 and headers["x-breakwater-worker"] == v1.ready["http"]
            if i % 2 == 0:
                assert json.loads(raw)["model"] == "chat-v1"
            else:
                assert b'"model":"chat-v1"' in raw.replace(b" ", b"") and b"chat-v2" not in raw

        def settled() -> dict[str, Any] | None:
            view = admin_json(gw, "/admin/shadows")
            c = view["counts"]
            done = c.get("matched", 0) + c.get("mismatched", 0) + c.get("failed", 0)
            return view if view["in_flight"] == 0 and done == c.get("mirrored") else None

        view = wait_for(settled, timeout=60)
        counts = view["counts"]
        assert counts["mirrored"] == 10 and counts.get("failed", 0) == 0, counts
        assert 0.0 <= view["mean_similarity"] <= 1.0
        assert view["shadows"] == {"chat-v1": {"target": "chat-v2", "percent": 50.0}}
        metrics = urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=10).read()

        def mirrored_metric() -> bool:
            text = urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=10).read()
            return b'breakwater_shadow_total{outcome="mirrored"} 10.0' in text

        assert metrics and wait_for(mirrored_metric, timeout=30)
        assert admin_call(gw, "DELETE", "/admin/shadows/chat-v1")[0] == 200
        complete(gw, 99, "chat-v1")
        complete(gw, 98, "chat-v1")
        assert admin_json(gw, "/admin/shadows")["counts"]["mirrored"] == 10
    finally:
        gw.stop()
        v1.stop()
        v2.stop()


def test_a_tenant_quota_set_at_run_time_applies_and_reverts(
    workers: list[Proc], tmp_path: Path
) -> None:
    secret = "quota-test-secret"
    config = tmp_path / "admission.toml"
    config.write_text(
        f'key_secret = "{secret}"\n[tenants.alice]\n'
        f'key_digests = ["{hash_key("alice-key", secret)}"]\n'
    )
    gw = start_gateway(
        "--worker", workers[0].ready["grpc"], "--admission-config", str(config), processes=2
    )
    try:
        wait_for(lambda: complete(gw, 0, key="alice-key")[0] == 200, timeout=60)
        tenants = admin_json(gw, "/admin/tenants")["tenants"]
        assert tenants["alice"]["set_by_admin"] is False
        code, body = admin_call(gw, "PUT", "/admin/tenants/alice/quota", {"rps": 1})
        assert code == 400 and "unknown field" in body["error"]["message"]
        assert admin_call(gw, "PUT", "/admin/tenants/bob/quota", {})[0] == 404
        # one request per 1000 s, per process: the gateway's processes share the quota
        quota = {"requests_per_second": 0.001, "request_burst": 2}
        code, _ = admin_call(gw, "PUT", "/admin/tenants/alice/quota", quota)
        assert code == 200

        def limited() -> bool:
            return 429 in {complete(gw, i, key="alice-key")[0] for i in range(6)}

        wait_for(limited, timeout=30)
        tenants = admin_json(gw, "/admin/tenants")["tenants"]
        assert tenants["alice"]["set_by_admin"] is True
        assert tenants["alice"]["quota"]["requests_per_second"] == 0.001
        assert admin_call(gw, "DELETE", "/admin/tenants/alice/quota")[0] == 200
        wait_for(
            lambda: {complete(gw, i, key="alice-key")[0] for i in range(6)} == {200}, timeout=30
        )
    finally:
        gw.stop()
