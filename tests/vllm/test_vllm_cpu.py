"""`breakwater worker --engine vllm` against real vLLM: its CPU build, in its own virtualenv.

The worker runs with that venv's interpreter (loadtest.vllm_env builds it); the gateway and
the reference (transformers, our torch engine) run here. Same random-weight checkpoint for
all three (`demo` preset: vLLM's CPU attention has no kernel for the `tiny` preset's head
size of 16). Where the venv is missing these tests skip, saying how to build it; CI sets
BREAKWATER_REQUIRE_VLLM=1, which turns the skip into a failure.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest import vllm_env
from loadtest.fleet import Proc, admin_json, start_gateway, start_worker, wait_for
from prompts.block_keys import block_hashes, block_key
from prompts.tokenizer import Tokenizer
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.engine._util import hf_greedy
from tests.procs import child_pids, interrupt_and_reap
from worker.engine.demo_model import ensure_demo_model

MODEL = "demo"
VLLM_PYTHON = vllm_env.check()


def _need_vllm() -> str:
    if VLLM_PYTHON is None:
        reason = (
            f"vLLM's CPU build is not installed at {vllm_env.venv_dir()}: "
            "python -m loadtest.vllm_env builds it (about 2 minutes)"
        )
        if os.environ.get("BREAKWATER_REQUIRE_VLLM") == "1":
            pytest.fail(reason + " (BREAKWATER_REQUIRE_VLLM=1: these tests must run)")
        pytest.skip(reason)
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def model() -> Path:
    return ensure_demo_model("demo")


RPC_DIR = tempfile.TemporaryDirectory(prefix="bw-vllm-rpc-")
"""vLLM's ZMQ ipc sockets (it leaves some behind at every stop): here, not loose in /tmp."""


@pytest.fixture(scope="module", autouse=True)
def _rpc_dir_cleanup() -> Iterator[None]:
    yield
    RPC_DIR.cleanup()


def vllm_worker_env() -> dict[str, str]:
    return {**vllm_env.worker_env(), "VLLM_RPC_BASE_PATH": RPC_DIR.name}


def start_vllm_worker(model: Path) -> Proc:
    return start_worker(
        model,
        "--enforce-eager",
        "--http-port",
        "0",
        engine="vllm",
        name=MODEL,
        python=_need_vllm(),
        env=vllm_worker_env(),
        timeout=300,
    )


@pytest.fixture(scope="module")
def vllm_worker(model: Path) -> Iterator[Proc]:
    w = start_vllm_worker(model)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def torch_worker(model: Path) -> Iterator[Proc]:
    _need_vllm()
    w = start_worker(model, engine="torch", name=MODEL)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def via_vllm(vllm_worker: Proc) -> Iterator[str]:
    gw = start_gateway("--worker", vllm_worker.ready["grpc"])
    yield gw.ready["http"]
    gw.stop()


@pytest.fixture(scope="module")
def via_torch(torch_worker: Proc) -> Iterator[str]:
    gw = start_gateway("--worker", torch_worker.ready["grpc"])
    yield gw.ready["http"]
    gw.stop()


