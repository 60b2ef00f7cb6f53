"""Prefix-aware routing on what workers report they hold, checked end to end: over
WatchCache (gRPC workers) and over GET /cache/watch (workers fronted as OpenAI upstreams).

Prompts are sent straight to a worker, behind the gateway's back, so only the worker's own
cache report can tell the gateway where a prefix lives, or that it was evicted.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import pytest

from loadtest.fleet import Proc, admin_json, start_gateway, start_sim_worker, wait_for
from prompts.block_keys import block_hashes, block_key
from prompts.tokenizer import Tokenizer
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc
from tests.procs import metric_total

KV_TOKENS = 1024  # 64 blocks of 16: a few long prompts evict the oldest


def system_prompt(tag: str) -> str:
    return f"[{tag}] You are a careful assistant for the {tag} team. " * 12


def messages(tag: str, question: str = "What now?") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_prompt(tag)},
        {"role": "user", "content": question},
    ]


def chat(base: str, msgs: list[dict[str, str]]) -> str:
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps({"model": "sim", "messages": msgs, "max_tokens": 2}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.headers.get("x-breakwater-worker", "")


def reported(worker: Proc) -> pb.CacheUpdate:
    """The worker's own snapshot of its cache."""
    with grpc.insecure_channel(worker.ready["grpc"]) as ch:
        stream = pb_grpc.InferenceStub(ch).WatchCache(pb.WatchCacheRequest(), timeout=30)
        first = next(stream)
        stream.cancel()
        return first


def admin(gw: Proc) -> dict[str, Any]:
    return admin_json(gw, "/admin/workers")


@pytest.fixture(scope="module", params=["grpc", "http"])
def fleet(request: pytest.FixtureRequest) -> Iterator[tuple[Proc, dict[str, Proc]]]:
    procs = [
        start_sim_worker("--http-port", "0", "--sim-kv-tokens", str(KV_TOKENS)) for _ in range(2)
    ]
    # the gateway names static workers by their address: host:port, or the base URL
    workers = {w.ready[request.param]: w for w in procs}
    gw = start_gateway(*[x for wid in workers for x in ("--worker", wid)])
    try:
        wait_for(
            lambda: (
                all(w["cache"]["reported"] for w in admin(gw)["workers"])
                and len(admin(gw)["workers"]) == 2
            ),
            timeout=60,
        )
        chat(gw.ready["http"], messages("warm-up"))  # the gateway loads the tokenizer now
        wait_for(lambda: admin(gw)["routing"]["tokenizers"], timeout=60)
        yield gw, workers
    finally:
        gw.stop()
        for w in workers.values():
            w.stop()


def digest(keys: Iterable[int]) -> str:
    x = 0
    for key in keys:
        x ^= key
    return f"{x:016x}"


def in_sync(gw: Proc, workers: dict[str, Proc]) -> bool:
    views = {w["worker_id"]: w["cache"] for w in admin(gw)["workers"]}
    return all(views[wid].get("digest") == digest(reported(w).stored) for wid, w in workers.items())


def wait_in_sync(gw: Proc, workers: dict[str, Proc]) -> None:
    """Until the gateway's view of every worker's cache is the worker's own report."""
    wait_for(lambda: in_sync(gw, workers), timeout=30)


def test_the_gateways_keys_are_the_workers_keys(fleet: tuple[Proc, dict[str, Proc]]) -> None:
    gw, workers = fleet
    msgs = messages("keys")
    holder = chat(gw.ready["http"], msgs)
    wait_in_sync(gw, workers)
    snap = reported(workers[holder])
    tok = Tokenizer(snap.tokenizer)
    ids = tok.prompt_ids(None, msgs)
    keys = [block_key(h) for h in block_hashes(ids, snap.block_size, snap.model_id.encode())]
    assert len(keys) == len(ids) // snap.block_size >= 10
    assert set(keys) <= set(snap.stored)


