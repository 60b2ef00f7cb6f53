"""Gateway settings: one typed object, from CLI flags with BREAKWATER_GATEWAY_* env defaults."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.registry.specs import check_address
from gateway.shutdown import DRAIN_S
from serving.cli_types import choice, env_default, integer, model_pair, number, port

if TYPE_CHECKING:  # grpc loads only when a gateway runs, not for `breakwater --help`
    from serving.tls import ClientTLS, ServerTLS


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"BREAKWATER_GATEWAY_{name}", default)


def _env_default(name: str, fallback: str | None = None) -> str | None:
    """BREAKWATER_GATEWAY_<name> as a flag default, left for the flag's type to convert."""
    return env_default(f"BREAKWATER_GATEWAY_{name}", fallback)


ROUTING_POLICIES = ("round-robin", "least-outstanding", "prefix-aware")
HTTP_SERVERS = ("fast", "aiohttp")


def _env_on(name: str) -> bool:
    """An on-by-default switch: off only for 0, false or no."""
    return _env(name, "1") not in ("0", "false", "no")


@dataclass
class GatewaySettings:
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int | None = None
    workers: list[str] = field(default_factory=list)
    """Static upstreams for the embedded registry: host:port (gRPC) or http://... (OpenAI)."""
    redis_url: str | None = None
    routing: str = "prefix-aware"
    model_routing: dict[str, str] = field(default_factory=dict)
    """Per-model policy overrides (model -> policy); other models use `routing`."""
    balance_rel: float = 1.5
    balance_abs: float = 8.0
    """prefix-aware and sticky sessions pass over a replica busier than rel x the least
    loaded + abs requests (this gateway's calls in flight)."""
    cache_threshold: float = 0.3
    """prefix-aware: a prompt no replica holds this share of is placed as a new one."""
    miss_weight: float = 3.0
    """prefix-aware: a missing prompt token's cost against a queued one's."""
    sticky_sessions: bool = False
    """Keep a session's requests on one replica (key: `session_header`, or OpenAI `user`)."""
    session_header: str = "X-Session-Id"
    admin_host: str | None = None
    """Where the admin listener binds (default: --host)."""
    admin_port: int | None = 0
    """The admin listener's port (0: any free one, announced in the READY line); None: off."""
    admin_token: str | None = None
    """The bearer token the admin API requires (BREAKWATER_ADMIN_TOKEN)."""
    trace_exporter: str = "none"
    """OpenTelemetry spans: none, console, otlp or file:PATH (serving.tracing)."""
    request_log: bool = False
    """One JSON line per request on the `breakwater.requests` logger (no prompt text)."""
    gpu_hour_price: float = 0.0
    """$ per replica-hour, for the cost metric (0: no cost metric)."""
    watch_caches: bool = True
    """Follow Breakwater workers' prefix caches (WatchCache) for exact prefix-aware scores."""
    relay_to_workers: bool = True
    """HTTP clients' OpenAI streams go to a Breakwater worker's own OpenAI port, as is."""
    forward_token_ids: bool = True
    """Send the prompt's token ids routing computed to workers with the same tokenizer."""
    tokenizers: dict[str, str] = field(default_factory=dict)
    """model -> tokenizer directory, so prefix-aware routing works on the workers' tokens."""
    request_timeout_s: float = 600.0
    """Default overall deadline; callers may set their own (X-Request-Timeout-Ms, gRPC)."""
    max_request_timeout_s: float = 3600.0
    ttft_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    max_attempts: int = 3
    retry_budget: float = 0.2
    health_interval_s: float = 1.0
    admission_config: str | None = None
    """TOML (or JSON) file with tenants, API key digests and quotas."""
    allowed_origins: tuple[str, ...] = ()
    """Origins whose browser scripts may call the public API (CORS); "*": any."""
    state_dir: str | None = None
    """Without Redis: where admin changes are kept, to survive a restart (None: the run's
    temporary directory, gone when the gateway stops)."""
    require_api_keys: bool = False
    """Refuse requests without a valid API key even while no key exists yet (fail closed)."""
    max_in_flight: int | None = None
    max_queue: int | None = None
    keepalive_timeout_s: float = 75.0
    """Idle keep-alive connections close after this, and a connection must send a complete
    request head within it (slowloris); nginx's keepalive_timeout."""
    drain_timeout_s: float = DRAIN_S
    """How long a stopping gateway lets requests in flight finish, on every front door."""
    client_body_timeout_s: float = 60.0
    """A request body must arrive whole within this of its head (408 past it; 0: never)."""
    send_timeout_s: float = 60.0
    """A response whose client has read nothing for this long is closed, and its upstream
    call cancelled (0: never)."""
    max_connections: int = 4096
    """Per process: one past it is answered 503 and closed (file descriptors are finite)."""
    http_server: str = "fast"
    """`fast`: the two model routes' usual requests on gateway/frontend/fast_http.py, the
    rest on aiohttp; `aiohttp`: everything on aiohttp. With TLS, always aiohttp."""
    processes: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Event-loop processes serving one port (SO_REUSEPORT); limits are split among them."""
    process_index: int = 0
    """0 for the first process (which starts the others), 1.. for the others."""
    tls_cert: str | None = None
    tls_key: str | None = None
    """PEM files: serve the HTTP, gRPC and admin listeners over TLS (1.2 or newer)."""
    tls_client_ca: str | None = None
    """Require callers' certificates signed by this CA (mTLS) on those listeners."""
    upstream_ca: str | None = None
    """Dial gRPC workers over TLS, verifying them against this CA (https:// upstreams too)."""
    upstream_cert: str | None = None
    upstream_key: str | None = None
    """The gateway's client certificate for workers that require one (mTLS)."""

    def front_tls(self) -> ServerTLS | None:
        """The listeners' TLS, loaded and checked (TLSConfigError if a file does not fit)."""
        from serving.tls import ServerTLS

        return ServerTLS.from_files(self.tls_cert, self.tls_key, self.tls_client_ca)

    def upstream_tls(self) -> ClientTLS | None:
        """TLS to workers when any --upstream-* file is given; None: plaintext gRPC."""
        from serving.tls import ClientTLS

        return ClientTLS.from_files(self.upstream_ca, self.upstream_cert, self.upstream_key)