def post(base: str, path: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return dict(json.loads(r.read()))


def metrics(worker: Proc) -> dict[str, float]:
    with urllib.request.urlopen(worker.ready["http"] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm:")
    }


def prompts(model: Path, n: int, length: int) -> list[list[int]]:
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    return [[(7 + 31 * i + 17 * j) % (vocab - 8) + 8 for j in range(length)] for i in range(n)]


def greedy(base: str, prompt: list[int] | str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
    }
    return post(base, "/v1/completions", body)["choices"][0]


def concurrently(fn: Any, items: list[Any]) -> list[Any]:
    out: list[Any] = [None] * len(items)

    def run(i: int) -> None:
        out[i] = fn(items[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def test_greedy_through_the_gateway_equals_torch_engine_and_transformers(
    model: Path, via_vllm: str, via_torch: str
) -> None:
    """Six prompts at once (vLLM batches them), 12 tokens each: the same tokens from vLLM,
    from our engine and from transformers, and the same logprobs to float32 noise."""
    tok = Tokenizer(str(model))
    batch = prompts(model, 6, 40)
    got_vllm = concurrently(lambda p: greedy(via_vllm, p, 12), batch)
    got_torch = concurrently(lambda p: greedy(via_torch, p, 12), batch)
    for p, v, t in zip(batch, got_vllm, got_torch, strict=True):
        reference = [tok.decode([i], skip_special_tokens=False) for i in hf_greedy(model, p, 12)]
        assert v["logprobs"]["tokens"] == reference
        assert t["logprobs"]["tokens"] == reference
        assert v["text"] == t["text"]
        lps = zip(v["logprobs"]["token_logprobs"], t["logprobs"]["token_logprobs"], strict=True)
        for a, b in lps:
            assert abs(a - b) < 1e-3
    # A text prompt: vLLM's tokenisation of it and ours agree too.
    text = "The quick brown fox jumps over the lazy dog. " * 3
    assert greedy(via_vllm, text, 10)["text"] == greedy(via_torch, text, 10)["text"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [9] * 1024, "max_tokens": 1}, "prompt"),  # max-model-len is 1024
        ({"prompt": [9] * 1000, "max_tokens": 100}, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
    ],
)
def test_bad_requests_are_a_400_naming_the_parameter(
    via_vllm: str, vllm_worker: Proc, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        post(via_vllm, "/v1/completions", {"model": MODEL, **body})
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["param"] == param
    # Nothing left queued: waited for, as anything else still in vLLM finishes on its own.
    wait_for(lambda: metrics(vllm_worker)["vllm:num_requests_waiting"] == 0, timeout=60)


def stream(base: str, body: dict[str, Any], read_events: int | None = None) -> list[Any]:
    """SSE events of a streamed chat completion; with read_events, leave after that many."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({**body, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    events: list[Any] = []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        events.append(json.loads(line[6:]))
        if read_events is not None and len(events) >= read_events:
            break
    conn.close()
    return events


def test_streaming_with_max_tokens_and_stop_strings(via_vllm: str, via_torch: str) -> None:
    messages = [{"role": "user", "content": "tell me about rivers"}]
    greedy_chat = {"model": MODEL, "messages": messages, "temperature": 0}
    runs = {
        name: stream(base, {**greedy_chat, "max_tokens": 9})
        for name, base in (("vllm", via_vllm), ("torch", via_torch))
    }
    texts = {}
    for name, events in runs.items():
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["length"], name
        texts[name] = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert texts["vllm"] == texts["torch"]
    # Stop at a piece of that text: both cut it there, without the stop string.
    full = texts["vllm"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = {}
    for name, base in (("vllm", via_vllm), ("torch", via_torch)):
        body = {**greedy_chat, "max_tokens": 9, "stop": [stop]}
        choice = post(base, "/v1/chat/completions", body)["choices"][0]
        assert choice["finish_reason"] == "stop", name
        cut[name] = choice["message"]["content"]
    assert cut["vllm"] == cut["torch"] == full[: full.index(stop)]


def test_prefix_cache_hits_counted_by_vllm_and_its_blocks_reported_as_our_keys(
    model: Path, vllm_worker: Proc, via_vllm: str
) -> None:
    """Two prompts sharing 300 tokens: vLLM's own counters see the hit, the usage reports
    the cached tokens, and WatchCache streams the shared blocks under the keys a gateway
    computes from the prompt (vLLM's blocks are 128 tokens on CPU)."""
    shared = prompts(model, 1, 300)[0]
    before = metrics(vllm_worker)
    greedy(via_vllm, [*shared, 11, 12, 13], 2)
    second = post(
        via_vllm,
        "/v1/completions",
        {"model": MODEL, "prompt": [*shared, 21, 22], "max_tokens": 2, "temperature": 0},
    )
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 256
    after = metrics(vllm_worker)
    hits = "vllm:prefix_cache_hits_total"
    assert after[hits] - before.get(hits, 0.0) >= 256
    assert "vllm:kv_cache_usage_perc" in after

    with grpc.insecure_channel(vllm_worker.ready["grpc"]) as channel:
        first = next(pb_grpc.InferenceStub(channel).WatchCache(pb.WatchCacheRequest(), timeout=10))
    assert first.snapshot and first.block_size == 128 and first.model_id == MODEL
    keys = [block_key(h) for h in block_hashes(shared, first.block_size, MODEL.encode())]
    assert len(keys) == 2 and set(keys) <= set(first.stored)


def test_a_client_that_leaves_aborts_the_request_in_vllm(
    model: Path, vllm_worker: Proc, via_vllm: str
) -> None:
    before = metrics(vllm_worker).get("vllm:generation_tokens_total", 0.0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go on forever"}],
        "max_tokens": 900,
        "ignore_eos": True,
    }
    assert len(stream(via_vllm, body, read_events=3)) == 3

    def settled() -> bool:
        m = metrics(vllm_worker)
        return m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0

    wait_for(settled, timeout=60, interval=0.2)
    made = metrics(vllm_worker)["vllm:generation_tokens_total"] - before
    assert made < 600, made  # aborted, not run to its 900 tokens


def test_the_gateway_sends_a_shared_prefix_to_the_vllm_replica_that_holds_it(
    model: Path, vllm_worker: Proc
) -> None:
    """Two vLLM replicas behind one gateway (cache-aware routing, the default): follow-up
    turns sharing a long system prompt go where vLLM's KV events say its blocks are."""
    other = start_vllm_worker(model)
    gw = start_gateway("--worker", vllm_worker.ready["grpc"], "--worker", other.ready["grpc"])
    try:

        def workers() -> list[dict[str, Any]]:
            return list(admin_json(gw, "/admin/workers")["workers"])

        wait_for(lambda: [w["cache"]["reported"] for w in workers()] == [True, True], timeout=60)
        system = "You are a careful assistant for the river team, and brief. " * 12  # ~310 tokens

        def chat(question: str) -> tuple[str, int]:
            body = {
                "model": MODEL,
                "max_tokens": 2,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
            }
            req = urllib.request.Request(
                gw.ready["http"] + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                usage = json.loads(r.read())["usage"]
                replica = r.headers.get("x-breakwater-worker", "")
            return replica, usage["prompt_tokens_details"]["cached_tokens"]

        holder, _ = chat("first question")
        wait_for(lambda: any(w["cache"].get("blocks", 0) >= 2 for w in workers()), timeout=60)
        for i in range(4):
            replica, cached = chat(f"follow-up {i}")
            assert replica == holder
            assert cached >= 256
    finally:
        gw.stop()
        other.stop()


def test_breakwater_up_with_the_vllm_engine(model: Path) -> None:
    """`breakwater up --engine vllm` from vLLM's environment: a worker and a gateway, one
    answer, and Ctrl-C leaves no process behind, nor any of vLLM's ipc sockets in the
    temp directory (the worker gives vLLM a directory of its own and removes it)."""
    with tempfile.TemporaryDirectory(prefix="bw-up-") as tmp:  # short: sockets live here
        up_with_vllm(model, Path(tmp))


def up_with_vllm(model: Path, tmp_path: Path) -> None:
    env = {**vllm_env.worker_env(), "TMPDIR": str(tmp_path), "VLLM_RPC_BASE_PATH": ""}
    up = Proc(
        ["up", "--engine", "vllm", "--enforce-eager", "--workers", "1", "--port", "0",
         "--model", str(model), "--kv-cache-memory", "32MiB", "--max-model-len", "1024",
         "--gateway-processes", "1"],
        "Breakwater is up",
        timeout=300,
        env=env,
        python=_need_vllm(),
    )  # fmt: skip
    try:
        line = next(x for x in up.stdout_lines if x.startswith("Breakwater is up"))
        assert [p.name for p in tmp_path.glob("bw-vllm-*")]  # in use
        assert "1 vllm worker(s)" in line
        url = line.split("gateway ")[1].split()[0]
        body = {"model": str(model), "prompt": "up", "max_tokens": 3, "temperature": 0}
        assert post(url, "/v1/completions", body)["usage"]["completion_tokens"] == 3
        interrupt_and_reap(up, child_pids(up))
        assert [p for p in tmp_path.rglob("*") if p.is_socket()] == []
        assert list(tmp_path.glob("bw-vllm-*")) == []
    finally:
        up.stop()


def test_sigterm_drains_the_request_in_flight_then_exits(vllm_worker: Proc, via_vllm: str) -> None:
    """Last in this module: it stops the module's vLLM worker."""
    result: dict[str, Any] = {}

    def call() -> None:
        body = {"model": MODEL, "prompt": "drain me", "max_tokens": 300, "ignore_eos": True}
        result["choice"] = post(via_vllm, "/v1/completions", body)["choices"][0]

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: metrics(vllm_worker)["vllm:num_requests_running"] >= 1, timeout=60)
    started = time.monotonic()
    vllm_worker.signal(signal.SIGTERM)
    t.join(120)
    assert result["choice"]["finish_reason"] == "length"
    assert vllm_worker.wait(60) == 0
    assert time.monotonic() - started < 60
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        metrics(vllm_worker)
