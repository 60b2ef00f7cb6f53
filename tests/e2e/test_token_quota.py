"""A token quota counts what answers really used: the charge at admission (the prompt's
estimate + max_tokens, 256 when unset) is settled with the usage once the answer ends."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.procs import start_gateway, start_sim_worker, wait_for


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


def test_a_stream_the_client_cut_is_charged_what_it_was_sent(tmp_path: Path) -> None:
    """A stream cut before its usage settled nothing: a client that closed its streams
    early paid only the estimate (256 for an unset max_tokens) whatever it was sent."""
    import http.client

    config = tmp_path / "admission.toml"
    config.write_text("[defaults]\ntokens_per_second = 0.001\ntoken_burst = 700\n")
    worker = start_sim_worker("--http-port", "0")
    gw = start_gateway("--worker", worker.ready["grpc"], "--admission-config", str(config))
    try:
        host, port = gw.ready["http"].removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        messages = [{"role": "user", "content": "go"}]
        body = {"model": "sim", "messages": messages, "stream": True, "ignore_eos": True}
        headers = {"Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        assert resp.status == 200
        events = 0
        while events < 600:
            line = resp.readline()
            assert line, "the stream ended early"
            events += line.startswith(b"data: ")
        conn.close()  # cut: ~600 tokens sent, ~258 charged at admission

        def disconnects() -> float:
            with urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=30) as r:
                lines = r.read().decode().splitlines()
            name = "breakwater_client_disconnects_total "
            return sum(float(x.split()[-1]) for x in lines if x.startswith(name))

        wait_for(lambda: disconnects() >= 1, timeout=30)
        status, refused = _chat(
            gw.ready["http"],
            {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200},
        )
        assert status == 429 and "tokens" in refused["error"]["message"], refused
    finally:
        gw.stop()
        worker.stop()