def test_a_prefix_cached_behind_the_gateways_back_is_found_and_its_eviction_seen(
    fleet: tuple[Proc, dict[str, Proc]],
) -> None:
    gw, workers = fleet
    msgs = messages("found")
    # Only w1 ever sees this prompt, straight to its own port: the gateway must learn it
    # from w1's cache report, as no decision of its own put it there.
    w0, w1 = sorted(workers)
    chat(workers[w1].ready["http"], msgs)
    wait_in_sync(gw, workers)
    for i in range(3):
        assert chat(gw.ready["http"], messages("found", f"question {i}")) == w1
    # Now w1 evicts it (other long prompts fill its small cache) and w0 gets it, again
    # behind the gateway's back; the next turn must follow the cache to w0.
    for i in range(8):
        chat(workers[w1].ready["http"], messages(f"filler-{i}"))
    chat(workers[w0].ready["http"], msgs)
    wait_in_sync(gw, workers)
    assert chat(gw.ready["http"], messages("found", "after the eviction")) == w0


def test_queued_prefill_is_counted_until_the_first_token(
    fleet: tuple[Proc, dict[str, Proc]],
) -> None:
    """Routing weighs the prompt tokens each replica still has to prefill; every request,
    finished or refused, hands its share back."""
    gw, _ = fleet
    for i in range(3):
        chat(gw.ready["http"], messages("queued", f"question {i}"))
    bad = urllib.request.Request(  # refused by the worker (max_tokens past its context)
        gw.ready["http"] + "/v1/chat/completions",
        data=json.dumps(
            {"model": "sim", "messages": messages("queued"), "max_tokens": 30000}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(bad, timeout=60)
    assert admin(gw)["routing"]["prefilling"] == {}


def pretokenized(worker: Proc) -> float:
    """Prompts the worker took as the gateway's token ids (its /metrics)."""
    return metric_total(worker, "breakwater_worker_prompts_pretokenized_total", "")


def answer(base: str, msgs: list[dict[str, str]], stream: bool) -> tuple[str, int]:
    """A greedy chat's text and prompt tokens, streamed or whole."""
    body = {"model": "sim", "messages": msgs, "max_tokens": 6, "temperature": 0}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read().decode()
    if not stream:
        doc = json.loads(raw)
        return doc["choices"][0]["message"]["content"], doc["usage"]["prompt_tokens"]
    text, prompt_tokens = "", 0
    for line in raw.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            for c in event.get("choices") or []:
                text += c["delta"].get("content") or ""
            prompt_tokens = (event.get("usage") or {}).get("prompt_tokens", prompt_tokens)
    return text, prompt_tokens


def test_the_prompts_token_ids_go_with_it_and_change_nothing(
    fleet: tuple[Proc, dict[str, Proc]],
) -> None:
    """Once the gateway's piecewise tokenizing has been checked (its first 32 prompts), a
    request carries the token ids routing computed, on both wires (gRPC `prompt_ids`, the
    relayed body's `breakwater_prompt`), streamed or not; the worker takes them instead of
    tokenizing, and answers exactly as when it tokenizes itself. A client may not send
    them."""
    gw, workers = fleet
    for i in range(40):  # the gateway checks its first 32 prompts' pieces
        chat(gw.ready["http"], messages(f"learn-{i % 4}", f"warm-up {i}"))
    before = sum(pretokenized(w) for w in workers.values())
    for i in range(6):
        msgs = messages(f"ids-{i % 2}", f"question number {i}, in full?")
        for stream in (False, True):
            direct = answer(workers[sorted(workers)[i % 2]].ready["http"], msgs, stream)
            assert answer(gw.ready["http"], msgs, stream) == direct
    # every request through the gateway came with its ids (the direct ones did not)
    assert sum(pretokenized(w) for w in workers.values()) - before == 12

    refused = urllib.request.Request(
        gw.ready["http"] + "/v1/chat/completions",
        data=json.dumps(
            {
                "model": "sim",
                "messages": messages("ids-0"),
                "breakwater_prompt": {"token_ids": "AAAAAA==", "tokenizer": "x"},
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(refused, timeout=60)
    assert err.value.code == 400
    assert json.load(err.value)["error"]["param"] == "breakwater_prompt"


def test_an_operator_can_keep_the_ids_at_the_gateway() -> None:
    """`--no-forward-token-ids`: routing still tokenizes, the workers tokenize again."""
    workers = [start_sim_worker("--http-port", "0") for _ in range(2)]
    gw = start_gateway(
        *[x for w in workers for x in ("--worker", w.ready["grpc"])], "--no-forward-token-ids"
    )
    try:
        wait_for(
            lambda: [w["cache"]["reported"] for w in admin(gw)["workers"]] == [True, True],
            timeout=60,
        )
        for i in range(40):
            for stream in (False, True):
                answer(gw.ready["http"], messages(f"kept-{i % 2}", f"question {i}"), stream)
        assert admin(gw)["routing"]["decisions"].get("held", 0) > 0  # it tokenized to route
        assert sum(pretokenized(w) for w in workers) == 0
    finally:
        gw.stop()
        for w in workers:
            w.stop()


def test_a_lost_worker_is_forgotten_and_a_quiet_one_kept(
    fleet: tuple[Proc, dict[str, Proc]],
) -> None:
    """A paused worker (a host lost without a word: no FIN, no RST) stops beating, and the
    gateway drops its view after 15 s of silence; the other worker's cache is just as still
    but beats, and keeps its view. Both wires. Resumed, the paused one is followed again."""
    gw, workers = fleet
    wait_in_sync(gw, workers)
    lost, quiet = sorted(workers)

    def reporting() -> dict[str, bool]:
        return {w["worker_id"]: w["cache"]["reported"] for w in admin(gw)["workers"]}

    workers[lost].signal(signal.SIGSTOP)
    try:
        wait_for(lambda: not reporting()[lost], timeout=90)
        assert reporting()[quiet]  # no change for as long, but it beat
    finally:
        workers[lost].signal(signal.SIGCONT)
    wait_for(lambda: reporting()[lost], timeout=90)
    wait_in_sync(gw, workers)


def test_an_openai_server_that_does_not_report_is_asked_once() -> None:
    """A third-party OpenAI server answers GET /cache/watch with a 404: the gateway stops
    asking and routes it from its own index, as before."""
    from loadtest.mock_openai import start_mock_backends

    def calls(url: str, path: str) -> int:
        with urllib.request.urlopen(url + "/stats", timeout=10) as r:
            return int(json.loads(r.read())["paths"].get(path, 0))

    with start_mock_backends(2, model="sim") as backends:
        gw = start_gateway(*[x for b in backends for x in ("--worker", b.url)])
        try:
            wait_for(lambda: all(calls(b.url, "/cache/watch") == 1 for b in backends), 30)
            chat(gw.ready["http"], messages("third-party"))
            views = admin(gw)["workers"]
            assert len(views) == 2 and not any(w["cache"]["reported"] for w in views)
            # three health probes later (1 s apart), so as many of the watcher's sync rounds
            probes = {b.url: calls(b.url, "/v1/models") for b in backends}
            wait_for(
                lambda: all(calls(b.url, "/v1/models") >= probes[b.url] + 3 for b in backends), 30
            )
            assert all(calls(b.url, "/cache/watch") == 1 for b in backends)
        finally:
            gw.stop()


def _open_watch(worker: Proc) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    host, port = worker.ready["http"].removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/cache/watch")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/x-ndjson")
    return conn, resp


def test_the_http_cache_stream_beats_and_ends_with_a_drain() -> None:
    """A still cache's stream carries an empty line every few seconds (so a gateway can
    tell a quiet worker from a lost one), and a drain ends it, even one nobody reads."""
    worker = start_sim_worker("--http-port", "0", "--sim-kv-tokens", str(KV_TOKENS))
    try:
        conn, resp = _open_watch(worker)
        snap = json.loads(resp.readline())
        assert snap["snapshot"] is True and snap["block_size"] == 16 and "stored" in snap
        deadline = time.monotonic() + 30
        while (line := resp.readline()) != b"\n":  # updates may come first; a beat comes
            assert line and time.monotonic() < deadline, line
        conn.close()
        _, unread = _open_watch(worker)  # left unread: the drain must not wait on it
        t = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        assert time.monotonic() - t < 20  # aiohttp alone would wait 60 s for the handler
        unread.close()
    finally:
        worker.stop()
