"""Hostile input to the admin listener, against a real gateway of two processes: every
refusal is an OpenAI JSON error with the right status, never a 500 and a traceback, and a
refused value leaves the gateway following later changes (a revoked key stays revoked)."""

from __future__ import annotations

import http.client
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from loadtest.fleet import ADMIN_TOKEN, Proc, admin_call, admin_json, start_gateway, wait_for
from tests.procs import complete, start_sim_worker

SECRET = "admin-hostile-secret"
MODELS = ("chat-v1", "chat-v2")
ALL = 16
"""Requests per check, each on a new connection: the kernel spreads them over the
gateway's processes (SO_REUSEPORT), so 16 miss one of 2 processes with p = 2^-15."""
HUGE = 10**400
"""Past any double: json.dumps writes it as 400 digits."""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Two processes (so a quota is divided among them, where a huge one overflowed), with a
    tenant to make keys for and two versions of a model to split traffic between."""
    config = tmp_path_factory.mktemp("hostile") / "admission.toml"
    config.write_text(f'key_secret = "{SECRET}"\n[tenants.alice]\n')
    workers = [start_sim_worker(name=m) for m in MODELS]
    try:
        specs = [x for w in workers for x in ("--worker", w.ready["grpc"])]
        gw = start_gateway(*specs, "--admission-config", str(config), processes=2, timeout=120)
        try:
            wait_for(lambda: len(admin_json(gw, "/admin/workers")["workers"]) == 2, timeout=120)
            yield gw
        finally:
            gw.stop()
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def client_key(gateway: Proc) -> str:
    """Alice's key for public calls: once the tests make one, keys are required."""
    code, body = admin_call(gateway, "POST", "/admin/tenants/alice/keys", {})
    assert code == 200, body
    key = str(body["key"])
    wait_for(lambda: {complete(gateway, i, MODELS[0], key=key)[0] for i in range(ALL)} == {200}, 60)
    return key


