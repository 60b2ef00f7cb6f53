"""The `breakwater` command line.

Subcommands import their heavy dependencies (torch, the engine) only when they run, so
that `breakwater --help` and the light subcommands start instantly.
"""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_generate(args: argparse.Namespace) -> int:
    from breakwater.generate_cmd import run_generate

    return run_generate(args)


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.server import run_worker
    from worker.settings import engine_config_from_args, settings_from_args

    return run_worker(settings_from_args(args, engine_config_from_args(args)))


def _cmd_gateway(args: argparse.Namespace) -> int:
    # Before grpc loads: process 0 forks its siblings (then execs them) while grpc's
    # threads run, and grpc-core's fork handlers, skipped in the parent ("Other threads
    # are currently calling into gRPC"), then crashed the child before its exec now and
    # then (SIGSEGV: "gateway process 1 exited during start-up", once in a full CI run
    # and three restarts in a row in a review). Nothing here forks without exec.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    from gateway.app import run_gateway
    from gateway.settings import settings_from_args

    return run_gateway(settings_from_args(args))


def _cmd_up(args: argparse.Namespace) -> int:
    from breakwater.up import run_up

    return run_up(args)


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from worker.engine.demo_model import write_demo_model

    try:
        path = write_demo_model(args.out, args.preset, args.arch, args.seed)
    except OSError as e:  # an unwritable --out: one line, not a traceback
        print(f"breakwater demo-model: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote a RANDOM-WEIGHT {args.arch} checkpoint ({args.preset}) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="breakwater", description="Resilient inference gateway and worker pool for LLMs."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    from serving.cli_types import DefaultsHelp, env_defaults, env_help, integer, number, port
    from worker.settings import add_engine_args, add_worker_args, byte_size

    g = sub.add_parser(
        "generate",
        help="run the engine in-process on a prompt, streaming text",
        formatter_class=DefaultsHelp,
    )
    g.add_argument("prompt", nargs="?", default="The gateway keeps the queue")
    g.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    g.add_argument("--max-tokens", type=integer(1), default=48, help="tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's mass")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest; 0: all")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument(
        "-n",
        "--num-requests",
        type=integer(1),
        default=1,
        help="submit the prompt this many times at once (shows batching)",
    )
    add_engine_args(g)
    g.set_defaults(func=_cmd_generate)

    w = sub.add_parser(
        "worker",
        help="serve one engine over gRPC (and optionally HTTP)",
        formatter_class=DefaultsHelp,
        epilog=env_help(
            "BREAKWATER_WORKER_",
            "Also read: BREAKWATER_REDIS_URL, BREAKWATER_TRACE_EXPORTER, BREAKWATER_WORKER_ID.",
        ),
    )
    add_worker_args(w)
    add_engine_args(w)
    env_defaults(w, "BREAKWATER_WORKER_")
    w.set_defaults(func=_cmd_worker)

    gw = sub.add_parser(
        "gateway",
        help="the OpenAI-compatible (and gRPC) front door",
        formatter_class=DefaultsHelp,
        epilog=env_help(
            "BREAKWATER_GATEWAY_",
            "Also read: BREAKWATER_REDIS_URL, BREAKWATER_ADMIN_TOKEN, BREAKWATER_TRACE_EXPORTER.",
        ),
    )
    from gateway.settings import add_gateway_args

    add_gateway_args(gw)
    env_defaults(gw, "BREAKWATER_GATEWAY_")
    gw.set_defaults(func=_cmd_gateway)

    up = sub.add_parser(
        "up",
        help="start a gateway and a local worker pool in one command",
        formatter_class=DefaultsHelp,
    )
    up.add_argument("--port", type=port(), default=8080, help="gateway HTTP port")
    up.add_argument("--grpc-port", type=port(), default=None, help="gateway gRPC port")
    up.add_argument(
        "--gateway-processes",
        type=integer(0),
        default=None,
        help="gateway event-loop processes (default: the number of cores)",
    )
    up.add_argument("--workers", type=integer(1), default=1, help="local workers to start")
    up.add_argument(
        "--engine",
        choices=["torch", "sim", "vllm"],
        default="torch",
        help="vllm: vLLM in each worker (installed in this environment)",
    )
    up.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vllm: no torch.compile or CUDA graphs (faster start, slower steps)",
    )
    up.add_argument(
        "--sim-preset",
        default="llama3-8b-h100",
        help="--engine sim: the model and GPU whose step times it simulates",
    )
    up.add_argument("--redis-url", default=None, help="use Redis as the registry")
    up.add_argument("--host", default="127.0.0.1", help="address the gateway binds")
    up.add_argument("--model", default=None, help="checkpoint dir (default: the demo model)")
    up.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=None,
        help="KV cache per worker, e.g. 2GiB (default: the worker's)",
    )
    up.add_argument(
        "--max-model-len",
        type=integer(1),
        default=None,
        help="tokens a sequence may hold (default: the model's, capped by the KV cache)",
    )
    up.add_argument(
        "--ready-timeout",
        type=number(0.0, low_open=True),
        default=300.0,
        help="seconds to wait for the workers and the gateway to be ready",
    )
    up.add_argument("--max-num-seqs", type=integer(1), default=None, help="batch slots per worker")
    scale = up.add_argument_group("autoscaling (--autoscale)")
    scale.add_argument(
        "--autoscale",
        action="store_true",
        help="start and retire local workers from queue depth (the deploy/ HPA's policy)",
    )
    scale.add_argument("--min-workers", type=integer(1), default=None, help="default: --workers")
    scale.add_argument(
        "--max-workers", type=integer(1), default=4, help="the most workers it starts"
    )
    scale.add_argument(
        "--target-queue", type=float, default=4.0, help="requests waiting per worker"
    )
    scale.add_argument(
        "--scale-down-window",
        type=number(0.0),
        default=60.0,
        help="seconds the fleet must want fewer workers before one is retired",
    )
    up.set_defaults(func=_cmd_up)

    d = sub.add_parser(
        "demo-model",
        help="write a small RANDOM-WEIGHT checkpoint (HF format)",
        formatter_class=DefaultsHelp,
    )
    d.add_argument("--out", required=True, help="directory to write the checkpoint into")
    d.add_argument("--preset", default="demo", choices=["tiny", "demo", "small"], help="its size")
    d.add_argument(
        "--arch",
        default="llama",
        choices=["llama", "qwen2", "mistral"],
        help="its architecture (the HF config's model_type)",
    )
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    d.set_defaults(func=_cmd_demo_model)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handlers are in place
        # (while it imports its libraries): an exit, not a traceback per process
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