def worker_spec(text: str) -> str:
    """`--worker`: checked here, so a typo stops the gateway instead of never turning healthy."""
    try:
        return check_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address the listeners bind")
    p.add_argument(
        "--port",
        type=port(),
        default=_env_default("PORT", "8080"),
        help="HTTP port of the OpenAI API (0: any free port, printed when ready)",
    )
    p.add_argument("--grpc-port", type=port(), default=None, help="also serve gRPC Generate")
    p.add_argument(
        "--worker",
        action="append",
        type=worker_spec,
        default=[],
        dest="workers",
        help="upstream: host:port of a Breakwater worker, or http://host:port of an "
        "OpenAI-compatible server (repeatable; embedded registry)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("BREAKWATER_REDIS_URL"),
        help="share state with other gateways through Redis (rate limits, ejections, "
        "routing), and discover workers there unless --worker lists them",
    )
    p.add_argument(
        "--routing",
        type=choice(ROUTING_POLICIES),
        default=_env_default("ROUTING", "prefix-aware"),
        choices=ROUTING_POLICIES,
        help="how a replica is chosen; prefix-aware: the one most likely to hold the prompt's "
        "prefix in its KV cache, among those not much busier than the least loaded",
    )
    p.add_argument(
        "--model-routing",
        action="append",
        type=model_pair("POLICY", ROUTING_POLICIES),
        default=[],
        metavar="MODEL=POLICY",
        help="a routing policy for one model (repeatable); other models use --routing",
    )
    p.add_argument(
        "--balance-rel",
        type=number(1.0),
        default=_env_default("BALANCE_REL", "1.5"),
        help="prefix-aware/sticky: skip a replica with more than REL x the least loaded's "
        "calls in flight + --balance-abs (>= 1)",
    )
    p.add_argument(
        "--balance-abs",
        type=number(0.0),
        default=_env_default("BALANCE_ABS", "8"),
        help="see --balance-rel (>= 0)",
    )
    p.add_argument(
        "--cache-threshold",
        type=number(0.0, 1.0),
        default=_env_default("CACHE_THRESHOLD", "0.3"),
        help="prefix-aware: a prompt no replica holds this share of is placed as new, on the "
        "replica with the most cache room (SGLang's --cache-threshold; 0..1)",
    )
    p.add_argument(
        "--miss-weight",
        type=number(0.0, low_open=True),
        default=_env_default("MISS_WEIGHT", "3"),
        help="prefix-aware: what a prompt token the replica lacks costs against one already "
        "queued there (> 0; higher keeps prompts with their prefix longer)",
    )
    p.add_argument(
        "--sticky-sessions",
        action=argparse.BooleanOptionalAction,
        default=(_env("STICKY_SESSIONS", "") or "").lower() in ("1", "true", "yes"),
        help="keep a session's requests on one replica (while it is not much busier than "
        "the least loaded); the key is the --session-header, else the body's `user`",
    )
    p.add_argument(
        "--session-header",
        default=_env("SESSION_HEADER", "X-Session-Id"),
        help="HTTP header (gRPC metadata, lower-cased) carrying the session key",
    )
    p.add_argument(
        "--admin-host", default=_env("ADMIN_HOST"), help="admin listener address (default: --host)"
    )
    p.add_argument(
        "--admin-port",
        type=port(allow_off=True),
        default=_env_default("ADMIN_PORT", "0"),
        help="admin listener port (operators' API: workers, drain, eject, audit); 0: any "
        "free port, announced at start; -1: no admin listener",
    )
    p.add_argument(
        "--admin-token",
        default=os.environ.get("BREAKWATER_ADMIN_TOKEN"),
        help="bearer token the admin API requires (prefer BREAKWATER_ADMIN_TOKEN: "
        "arguments are visible to other local users); without one, the admin API refuses all",
    )
    p.add_argument(
        "--trace-exporter",
        default=os.environ.get("BREAKWATER_TRACE_EXPORTER", "none"),
        help="OpenTelemetry traces: none (default), console, otlp (OTEL_EXPORTER_OTLP_* "
        "variables), or file:PATH (JSON lines)",
    )
    p.add_argument(
        "--request-log",
        action=argparse.BooleanOptionalAction,
        default=(_env("REQUEST_LOG", "") or "").lower() in ("1", "true", "yes"),
        help="log one JSON line per request: id, tenant, model, replica, tokens, TTFT, "
        "latency, status, attempts (never the prompt)",
    )
    p.add_argument(
        "--gpu-hour-price",
        type=number(0.0),
        default=_env_default("GPU_HOUR_PRICE", "0"),
        help="$ per replica-hour: /metrics then counts breakwater_cost_dollars per tenant",
    )
    p.add_argument(
        "--watch-caches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefix-aware: follow each Breakwater worker's prefix cache (WatchCache) and "
        "score replicas on what they hold, not only on what was sent to them",
    )
    p.add_argument(
        "--relay-to-workers",
        action=argparse.BooleanOptionalAction,
        default=_env_on("RELAY_TO_WORKERS"),
        help="send HTTP clients' OpenAI streams to a Breakwater worker's OpenAI port (its "
        "--http-port) as they came and pass its SSE bytes back, rather than over gRPC as "
        "deltas; gRPC still carries health, stats, cache reports and gRPC clients' calls",
    )
    p.add_argument(
        "--forward-token-ids",
        action=argparse.BooleanOptionalAction,
        default=_env_on("FORWARD_TOKEN_IDS"),
        help="send a prompt's token ids, as prefix-aware routing computed them, with the "
        "request to a Breakwater worker that reports the same tokenizer (fingerprint), so "
        "it does not render and tokenize the prompt again",
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        type=model_pair("DIR", directory=True),
        default=[],
        dest="tokenizers",
        metavar="MODEL=DIR",
        help="the model's tokenizer directory, for routing on the workers' own token "
        "blocks (default: the directory a worker on this host reports)",
    )
    p.add_argument(
        "--request-timeout",
        type=number(0.0, low_open=True),
        default=600.0,
        help="default overall deadline per request, seconds",
    )
    p.add_argument(
        "--max-request-timeout",
        type=number(0.0, low_open=True),
        default=3600.0,
        help="seconds: the most a client may ask for with X-Request-Timeout-Ms (or a gRPC "
        "deadline); longer asks are cut to it",
    )
    p.add_argument(
        "--ttft-timeout",
        type=number(0.0, low_open=True),
        default=60.0,
        help="per attempt: seconds to the first token before retrying elsewhere",
    )
    p.add_argument(
        "--idle-timeout",
        type=number(0.0, low_open=True),
        default=60.0,
        help="seconds allowed between tokens once streaming",
    )
    p.add_argument(
        "--max-attempts",
        type=integer(1),
        default=3,
        help="replicas a request may try before its first token (retries are also bounded "
        "by --retry-budget)",
    )
    p.add_argument(
        "--retry-budget",
        type=number(0.0),
        default=0.2,
        help="retries may add at most this share of extra attempts",
    )
    p.add_argument(
        "--health-interval",
        type=number(0.0, low_open=True),
        default=1.0,
        help="seconds between health and load probes of each --worker",
    )
    p.add_argument(
        "--admission-config",
        default=_env("ADMISSION_CONFIG"),
        help="tenants, API key digests and quotas (TOML or JSON)",
    )
    p.add_argument(
        "--allowed-origins",
        default="",
        metavar="ORIGINS",
        help="comma-separated origins (https://app.example.com) whose browser scripts may "
        "call the API (CORS), or * for any; default: none",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="without --redis-url: keep admin changes (drains, weights, splits, upstreams, "
        "keys made or revoked) in DIR so they survive a restart; by default they last "
        "until the gateway stops",
    )
    p.add_argument(
        "--require-api-keys",
        action="store_true",
        default=_env("REQUIRE_API_KEYS", "") not in ("", "0", "false"),
        help="answer 401 to requests without a valid API key even while no key exists "
        "(none configured, none made through the admin API yet, or the key store not "
        "reachable at start): the gateway fails closed instead of open",
    )
    p.add_argument(
        "--max-in-flight",
        type=integer(1),
        default=None,
        help="requests the gateway forwards at once (overrides the config)",
    )
    p.add_argument(
        "--max-queue",
        type=integer(0),
        default=None,
        help="requests allowed to wait for a slot; beyond it, 503 at once",
    )
    p.add_argument(
        "--drain-timeout",
        type=number(0.0),
        default=DRAIN_S,
        help="seconds a SIGTERM lets requests in flight finish before they are cut (set it "
        "to your longest streams; keep the pod's grace period above it)",
    )
    p.add_argument(
        "--keepalive-timeout",
        type=number(0.0, low_open=True),
        default=75.0,
        help="seconds an idle client connection stays open; also the most a connection may "
        "take to send a complete request head",
    )
    p.add_argument(
        "--client-body-timeout",
        type=number(0.0),
        default=60.0,
        help="seconds a request body has to arrive whole (408 past them)",
    )
    p.add_argument(
        "--send-timeout",
        type=number(0.0),
        default=60.0,
        help="close a response whose client has read nothing for this many seconds, and "
        "cancel its upstream call (0: never)",
    )
    p.add_argument(
        "--max-connections",
        type=integer(1),
        default=4096,
        help="client connections per process; one more is answered 503 and closed",
    )
    p.add_argument(
        "--http-server",
        type=choice(HTTP_SERVERS),
        choices=HTTP_SERVERS,
        default=_env_default("HTTP_SERVER", "fast"),
        help="fast: the model routes' usual requests on the gateway's own HTTP/1.1 server "
        "(about a third less CPU per stream), everything else on aiohttp; aiohttp: all on "
        "aiohttp (always so with TLS)",
    )

    p.add_argument(
        "--processes",
        type=integer(0),
        default=_env_default("PROCESSES"),
        help="event-loop processes on one port (default, or 0: the number of cores)",
    )
    p.add_argument("--process-index", type=integer(0), default=0, help=argparse.SUPPRESS)

    tls = p.add_argument_group("TLS")
    tls.add_argument(
        "--tls-cert",
        default=_env("TLS_CERT"),
        metavar="FILE",
        help="PEM certificate (chain): serve HTTP, gRPC and admin over TLS; needs --tls-key",
    )
    tls.add_argument("--tls-key", default=_env("TLS_KEY"), metavar="FILE", help="its PEM key")
    tls.add_argument(
        "--tls-client-ca",
        default=_env("TLS_CLIENT_CA"),
        metavar="FILE",
        help="require callers' client certificates signed by this CA (mTLS)",
    )
    tls.add_argument(
        "--upstream-ca",
        default=_env("UPSTREAM_CA"),
        metavar="FILE",
        help="dial gRPC workers over TLS and verify them against this CA (also used for "
        "https:// upstreams, which otherwise use the system's roots)",
    )
    tls.add_argument(
        "--upstream-cert",
        default=_env("UPSTREAM_CERT"),
        metavar="FILE",
        help="client certificate for workers that require one (mTLS); turns on TLS to workers",
    )
    tls.add_argument(
        "--upstream-key", default=_env("UPSTREAM_KEY"), metavar="FILE", help="its PEM key"
    )