def raw_call(
    gw: Proc, method: str, path: str, body: bytes = b"", headers: dict[str, bytes] | None = None
) -> tuple[int, Any]:
    """An admin call whose header values go out as the bytes given (urllib would encode
    them): (status, JSON answer); the answer must be JSON whatever the status."""
    url = urlsplit(gw.ready["admin"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.putrequest(method, path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        for name, value in {
            "Authorization": f"Bearer {ADMIN_TOKEN}".encode(),
            **(headers or {}),
        }.items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        raw = resp.read()
        assert resp.headers.get_content_type() == "application/json", raw[:200]
        return resp.status, json.loads(raw)
    finally:
        conn.close()


def refused(answer: tuple[int, Any], status: int, param: str | None = None) -> str:
    """Assert an OpenAI error of `status` (naming `param` when given); its message."""
    code, body = answer
    assert code == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if param is not None:
        assert error["param"] == param, error
    return str(error["message"])


def no_tracebacks(gw: Proc) -> None:
    text = gw.log_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]


def test_a_token_or_operator_name_that_is_not_utf8_is_no_crash(gateway: Proc) -> None:
    """aiohttp hands undecodable header bytes over as surrogates: the token comparison
    raised UnicodeEncodeError (a 500 before auth); an X-Operator so made was saved in the
    audit, then its answer and every later read of the audit were 500s."""
    for token in (b"Bearer \xff\xfe", "Bearer é".encode("latin-1"), b"Bearer " + b"\x80" * 64):
        refused(raw_call(gateway, "GET", "/admin/workers", headers={"Authorization": token}), 401)
    wid = admin_json(gateway, "/admin/workers")["workers"][0]["worker_id"]
    code, body = raw_call(
        gateway,
        "POST",
        f"/admin/workers/{wid}/weight",
        json.dumps({"weight": 1}).encode(),
        {"X-Operator": b"op\xff\xfe"},
    )
    assert code == 200 and body["by"] == "op\ufffd\ufffd", body
    entries = admin_json(gateway, "/admin/audit")["entries"]
    assert entries[-1]["by"] == "op\ufffd\ufffd"
    no_tracebacks(gateway)


def test_huge_numbers_are_400s_and_a_key_revoked_after_them_is_refused(gateway: Proc) -> None:
    """`10**400` overflowed float conversions (500s), and a max_concurrent that large was
    saved, then overflowed dividing it between the two processes, which stopped them from
    following any later change: a key revoked afterwards kept working."""
    keys = "/admin/tenants/alice/keys"
    quota = "/admin/tenants/alice/quota"
    # past a double: the body is not JSON that can be read (orjson refuses it)
    for path, body in (
        (keys, {"expires_in_s": HUGE}),
        (quota, {"requests_per_second": HUGE}),
        (quota, {"max_concurrent": HUGE}),
    ):
        method = "POST" if path == keys else "PUT"
        assert "not valid JSON" in refused(admin_call(gateway, method, path, body), 400)
    # numbers a double holds, out of range: named
    for value in (1e300, 10**12, -1, 0, True, "60", 10 * 366 * 86400):
        refused(admin_call(gateway, "POST", keys, {"expires_in_s": value}), 400, "expires_in_s")
    for fields, name in (
        ({"requests_per_second": 1e300}, "requests_per_second"),
        ({"requests_per_second": 5e-324}, "requests_per_second"),
        ({"tokens_per_second": 1000, "token_burst": 1e16}, "token_burst"),
        ({"max_concurrent": 2**62}, "max_concurrent"),
        ({"max_concurrent": 1_000_001}, "max_concurrent"),
        ({"max_concurrent": 1.5}, "max_concurrent"),
    ):
        message = refused(admin_call(gateway, "PUT", quota, fields), 400, "quota")
        assert f"quota.{name}" in message, message
    assert admin_json(gateway, "/admin/tenants")["tenants"]["alice"]["set_by_admin"] is False
    # the largest values allowed are taken, and divided between the processes
    code, _ = admin_call(gateway, "PUT", quota, {"max_concurrent": 1_000_000})
    assert code == 200
    code, body = admin_call(gateway, "POST", keys, {"expires_in_s": 10 * 365 * 86400})
    assert code == 200, body
    key, key_id = body["key"], body["key_id"]

    def statuses() -> set[int]:
        return {complete(gateway, i, MODELS[0], key=key)[0] for i in range(ALL)}

    wait_for(lambda: statuses() == {200}, timeout=60)  # in both processes
    assert admin_call(gateway, "DELETE", f"{keys}/{key_id}")[0] == 200
    wait_for(lambda: statuses() == {401}, timeout=60)
    assert statuses() == {401}
    assert admin_call(gateway, "DELETE", quota)[0] == 200
    no_tracebacks(gateway)
    assert "applying the admin overrides" not in gateway.log_text()


def test_split_weights_must_be_bounded_numbers(gateway: Proc, client_key: str) -> None:
    """Two weights of 1.7e308 were taken and summed to inf, and the round-robin then sent
    999 of 1000 requests one way; `true` and "1e3" were taken as 1 and 1000."""
    path = "/admin/splits/chat"
    for weights in (
        {"chat-v1": 1.7e308, "chat-v2": 1.7e308},
        {"chat-v1": True, "chat-v2": 1},
        {"chat-v1": "1e3", "chat-v2": 1},
        {"chat-v1": -1, "chat-v2": 1},
        {"chat-v1": 1001, "chat-v2": 1},
        {"chat-v1": None, "chat-v2": 1},
        {"chat-v1": 0, "chat-v2": 0},
        {},
        [1, 2],
    ):
        refused(admin_call(gateway, "PUT", path, {"weights": weights}), 400, "weights")
    refused(admin_call(gateway, "PUT", path, [{"weights": {"chat-v1": 1}}]), 400, "weights")
    assert admin_json(gateway, "/admin/splits") == {}
    # the largest weights allowed still split evenly
    code, _ = admin_call(gateway, "PUT", path, {"weights": {"chat-v1": 1000, "chat-v2": 1000}})
    assert code == 200
    try:
        # the split reaches the other process within its poll: "chat" is a 404 there until
        wait_for(
            lambda: all(complete(gateway, i, "chat", key=client_key)[0] == 200 for i in range(ALL)),
            timeout=60,
        )
        served: Counter[str] = Counter()
        for _ in range(4):
            for i in range(ALL):
                code, _, raw = complete(gateway, i, "chat", key=client_key)
                assert code == 200, raw[:300]
                served[json.loads(raw)["model"]] += 1
        # each process alternates between the versions: within one request each of even
        assert set(served) == set(MODELS), served
        assert abs(served["chat-v1"] - served["chat-v2"]) <= 2, served
    finally:
        assert admin_call(gateway, "DELETE", path)[0] == 200
    no_tracebacks(gateway)


def test_bodies_too_large_too_deep_or_not_json_are_json_errors(gateway: Proc) -> None:
    """A body nested 100000 deep was a RecursionError (500); one over 1 MiB was aiohttp's
    plain-text 413, turned into a 400 by the split handler; neither is any longer."""
    wid = admin_json(gateway, "/admin/workers")["workers"][0]["worker_id"]
    deep = b"[" * 100_000 + b"]" * 100_000
    big = b'{"weights": {"chat-v1": 1}, "pad": "' + b"x" * (1 << 20) + b'"}'
    targets = (
        ("PUT", "/admin/splits/chat"),
        ("POST", f"/admin/workers/{wid}/weight"),
        ("PUT", "/admin/tenants/alice/quota"),
        ("POST", "/admin/tenants/alice/keys"),
        ("POST", "/admin/upstreams"),
        ("PUT", "/admin/shadows/chat-v1"),
    )
    for method, path in targets:
        assert "not valid JSON" in refused(raw_call(gateway, method, path, deep), 400)
        for not_json in (b"{", b'{"weights": {"\\ud800": 1}}', b"NaN", b"\xff"):
            assert "not valid JSON" in refused(raw_call(gateway, method, path, not_json), 400)
        code, body = raw_call(gateway, method, path, big)
        assert code == 413 and body["error"]["code"] == "request_too_large", body
    # nesting up to 1024 is JSON, just not what the endpoint takes
    nested = b'{"weights": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    refused(raw_call(gateway, "PUT", "/admin/splits/chat", nested), 400, "weights")
    refused(raw_call(gateway, "GET", "/admin/nowhere"), 404)
    refused(raw_call(gateway, "POST", "/admin/splits"), 405)
    assert admin_json(gateway, "/admin/splits") == {}
    no_tracebacks(gateway)


def test_a_change_the_store_cannot_save_is_the_servers_503() -> None:
    """Redis unreachable: the change is refused as the server's failure (retry later), where
    it was labelled an error of the operator's request (invalid_request_error)."""
    worker = "127.0.0.1:1"  # listed, never reached: the admin API knows it all the same
    gw = start_gateway("--worker", worker, "--redis-url", "redis://127.0.0.1:1/0")
    try:
        code, body = admin_call(gw, "POST", f"/admin/workers/{worker}/drain", {})
        assert code == 503, body
        assert body["error"]["type"] == "service_unavailable", body
        assert body["error"]["code"] == "not_saved" and "not saved" in body["error"]["message"]
        # and the unreachable worker is in the log, not only in /readyz and the admin API
        wait_for(lambda: f"worker {worker}: STARTING -> NOT_SERVING" in gw.log_text(), timeout=30)
    finally:
        gw.stop()
