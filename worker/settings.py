"""Worker settings: one typed object, from CLI flags with BREAKWATER_WORKER_* env defaults."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.cli_types import choice, env_default, integer, number, port
from worker.engine.config import EngineConfig, parse_bytes

if TYPE_CHECKING:
    from serving.tls import ServerTLS


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"BREAKWATER_WORKER_{name}", default)


def _env_default(name: str, fallback: str | None = None) -> str | None:
    """BREAKWATER_WORKER_<name> as a flag default, left for the flag's type to convert."""
    return env_default(f"BREAKWATER_WORKER_{name}", fallback)


ENGINES = ("torch", "sim", "vllm")


def byte_size(text: str) -> str:
    """An argparse type: a memory size parse_bytes reads (512MiB, 4GiB, a byte count) and
    more than zero, kept as text (engine_config_from_args and `up` pass it on as is)."""
    try:
        n = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 bytes")
    return text


@dataclass
class WorkerSettings:
    engine: str = "torch"
    """torch (ours), sim (timing model of a GPU) or vllm (adapter, imported only if chosen)."""
    engine_config: EngineConfig = field(default_factory=lambda: EngineConfig(model=""))
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int | None = None
    """Optional OpenAI-compatible HTTP port, so one worker is usable alone."""
    advertise: str | None = None
    """host:port the gateway should dial (default host:grpc_port)."""
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    redis_url: str | None = None
    heartbeat_s: float = 1.0
    registry_ttl_s: float = 3.0
    max_queue: int = 256
    """Requests allowed to wait in the engine; beyond it, RESOURCE_EXHAUSTED with pushback."""
    drain_timeout_s: float = 30.0
    fault_fail_rate: float = 0.0
    fault_code: str = "UNAVAILABLE"
    trace_exporter: str = "none"
    """OpenTelemetry spans: none, console, otlp or file:PATH (serving.tracing)."""
    """Chaos testing only: fail this share of Generate calls with UNAVAILABLE."""
    sim_preset: str = "llama3-8b-h100"
    sim_speed: float = 1.0
    sim_kv_tokens: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    """PEM files: serve gRPC (and the HTTP port) over TLS, 1.2 or newer."""
    tls_client_ca: str | None = None
    """Require callers (gateways) to present a certificate signed by this CA (mTLS)."""

    @property
    def address(self) -> str:
        return self.advertise or f"{self.host}:{self.grpc_port}"

    def server_tls(self) -> ServerTLS | None:
        """The listeners' TLS, loaded and checked (TLSConfigError if a file does not fit)."""
        from serving.tls import ServerTLS

        return ServerTLS.from_files(self.tls_cert, self.tls_key, self.tls_client_ca)


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        type=choice(ENGINES),
        choices=ENGINES,
        default=_env_default("ENGINE", "torch"),
        help="torch: the built-in paged-KV engine; sim: a model-free simulator with a "
        "real scheduler and KV accounting (load tests); vllm: vLLM, where installed",
    )
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address the listeners bind")
    p.add_argument(
        "--grpc-port",
        type=port(),
        default=_env_default("GRPC_PORT", "50051"),
        help="gRPC port (Generate, health, stats; 0: any free port, printed when ready)",
    )
    p.add_argument(
        "--http-port",
        type=port(),
        default=None,
        help="also serve the OpenAI-compatible API on this port",
    )
    p.add_argument("--advertise", default=_env("ADVERTISE"), help="host:port gateways dial")
    p.add_argument(
        "--worker-id",
        default=_env("ID"),
        help="this replica's name in the registry and metrics (default: HOSTNAME-PID)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BREAKWATER_REDIS_URL"),
        help="register here (heartbeats with load and KV usage) for gateways to discover "
        "(env BREAKWATER_REDIS_URL too)",
    )
    p.add_argument(
        "--max-queue",
        type=integer(1),
        default=_env_default("MAX_QUEUE", "256"),
        help="requests allowed to wait in the engine (>= 1); beyond it, RESOURCE_EXHAUSTED",
    )
    p.add_argument(
        "--drain-timeout",
        type=number(0.0),
        default=30.0,
        help="seconds a SIGTERM waits for requests in flight before ending them with an "
        "error (keep the pod's grace period longer)",
    )
    p.add_argument(
        "--fault-fail-rate",
        type=number(0.0, 1.0),
        default=0.0,
        help="chaos testing: fail this share of Generate calls on purpose",
    )
    p.add_argument(
        "--fault-code",
        type=choice(["UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED", "CANCELLED"]),
        default="UNAVAILABLE",
        help="chaos testing: the status of an injected failure (UNAVAILABLE: as if down; "
        "INTERNAL: a replica that is up but failing calls; RESOURCE_EXHAUSTED: as if its "
        "queue were full; CANCELLED: as if its server were stopping)",
    )
    p.add_argument(
        "--trace-exporter",
        default=os.environ.get("BREAKWATER_TRACE_EXPORTER", "none"),
        help="OpenTelemetry traces: none (default), console, otlp, or file:PATH (JSON lines)",
    )
    p.add_argument(
        "--sim-preset",
        default="llama3-8b-h100",
        help="sim engine: the model and GPU whose step times it simulates",
    )
    p.add_argument(
        "--sim-speed",
        type=number(0.0, low_open=True),
        default=1.0,
        help="sim engine: multiplies the preset's speed (0.5: steps take twice as long)",
    )
    p.add_argument(
        "--sim-kv-tokens",
        type=integer(1),
        default=None,
        help="sim engine: KV cache capacity in tokens (default: the preset's)",
    )
    tls = p.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT"),
        metavar="FILE",
        help="PEM certificate (chain): serve gRPC and --http-port over TLS; needs --tls-key",
    )
    tls.add_argument("--tls-key", default=_env("TLS_KEY"), metavar="FILE", help="its PEM key")
    tls.add_argument(
        "--tls-client-ca",
        default=_env("TLS_CLIENT_CA"),
        metavar="FILE",
        help="require client certificates signed by this CA (mTLS; gateways: --upstream-cert)",
    )


