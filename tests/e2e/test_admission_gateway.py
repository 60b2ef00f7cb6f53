"""Admission as API users meet it: 401 for a bad key, 429 over quota, 503 when full."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.admission.tenants import hash_key
from tests.procs import Proc, start_gateway, start_sim_worker

SECRET = "test-secret"


def call(gw: Proc, key: str | None, max_tokens: int = 4) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions",
        headers=headers,
        data=json.dumps({"model": "sim", "prompt": "q", "max_tokens": max_tokens}).encode(),
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


@pytest.fixture(scope="module")
def sim_worker() -> Iterator[Proc]:
    w = start_sim_worker("--sim-preset", "llama3-8b-h100")
    yield w
    w.stop()


def test_keys_and_quotas(sim_worker: Proc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "admission.toml"
    config.write_text(
        f'key_secret = "{SECRET}"\n'
        "[tenants.alice]\n"
        f'key_digests = ["{hash_key("alice-key", SECRET)}"]\n'
        "requests_per_second = 0.5\nrequest_burst = 2\n"
    )
    gw = start_gateway("--worker", sim_worker.ready["grpc"], "--admission-config", str(config))
    try:
        status, body, _ = call(gw, "wrong-key")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert call(gw, None)[0] == 401
        assert call(gw, "alice-key")[0] == 200
        assert call(gw, "alice-key")[0] == 200
        status, body, headers = call(gw, "alice-key")
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
    finally:
        gw.stop()


def test_full_queue_is_answered_at_once(sim_worker: Proc) -> None:
    gw = start_gateway(
        "--worker", sim_worker.ready["grpc"], "--max-in-flight", "1", "--max-queue", "1"
    )
    try:
        results: list[int] = []
        # 8 slow requests at once: 1 runs, 1 waits, the rest are refused immediately.
        threads = [
            threading.Thread(target=lambda: results.append(call(gw, None, 200)[0]))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results.count(200) >= 2
        assert results.count(503) >= 1
        assert set(results) <= {200, 503}
    finally:
        gw.stop()
