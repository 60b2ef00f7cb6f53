"""API keys made, rotated and revoked through the admin API, against real gateway and sim
worker processes: a revoked key is refused by every process of the gateway within a
second, rotation never interrupts a client, and no key reaches the logs or the traces."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.admission.tenants import hash_key
from loadtest.fleet import Proc, admin_call, admin_json, start_gateway, start_sim_worker, wait_for
from tests.procs import complete

SECRET = "api-keys-e2e-secret"
LEGACY_KEY = "bob-old-style-key"
ALL = 16
"""Requests per check, each on a new connection: the kernel spreads them over the
gateway's processes (SO_REUSEPORT), so 16 miss one of 2 processes with p = 2^-15."""


def write_config(path: Path) -> Path:
    # bob's older key makes keys required from the start; alice has none until the admin
    # API makes one
    path.write_text(
        f'key_secret = "{SECRET}"\n[tenants.alice]\n'
        f'[tenants.bob]\nkey_digests = ["{hash_key(LEGACY_KEY, SECRET)}"]\n'
    )
    return path


@pytest.fixture(scope="module")
def worker() -> Iterator[Proc]:
    w = start_sim_worker()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def gateway(worker: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    config = write_config(tmp_path_factory.mktemp("keys") / "admission.toml")
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--admission-config", str(config), processes=2
    )
    yield gw
    gw.stop()


def statuses(gw: Proc, key: str | None, n: int = ALL) -> set[int]:
    return {complete(gw, i, key=key)[0] for i in range(n)}


def new_key(gw: Proc, tenant: str = "alice") -> tuple[str, str]:
    code, body = admin_call(gw, "POST", f"/admin/tenants/{tenant}/keys", {})
    assert code == 200, body
    return body["key"], body["key_id"]


def test_a_key_made_by_the_admin_works_then_revoked_is_refused_everywhere_within_a_poll(
    gateway: Proc,
) -> None:
    wait_for(lambda: statuses(gateway, LEGACY_KEY) == {200}, timeout=60)  # older keys work
    assert statuses(gateway, None, 4) == {401}
    key, key_id = new_key(gateway)
    wait_for(lambda: statuses(gateway, key) == {200}, timeout=5)  # in both processes
    listed = admin_json(gateway, "/admin/tenants/alice/keys")["keys"]
    assert [(k["id"], k["revoked"]) for k in listed] == [(key_id, False)]

    started = time.monotonic()
    code, _ = admin_call(gateway, "DELETE", f"/admin/tenants/alice/keys/{key_id}")
    assert code == 200
    # Siblings reread the overrides every 0.5 s; the rest of the bound is a loaded CI
    # machine's scheduling and the asking itself, so the test does not fail on a slow box.
    wait_for(lambda: statuses(gateway, key) == {401}, timeout=3.0, interval=0.01)
    assert time.monotonic() - started < 3.0
    code, _, body = complete(gateway, 0, key=key)
    error = json.loads(body)["error"]
    assert code == 401 and error["code"] == "invalid_api_key"
    assert statuses(gateway, key, 2 * ALL) == {401}  # and it stays so in every process
    listed = admin_json(gateway, "/admin/tenants/alice/keys")["keys"]
    assert [(k["id"], k["revoked"]) for k in listed] == [(key_id, True)]