def settings_from_args(args: argparse.Namespace, engine_config: EngineConfig) -> WorkerSettings:
    s = WorkerSettings(
        engine=args.engine,
        engine_config=engine_config,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        advertise=args.advertise,
        redis_url=args.redis_url,
        max_queue=args.max_queue,
        drain_timeout_s=args.drain_timeout,
        sim_preset=args.sim_preset,
        sim_speed=args.sim_speed,
        sim_kv_tokens=args.sim_kv_tokens,
        fault_fail_rate=args.fault_fail_rate,
        fault_code=args.fault_code,
        trace_exporter=args.trace_exporter,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )
    if args.worker_id:
        s.worker_id = args.worker_id
    return s


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by `breakwater worker` and `breakwater generate`."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model",
        default=None,
        help="local Hugging Face checkpoint directory (default: the random-weight "
        "demo model, written on first use)",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients use (default: the checkpoint path)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    g.add_argument(
        "--kv-cache-memory",
        type=byte_size,
        default=None,
        help="KV cache size, e.g. 512MiB or 4GiB (default: derived from the budget)",
    )
    g.add_argument(
        "--memory-budget",
        type=byte_size,
        default=None,
        help="total memory the engine may use (weights + KV + activations)",
    )
    g.add_argument(
        "--max-model-len",
        type=integer(1),
        default=None,
        help="tokens a sequence may hold, prompt and output (default: the model's, capped "
        "by the KV cache)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=integer(1),
        default=2048,
        help="tokens one step may compute (long prompts are prefilled in chunks of it)",
    )
    g.add_argument("--max-num-seqs", type=integer(1), default=128, help="sequences running at once")
    g.add_argument("--block-size", type=integer(1), default=16, help="tokens per KV cache block")
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV blocks of prompt prefixes seen before",
    )
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vllm engine: no torch.compile or CUDA graphs (faster start, slower steps)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from worker.engine.demo_model import ensure_demo_model  # torch: only when it runs

    model = args.model or str(ensure_demo_model("demo"))
    return EngineConfig(
        model=model,
        served_model_name=args.served_model_name
        or (None if args.model else "breakwater-demo-random"),
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory=parse_bytes(args.kv_cache_memory) if args.kv_cache_memory else None,
        memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=args.enforce_eager,
    )
