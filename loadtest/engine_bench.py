"""Engine benchmark: our engine against naive and static-batching baselines, in one run.

    python -m loadtest.engine_bench [--quick] [--json] [--peer vllm-cpu]

Every figure is a ratio against a baseline measured in the same process on the same
machine, on a fixed seeded workload over the random-weight demo model at a realistic small
shape (`small` preset, ~30M parameters):

- engine_tok_s: output tokens/s of our engine, all requests submitted at once;
- sequential_tok_s: transformers `generate`, one request at a time (the naive server);
- static_batch_tok_s: transformers `generate` on left-padded batches of 16 (static batching:
  a batch runs until its longest request ends; only requested tokens count);
- kv_slot_utilization: at the peak of allocated KV slots, tokens held / slots allocated;
- prefix_ttft_speedup: time to first token of a request whose 1,024-token prefix is cached,
  against the same request cold.

`--peer vllm-cpu` also runs the vLLM peer workload (32 prompts of 128 tokens generating 128
on the `demo` preset) through vLLM's CPU build, in its own virtualenv, and through our engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import vllm_env

TARGETS = {
    "speedup_vs_sequential": 5.0,
    "speedup_vs_static": 2.0,
    "kv_slot_utilization": 0.9,
    "prefix_ttft_speedup": 5.0,
    "speedup_vs_vllm_cpu": 1.0,
}


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(
    n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int, seed: int
) -> Workload:
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(8, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)
    ]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(n)])


def log(msg: str) -> None:
    print(f"[engine_bench] {msg}", file=sys.stderr, flush=True)


# -- our engine ------------------------------------------------------------------------------


async def _engine_run(engine: Any, wl: Workload, tag: str) -> float:
    from worker.engine import GenerateRequest, SamplingParams

    async def one(i: int) -> int:
        sp = SamplingParams(temperature=0.0, max_tokens=wl.max_tokens[i], ignore_eos=True)
        n = 0
        async for d in engine.generate(
            GenerateRequest(f"{tag}-{i}", prompt_token_ids=wl.prompts[i], sampling=sp)
        ):
            n += len(d.token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(len(wl.prompts))))
    elapsed = time.perf_counter() - t0
    assert sum(counts) == wl.output_tokens, (sum(counts), wl.output_tokens)
    return sum(counts) / elapsed


async def _ttft(engine: Any, prompt: list[int], rid: str) -> float:
    from worker.engine import GenerateRequest, SamplingParams

    t0 = time.perf_counter()
    stream = engine.generate(
        GenerateRequest(rid, prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=1))
    )
    async for _ in stream:
        break
    ttft = time.perf_counter() - t0
    await stream.aclose()
    return ttft


def bench_engine(model: Path, wl: Workload, vocab: int, seed: int, reps: int) -> dict[str, float]:
    from worker.engine import AsyncEngine, EngineConfig

    config = EngineConfig(model=str(model), kv_cache_memory=1 << 30, max_model_len=2048)

    async def main() -> dict[str, float]:
        engine = AsyncEngine.from_config(config)
        try:
            await _engine_run(engine, make_workload(4, (16, 32), (4, 8), vocab, seed + 1), "warm")
            engine.core.kv_peak_slots = engine.core.kv_peak_tokens = 0
            tok_s = await _engine_run(engine, wl, "main")
            stats = engine.stats()
            util = stats.kv_peak_tokens / stats.kv_peak_slots if stats.kv_peak_slots else 0.0
            rng = random.Random(seed + 2)
            cold, warm = [], []
            for r in range(reps):
                prefix = [rng.randrange(8, vocab) for _ in range(1024)]
                cold.append(
                    await _ttft(
                        engine, prefix + [rng.randrange(8, vocab) for _ in range(16)], f"cold-{r}"
                    )
                )
                warm.append(
                    await _ttft(
                        engine, prefix + [rng.randrange(8, vocab) for _ in range(16)], f"warm-{r}"
                    )
                )
            return {
                "engine_tok_s": tok_s,
                "kv_slot_utilization": util,
                "ttft_cold_ms": statistics.median(cold) * 1e3,
                "ttft_cached_prefix_ms": statistics.median(warm) * 1e3,
                "prefix_ttft_speedup": statistics.median(cold) / statistics.median(warm),
                "num_preemptions": stats.num_preemptions,
            }
        finally:
            engine.shutdown()

    return asyncio.run(main())


# -- transformers baselines ------------------------------------------------------------------


def bench_hf(model: Path, wl: Workload, batch: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    common = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    with torch.inference_mode():
        ids = torch.tensor([wl.prompts[0][:16]])
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, **common)

        t0 = time.perf_counter()
        for p, n in zip(wl.prompts, wl.max_tokens, strict=True):
            ids = torch.tensor([p])
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                **common,
            )
        sequential = wl.output_tokens / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        for start in range(0, len(wl.prompts), batch):
            prompts = wl.prompts[start : start + batch]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            n = max(wl.max_tokens[start : start + batch])
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **common)
        static = wl.output_tokens / (time.perf_counter() - t0)
    return {"sequential_tok_s": sequential, "static_batch_tok_s": static}


# -- vLLM CPU peer ---------------------------------------------------------------------------


def bench_vllm_peer(vllm_python: str, seed: int) -> dict[str, float]:
    from worker.engine.demo_model import ensure_demo_model

    model = ensure_demo_model("demo")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(seed)
    wl = Workload([[rng.randrange(8, vocab) for _ in range(128)] for _ in range(32)], [128] * 32)
    runner = Path(__file__).parent / "peers" / "vllm_cpu_runner.py"
    with tempfile.TemporaryDirectory() as tmp:
        wl_file = Path(tmp) / "workload.json"
        wl_file.write_text(json.dumps({"prompts": wl.prompts, "max_tokens": wl.max_tokens}))
        log(f"running vLLM CPU peer with {vllm_python} (about a minute)")
        proc = subprocess.run(
            [vllm_python, str(runner), "--model", str(model), "--workload", str(wl_file)],
            capture_output=True,
            text=True,
            timeout=900,
            # the runner sizes LLM()'s KV space itself
            env={**os.environ, **vllm_env.worker_env(), "VLLM_CACHE_ROOT": tmp},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM peer failed:\n{proc.stderr[-3000:]}")
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = bench_engine_peer(model, wl)
    return {
        "vllm_cpu_tok_s": peer["tok_s"],
        "engine_peer_tok_s": ours,
        "speedup_vs_vllm_cpu": ours / peer["tok_s"],
    }


def bench_engine_peer(model: Path, wl: Workload) -> float:
    from worker.engine import AsyncEngine, EngineConfig

    async def main() -> float:
        engine = AsyncEngine.from_config(
            EngineConfig(model=str(model), kv_cache_memory=1 << 30, max_model_len=2048)
        )
        try:
            vocab = engine.core.executor.vocab_size
            await _engine_run(engine, make_workload(4, (16, 32), (4, 8), vocab, 99), "warm")
            return await _engine_run(engine, wl, "peer")
        finally:
            engine.shutdown()

    return asyncio.run(main())


# -- report ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a reduced run, under 60 s on 2 cores")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--peer", choices=["vllm-cpu"], default=None)
    ap.add_argument(
        "--vllm-python",
        default=None,
        help="interpreter of a virtualenv with vLLM's CPU build (default: loadtest.vllm_env's, "
        "built on first use)",
    )
    ap.add_argument("--model", default=None, help="checkpoint (default: the `small` demo model)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from worker.engine.demo_model import ensure_demo_model

    model = Path(args.model) if args.model else ensure_demo_model("small")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    if args.quick:
        # Same 2:1 prompt-to-output mix as the full run, at half the lengths and a quarter
        # of the requests, so that the ratios stay comparable.
        wl = make_workload(16, (32, 256), (16, 128), vocab, args.seed)
    else:
        wl = make_workload(64, (32, 512), (16, 256), vocab, args.seed)
    log(f"model {model}; {len(wl.prompts)} requests, {wl.output_tokens} output tokens")

    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    figures.update(bench_engine(model, wl, vocab, args.seed, reps=3 if args.quick else 5))
    log(f"engine done: {figures['engine_tok_s']:.0f} tok/s")
    figures.update(bench_hf(model, wl, batch=16))
    log("transformers baselines done")
    figures["speedup_vs_sequential"] = figures["engine_tok_s"] / figures["sequential_tok_s"]
    figures["speedup_vs_static"] = figures["engine_tok_s"] / figures["static_batch_tok_s"]
    if args.peer == "vllm-cpu":
        python = args.vllm_python or vllm_env.ensure()
        figures.update(bench_vllm_peer(python, args.seed))

    passed = {k: figures[k] >= v for k, v in TARGETS.items() if k in figures}
    result = {
        "benchmark": "engine",
        "quick": args.quick,
        "requests": len(wl.prompts),
        "output_tokens": wl.output_tokens,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "figures": {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
        "targets": TARGETS,
        "met": passed,
    }
    print(f"{'figure':<28}{'value':>14}  target")
    for k, v in result["figures"].items():
        target = f">= {TARGETS[k]}" + ("  ok" if passed[k] else "  MISSED") if k in TARGETS else ""
        print(f"{k:<28}{v:>14}  {target}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