def test_rotation_keeps_a_client_served_throughout(gateway: Proc) -> None:
    old, old_id = new_key(gateway)
    wait_for(lambda: statuses(gateway, old) == {200}, timeout=5)
    current = [old]
    seen: list[tuple[str, int]] = []
    stop = threading.Event()

    def client() -> None:
        i = 0
        while not stop.is_set():
            key = current[0]
            seen.append((key, complete(gateway, i, key=key)[0]))
            i += 1

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        new, _ = new_key(gateway)
        wait_for(lambda: statuses(gateway, new) == {200}, timeout=5)
        assert statuses(gateway, old) == {200}  # both keys work in between
        switched = len(seen)
        current[0] = new
        # the client's requests with the old key have all ended once one with the new has
        wait_for(lambda: any(k == new for k, _ in seen[switched:]), timeout=10)
        code, _ = admin_call(gateway, "DELETE", f"/admin/tenants/alice/keys/{old_id}")
        assert code == 200
        wait_for(lambda: statuses(gateway, old) == {401}, timeout=1.0, interval=0.01)
        mark = len(seen)
        wait_for(lambda: len(seen) > mark + 5, timeout=10)
    finally:
        stop.set()
        thread.join(30)
    assert len({k for k, _ in seen}) == 2 and len(seen) > 10
    assert {code for _, code in seen} == {200}, [c for _, c in seen if c != 200]


def test_no_key_reaches_the_request_log_traces_audit_or_metrics(
    worker: Proc, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "admission.toml")
    trace = tmp_path / "gateway-spans.jsonl"
    gw = start_gateway(
        "--worker", worker.ready["grpc"], "--admission-config", str(config),
        "--request-log", "--trace-exporter", f"file:{trace}",
    )  # fmt: skip
    try:
        key, key_id = new_key(gw)
        revoked, revoked_id = new_key(gw)
        assert admin_call(gw, "DELETE", f"/admin/tenants/alice/keys/{revoked_id}")[0] == 200
        assert complete(gw, 1, key=key)[0] == 200
        assert complete(gw, 2, key=key, stream=True)[0] == 200
        wrong = f"bw_{key_id}.{'x' * 43}"
        unknown = "bw_" + "U" * 12 + "." + key.partition(".")[2]
        refusals = [complete(gw, 3, key=k) for k in (wrong, unknown, revoked)]
        assert {code for code, _, _ in refusals} == {401}
        assert len({body for _, _, body in refusals}) == 1  # the same answer for each
        assert complete(gw, 4, key=LEGACY_KEY)[0] == 200
        # a refusal once the tenant is known names it (the log said null)
        quota = {"requests_per_second": 0.001, "request_burst": 1}
        assert admin_call(gw, "PUT", "/admin/tenants/alice/quota", quota)[0] == 200
        assert 429 in [complete(gw, 5 + i, key=key)[0] for i in range(3)]

        def logged() -> str:
            text = gw.log_text()
            return text if text.count("breakwater.requests: ") >= 9 else ""

        log = wait_for(logged, timeout=30)
        spans = wait_for(lambda: trace.exists() and trace.read_text().count("\n") >= 3, 30)
        assert spans
        records = [
            json.loads(line.split("breakwater.requests: ", 1)[1])
            for line in log.splitlines()
            if "breakwater.requests: " in line
        ]
        assert {r["tenant"] for r in records if r["status"] == 200} == {"alice", "bob"}
        # each line names the key that proved it (by id; a digest-only key has none)
        assert {r["key_id"] for r in records if r["status"] == 200} == {key_id, None}
        assert all(r["key_id"] is None for r in records if r["status"] == 401)
        limited = [r for r in records if r["status"] == 429]
        assert limited and all((r["tenant"], r["key_id"]) == ("alice", key_id) for r in limited)
        with urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        texts = {
            "log": log,
            "traces": trace.read_text(),
            "audit": json.dumps(admin_json(gw, "/admin/audit")),
            "keys": json.dumps(admin_json(gw, "/admin/tenants/alice/keys")),
            "metrics": metrics,
        }
        for where, text in texts.items():
            for k in (key, revoked, wrong, LEGACY_KEY):
                secret_part = k.partition(".")[2] or k
                assert secret_part not in text, f"a key's secret is in the {where}"
            assert "Bearer" not in text, where
        assert "authorization" not in texts["traces"].lower()
        assert key_id in texts["audit"] and revoked_id in texts["audit"]  # named by id
    finally:
        gw.stop()


