"""A token quota counts what answers really used: the charge at admission (the prompt's
estimate + max_tokens, 256 when unset) is settled with the usage once the answer ends."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.procs import start_gateway, start_sim_worker


def _chat(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_an_unset_max_tokens_is_charged_what_the_answer_used(tmp_path: Path) -> None:
    config = tmp_path / "admission.toml"
    config.write_text("[defaults]\ntokens_per_second = 0.001\ntoken_burst = 1000\n")
    worker = start_sim_worker("--sim-speed", "50")
    gw = start_gateway("--worker", worker.ready["grpc"], "--admission-config", str(config))
    try:
        url = gw.ready["http"]
        messages = [{"role": "user", "content": "go on"}]
        # no max_tokens: charged ~258 at admission; the worker's default cap generated
        body = {"model": "sim", "messages": messages, "ignore_eos": True}
        status, answer = _chat(url, body)
        assert status == 200 and answer["usage"]["completion_tokens"] > 900, answer
        status, refused = _chat(url, {**body, "max_tokens": 4})
        assert status == 429 and "tokens" in refused["error"]["message"], refused
    finally:
        gw.stop()
        worker.stop()
