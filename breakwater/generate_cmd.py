"""`breakwater generate`: a prompt in, streamed text out, and the engine's stats."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


async def _generate(args: argparse.Namespace) -> int:
    from worker.engine import AsyncEngine, GenerateRequest, InvalidRequestError, SamplingParams
    from worker.engine.errors import ConfigError
    from worker.settings import engine_config_from_args

    try:
        config = engine_config_from_args(args)
        t0 = time.perf_counter()
        engine = await asyncio.to_thread(AsyncEngine.from_config, config)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"# model {config.model_name} loaded in {time.perf_counter() - t0:.2f}s; "
        f"{engine.core.executor.describe()}",
        file=sys.stderr,
    )
    if "demo-random" in config.model:
        print(
            "# note: the demo model has RANDOM weights; its text is gibberish by design",
            file=sys.stderr,
        )

    def request(i: int) -> GenerateRequest:
        sp = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
        )
        if args.chat:
            return GenerateRequest(
                f"cli-{i}", messages=[{"role": "user", "content": args.prompt}], sampling=sp
            )
        return GenerateRequest(f"cli-{i}", prompt=args.prompt, sampling=sp)

    async def one(i: int) -> None:
        async for delta in engine.generate(request(i)):
            if i == 0:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
            if delta.finished and i == 0:
                sys.stdout.write("\n")
                print(f"# finish_reason={delta.finish_reason} usage={delta.usage}", file=sys.stderr)
                if delta.error:
                    print(f"error: {delta.error}", file=sys.stderr)

    try:
        t0 = time.perf_counter()
        if args.prompt:
            sys.stdout.write(args.prompt if not args.chat else "")
        await asyncio.gather(*(one(i) for i in range(args.num_requests)))
        elapsed = time.perf_counter() - t0
    except InvalidRequestError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    stats = engine.stats()
    print(
        f"# {stats.generation_tokens_total} tokens in {elapsed:.2f}s "
        f"({stats.generation_tokens_total / elapsed:.0f} tok/s)",
        file=sys.stderr,
    )
    print("# engine stats: " + json.dumps(stats.as_dict()), file=sys.stderr)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args))