def test_a_gateway_told_to_require_keys_starts_closed(worker: Proc, tmp_path: Path) -> None:
    """No key configured anywhere: with --require-api-keys the gateway refuses everyone
    (401) until an operator makes the first key, which then works."""
    config = tmp_path / "admission.toml"
    config.write_text(f'key_secret = "{SECRET}"\n')  # a secret to make keys with; no keys
    gw = start_gateway(
        "--worker",
        worker.ready["grpc"],
        "--admission-config",
        str(config),
        "--require-api-keys",
    )
    try:
        assert statuses(gw, None, 4) == {401}
        assert statuses(gw, "bw_abcdefabcdef.guessed", 2) == {401}
        key, _ = new_key(gw, "default")
        wait_for(lambda: statuses(gw, key, 4) == {200}, timeout=10)
        assert statuses(gw, None, 2) == {401}
    finally:
        gw.stop()


def test_a_revoked_config_key_stays_revoked_across_a_restart_with_a_state_dir(
    worker: Proc, tmp_path: Path
) -> None:
    """Without Redis the admin store was the run's temporary directory: a key revoked from
    the admission config worked again after the next restart. `--state-dir` keeps it;
    without one the revocation says it will not last."""
    from gateway.admission.tenants import new_api_key

    key, key_id, digest = new_api_key(SECRET)
    config = tmp_path / "admission.toml"
    keys = f'keys = [{{id = "{key_id}", digest = "{digest}"}}]'
    config.write_text(f'key_secret = "{SECRET}"\n[tenants.bob]\n{keys}\n')
    args = ("--worker", worker.ready["grpc"], "--admission-config", str(config))
    state = tmp_path / "state"
    for run in range(2):
        gw = start_gateway(*args, "--state-dir", str(state))
        try:
            if run == 0:
                wait_for(lambda gw=gw: statuses(gw, key, 2) == {200}, timeout=30)
                code, body = admin_call(gw, "DELETE", f"/admin/tenants/bob/keys/{key_id}")
                assert code == 200 and body["revoked"] and "durable" not in body, body
            wait_for(lambda gw=gw: statuses(gw, key, 2) == {401}, timeout=30)
        finally:
            gw.stop()
    gw = start_gateway(*args)  # no state dir: the revocation warns it will not last
    try:
        code, body = admin_call(gw, "DELETE", f"/admin/tenants/bob/keys/{key_id}")
        assert code == 200 and body["durable"] is False and "--state-dir" in body["warning"]
    finally:
        gw.stop()


def test_models_need_a_key_as_completions_do_and_401s_name_bearer(gateway: Proc) -> None:
    import urllib.error
    import urllib.request

    url = gateway.ready["http"] + "/v1/models"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=30)
    assert refused.value.code == 401
    assert refused.value.headers["WWW-Authenticate"] == "Bearer"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {LEGACY_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.loads(r.read())["data"]
    # OpenAI's models.retrieve: the model served, a 404 for another, a key as for the list
    auth = {"Authorization": f"Bearer {LEGACY_KEY}"}
    with urllib.request.urlopen(urllib.request.Request(url + "/sim", headers=auth)) as r:
        assert json.loads(r.read())["id"] == "sim"
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(urllib.request.Request(url + "/nope", headers=auth), timeout=30)
    assert missing.value.code == 404
    assert json.loads(missing.value.read())["error"]["code"] == "model_not_found"
    with pytest.raises(urllib.error.HTTPError) as keyless:
        urllib.request.urlopen(url + "/sim", timeout=30)
    assert keyless.value.code == 401
    status, headers, _ = complete(gateway, 0)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    # the key is checked before the body is read: a hostile body (here not even JSON; a
    # 2 KB gzip of a 2 MB prompt cost 37 ms to inflate and parse) gets its 401 for nothing
    import gzip

    junk = gzip.compress(b"{" * 2_000_000)
    req = urllib.request.Request(
        gateway.ready["http"] + "/v1/completions",
        junk,
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    with pytest.raises(urllib.error.HTTPError) as early:
        urllib.request.urlopen(req, timeout=30)
    assert early.value.code == 401, early.value.read()
