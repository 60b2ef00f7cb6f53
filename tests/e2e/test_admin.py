"""The admin listener: token-guarded, off the public port, and its actions followed by every
process of a gateway and by other gateways sharing a Redis."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.admission.tenants import hash_key, new_api_key
from loadtest.fleet import (
    ADMIN_TOKEN,
    Proc,
    admin_call,
    admin_json,
    start_gateway,
    start_sim_worker,
    wait_for,
)
from tests.gateway.redis_server import RedisServer

SECRET = "admin-test-secret"


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Proc]]:
    ws = [start_sim_worker() for _ in range(2)]
    yield ws
    for w in ws:
        w.stop()


def status_of(url: str, token: str | None = None, method: str = "GET") -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(
        url, method=method, headers=headers, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode()


def served_by(gw: Proc, n: int, key: str | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(n):
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(
            gw.ready["http"] + "/v1/completions",
            data=json.dumps({"model": "sim", "prompt": f"p{i}", "max_tokens": 2}).encode(),
            headers=headers,
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            seen[r.headers["x-breakwater-worker"]] += 1
    return seen


def refused(gw: Proc, key: str) -> bool:
    """A completion with `key` gets a 401."""
    try:
        served_by(gw, 1, key)
    except urllib.error.HTTPError as e:
        return e.code == 401
    return False


def test_the_admin_api_needs_the_admin_token_and_refuses_tenant_keys(
    workers: list[Proc], tmp_path: Path
) -> None:
    config = tmp_path / "admission.toml"
    config.write_text(
        f'key_secret = "{SECRET}"\n[tenants.alice]\n'
        f'key_digests = ["{hash_key("alice-key", SECRET)}"]\n'
    )
    gw = start_gateway("--worker", workers[0].ready["grpc"], "--admission-config", str(config))
    try:
        admin = gw.ready["admin"] + "/admin/workers"
        assert admin.split("/admin")[0] != gw.ready["http"]  # a listener of its own
        assert status_of(admin)[0] == 401
        assert status_of(admin, "not-the-token")[0] == 401
        code, body = status_of(admin, "alice-key")
        assert code == 403 and body["error"]["type"] == "permission_error"
        code, body = status_of(admin, ADMIN_TOKEN)
        assert code == 200 and body["workers"]
        # the public port has no admin routes, whatever key is presented
        assert status_of(gw.ready["http"] + "/admin/workers", ADMIN_TOKEN)[0] == 404
        assert status_of(gw.ready["http"] + "/admin/workers", "alice-key")[0] == 404
        wid = body["workers"][0]["worker_id"]
        drain = f"{gw.ready['admin']}/admin/workers/{wid}/drain"
        assert status_of(drain, "alice-key", "POST")[0] == 403
        assert (
            status_of(f"{gw.ready['admin']}/admin/workers/nope/drain", ADMIN_TOKEN, "POST")[0]
            == 404
        )
        assert (
            status_of(f"{gw.ready['admin']}/admin/workers/{wid}/explode", ADMIN_TOKEN, "POST")[0]
            == 404
        )
    finally:
        gw.stop()


def test_drain_and_eject_apply_to_every_process_and_are_audited(workers: list[Proc]) -> None:
    gw = start_gateway(*[x for w in workers for x in ("--worker", w.ready["grpc"])], processes=2)
    try:
        ids = sorted(w["worker_id"] for w in admin_json(gw, "/admin/workers")["workers"])
        wait_for(lambda: len(served_by(gw, 8)) == 2, timeout=60)
        done = admin_json(gw, f"/admin/workers/{ids[0]}/drain", "POST")
        assert done["state"] == "drained" and done["action"] == "drain"
        view = {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}
        assert view[ids[0]]["admin"] == "drained" and view[ids[1]]["admin"] is None
        # every process follows within its poll; then no new request reaches the drained one
        wait_for(lambda: set(served_by(gw, 10)) == {ids[1]}, timeout=30)
        assert set(served_by(gw, 20)) == {ids[1]}
        admin_json(gw, f"/admin/workers/{ids[0]}/undrain", "POST")
        wait_for(lambda: ids[0] in served_by(gw, 10), timeout=30)
        admin_json(gw, f"/admin/workers/{ids[1]}/eject", "POST")
        wait_for(lambda: set(served_by(gw, 10)) == {ids[0]}, timeout=30)
        admin_json(gw, f"/admin/workers/{ids[1]}/readmit", "POST")
        entries = admin_json(gw, "/admin/audit")["entries"]
        assert [(e["action"], e["worker"]) for e in entries] == [
            ("drain", ids[0]),
            ("undrain", ids[0]),
            ("eject", ids[1]),
            ("readmit", ids[1]),
        ]
    finally:
        gw.stop()


def test_a_drain_on_one_gateway_reaches_another_through_redis(workers: list[Proc]) -> None:
    with RedisServer() as redis:
        specs = [x for w in workers for x in ("--worker", w.ready["grpc"])]
        a = start_gateway(*specs, "--redis-url", redis.url)
        b = start_gateway(*specs, "--redis-url", redis.url)
        try:
            ids = sorted(w["worker_id"] for w in admin_json(a, "/admin/workers")["workers"])
            wait_for(lambda: len(served_by(b, 8)) == 2, timeout=60)
            admin_json(a, f"/admin/workers/{ids[1]}/drain", "POST")

            def b_sees_it() -> bool:
                view = {w["worker_id"]: w for w in admin_json(b, "/admin/workers")["workers"]}
                return view[ids[1]]["admin"] == "drained"

            wait_for(b_sees_it, timeout=30)
            assert set(served_by(b, 20)) == {ids[0]}
            assert admin_json(b, "/admin/audit")["entries"][-1]["action"] == "drain"
        finally:
            a.stop()
            b.stop()


def test_a_redis_restart_does_not_undo_drains_or_revocations(
    workers: list[Proc], tmp_path: Path
) -> None:
    """Redis restarts empty (killed and started again on the same port, no persistence): the
    drained replica stays drained and the revoked config key stays revoked, and the
    gateway writes them back into Redis."""
    live, live_id, live_digest = new_api_key(SECRET)
    gone, gone_id, gone_digest = new_api_key(SECRET)
    config = tmp_path / "admission.toml"
    config.write_text(
        f'key_secret = "{SECRET}"\n[tenants.alice]\n'
        f'keys = [{{id = "{live_id}", digest = "{live_digest}"}}, '
        f'{{id = "{gone_id}", digest = "{gone_digest}"}}]\n'
    )
    with RedisServer() as redis:
        specs = [x for w in workers for x in ("--worker", w.ready["grpc"])]
        gw = start_gateway(*specs, "--redis-url", redis.url, "--admission-config", str(config))
        try:
            ids = sorted(w["worker_id"] for w in admin_json(gw, "/admin/workers")["workers"])
            wait_for(lambda: len(served_by(gw, 8, live)) == 2, timeout=60)
            admin_json(gw, f"/admin/workers/{ids[0]}/drain", "POST")
            admin_json(gw, f"/admin/tenants/alice/keys/{gone_id}", "DELETE")
            wait_for(lambda: set(served_by(gw, 10, live)) == {ids[1]}, timeout=30)
            assert refused(gw, gone)

            redis.restart()
            end = time.monotonic() + 3.0  # several polls (0.5 s each)
            while time.monotonic() < end:
                assert set(served_by(gw, 4, live)) == {ids[1]}
                assert refused(gw, gone)
            view = {w["worker_id"]: w for w in admin_json(gw, "/admin/workers")["workers"]}
            assert view[ids[0]]["admin"] == "drained"

            def written_back() -> bool:
                import redis as redis_py

                client = redis_py.Redis.from_url(redis.url, decode_responses=True)
                try:
                    data = client.hgetall("breakwater:admin:overrides")
                finally:
                    client.close()
                return data.get(f"worker:{ids[0]}") == "drained" and bool(
                    json.loads(data.get(f"key:{gone_id}", "{}")).get("revoked")
                )

            wait_for(written_back, timeout=30)
        finally:
            gw.stop()


def test_canary_split_holds_and_rollback_is_immediate() -> None:
    from concurrent.futures import ThreadPoolExecutor

    v1 = start_sim_worker(name="chat-v1")
    v2 = start_sim_worker(name="chat-v2")
    gw = start_gateway("--worker", v1.ready["grpc"], "--worker", v2.ready["grpc"])
    try:
        wait_for(lambda: len(admin_json(gw, "/admin/workers")["workers"]) == 2, timeout=60)

        def model_of(i: int) -> str:
            req = urllib.request.Request(
                gw.ready["http"] + "/v1/completions",
                data=json.dumps({"model": "chat", "prompt": f"q{i}", "max_tokens": 1}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())["model"]

        # no split yet: "chat" is no model anyone serves
        assert status_of(gw.ready["http"] + "/v1/models")[1]["data"]
        code, body = admin_call(gw, "PUT", "/admin/splits/chat", {"weights": {"chat-v9": 1}})
        assert code == 400 and body["error"]["param"] == "weights"
        code, _ = admin_call(
            gw, "PUT", "/admin/splits/chat", {"weights": {"chat-v1": 90, "chat-v2": 10}}
        )
        assert code == 200
        with ThreadPoolExecutor(8) as pool:
            served = Counter(pool.map(model_of, range(2000)))
        assert set(served) == {"chat-v1", "chat-v2"}
        assert abs(served["chat-v2"] / 2000 - 0.10) <= 0.02, served
        # blue-green: everything to v2, then roll back; each takes effect on the next request
        admin_call(gw, "PUT", "/admin/splits/chat", {"weights": {"chat-v2": 100}})
        assert {model_of(i) for i in range(5)} == {"chat-v2"}
        code, _ = admin_call(gw, "DELETE", "/admin/splits/chat")
        assert code == 200
        admin_call(gw, "PUT", "/admin/splits/chat", {"weights": {"chat-v1": 1}})
        assert model_of(0) == "chat-v1"
        actions = [e["action"] for e in admin_json(gw, "/admin/audit")["entries"]]
        assert actions.count("split") == 4
    finally:
        gw.stop()
        v1.stop()
        v2.stop()