def _model_routing(items: list[str]) -> dict[str, str]:
    from gateway.routing.policy import POLICIES

    out: dict[str, str] = {}
    for item in items:
        model, sep, policy = item.rpartition("=")
        if not sep or not model or policy not in POLICIES:
            raise SystemExit(
                f"--model-routing {item!r}: expected MODEL=POLICY with POLICY one of "
                f"{', '.join(sorted(POLICIES))}"
            )
        out[model] = policy
    return out


def _pairs(flag: str, items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{flag} {item!r}: expected MODEL=VALUE")
        out[key] = value
    return out


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        redis_url=args.redis_url,
        routing=args.routing,
        model_routing=_model_routing(args.model_routing),
        balance_rel=args.balance_rel,
        balance_abs=args.balance_abs,
        cache_threshold=args.cache_threshold,
        miss_weight=args.miss_weight,
        sticky_sessions=args.sticky_sessions,
        session_header=args.session_header,
        admin_host=args.admin_host,
        admin_port=None if args.admin_port < 0 else args.admin_port,
        admin_token=args.admin_token,
        trace_exporter=args.trace_exporter,
        request_log=args.request_log,
        gpu_hour_price=args.gpu_hour_price,
        watch_caches=args.watch_caches,
        relay_to_workers=args.relay_to_workers,
        forward_token_ids=args.forward_token_ids,
        tokenizers=_pairs("--tokenizer", args.tokenizers),
        request_timeout_s=args.request_timeout,
        max_request_timeout_s=args.max_request_timeout,
        ttft_timeout_s=args.ttft_timeout,
        idle_timeout_s=args.idle_timeout,
        max_attempts=args.max_attempts,
        retry_budget=args.retry_budget,
        health_interval_s=args.health_interval,
        admission_config=args.admission_config,
        state_dir=args.state_dir,
        allowed_origins=tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip()),
        require_api_keys=args.require_api_keys,
        max_in_flight=args.max_in_flight,
        max_queue=args.max_queue,
        keepalive_timeout_s=args.keepalive_timeout,
        drain_timeout_s=args.drain_timeout,
        client_body_timeout_s=args.client_body_timeout,
        send_timeout_s=args.send_timeout,
        max_connections=args.max_connections,
        http_server=args.http_server,
        processes=max(1, args.processes or os.cpu_count() or 1),
        process_index=args.process_index,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        upstream_ca=args.upstream_ca,
        upstream_cert=args.upstream_cert,
        upstream_key=args.upstream_key,
    )
