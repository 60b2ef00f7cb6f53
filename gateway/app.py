"""`breakwater gateway`: wire registry, routing, upstreams and the front ends together."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import grpc
import uvloop
from aiohttp import web
from grpc_health.v1 import health_pb2_grpc

from gateway import shared_dir
from gateway.admin.api import AdminAPI
from gateway.admin.overrides import FileStore, Overrides, RedisStore, state_dir_problem
from gateway.admission.adaptive import AdaptiveConcurrency
from gateway.admission.admission import Admission
from gateway.admission.tenants import load_settings
from gateway.dispatch import Dispatcher, DispatchSettings
from gateway.frontend.fast_http import FastFront
from gateway.frontend.grpc_api import GatewayInference
from gateway.frontend.grpc_health import GatewayHealth
from gateway.frontend.http_api import GatewayRoutes
from gateway.listen import ListenError, refuse_taken
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import GatewayMetrics
from gateway.process_group import READY_LINE, Siblings, die_with_parent, sibling_settings
from gateway.registry.base import Registry, WorkerInfo
from gateway.registry.dynamic import DynamicRegistry
from gateway.resilience.breaker_sync import BreakerSync, SiblingBreakerSync
from gateway.routing.cache_views import CacheWatcher
from gateway.routing.decision_share import RedisShare, SiblingShare, bind_sockets, child_env
from gateway.routing.policy import Router
from gateway.routing.token_keys import TokenizerStore
from gateway.settings import GatewaySettings
from gateway.shadow import Shadows
from gateway.shutdown import STEP_S, Step, run_steps
from gateway.upstream.base import Upstream
from gateway.upstream.grpc_upstream import GrpcUpstream
from gateway.upstream.openai_http import RELAY_KIND, OpenAIHTTPUpstream
from proto.limits import DEFAULT_LIMITS
from proto.openai_compat import OpenAIError
from serving.framing_errors import answer_errors_in_json
from serving.grpc_requests import add_inference_servicer
from serving.heap import settle
from serving.logs import configure_logging
from serving.openai_http import json_errors
from serving.slow_clients import LISTEN_BACKLOG, ConnectionCap, fit_fd_limit
from serving.tls import ClientTLS, TLSConfigError
from serving.tracing import exporter_problem, flush_all, make_tracer

log = logging.getLogger("breakwater.gateway")
CUT_SLACK_S = 0.05
"""A cancel this close before a drain's end is taken for the drain's (timers are not exact)."""


def make_upstream(info: WorkerInfo, tls: ClientTLS | None = None) -> Upstream:
    if info.kind == "openai-http":
        return OpenAIHTTPUpstream(info.worker_id, info.address, tls)
    if info.kind == RELAY_KIND:
        return OpenAIHTTPUpstream(info.worker_id, info.address, tls, system_roots=False)
    return GrpcUpstream(info.worker_id, info.address, tls)


def build_admission(settings: GatewaySettings) -> Admission:
    """The config file's limits, with CLI overrides and the gateway's Redis for buckets."""
    path = settings.admission_config
    try:
        config = load_settings(path)
    except OSError as e:  # a missing or unreadable file: name the flag and the file
        raise ValueError(f"--admission-config {path}: {e.strerror or e}") from None
    except ValueError as e:
        text = str(e)
        if path is not None:
            where = "" if text.startswith(str(path)) else f" {path}"
            raise ValueError(f"--admission-config{where}: {text}") from None
        raise
    limits = config.global_limits
    if settings.max_in_flight is not None:
        limits = replace(limits, max_in_flight=settings.max_in_flight)
    if settings.max_queue is not None:
        limits = replace(limits, max_queue=settings.max_queue)
    config = replace(
        config,
        global_limits=limits,
        # the flag wins over the file, as for the registry and the admin store (the file's
        # won here alone, so buckets and registry could use two different Redis servers)
        redis_url=settings.redis_url or config.redis_url,
        require_keys=config.require_keys or settings.require_api_keys,
    )
    if settings.processes > 1 and not config.redis_url and settings.process_index == 0:
        quotas = [config.defaults, *(t.quota for t in config.tenants)]
        if any(
            q.requests_per_second or q.tokens_per_second or q.max_concurrent for q in quotas
        ) or (limits.requests_per_second or limits.tokens_per_second):
            log.warning(
                "admission limits are split among %d processes without --redis-url: a "
                "client on one connection reaches one process and gets 1/%d of its rate; "
                "give the gateway a Redis for exact limits",
                settings.processes,
                settings.processes,
            )
    return Admission(config, processes=settings.processes, index=settings.process_index)


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.front_tls = settings.front_tls()
        self.upstream_tls = settings.upstream_tls()
        self.registry: DynamicRegistry
        dispatcher_ref: list[Dispatcher] = []

        def upstream_for(info: WorkerInfo) -> Upstream:
            return dispatcher_ref[0].upstream_for(info)

        base: Registry
        if settings.redis_url and not settings.workers:
            from gateway.registry.redis_backend import RedisRegistry

            base = RedisRegistry(
                settings.redis_url,
                probe=lambda info: upstream_for(info).probe(info),
                probe_interval=settings.health_interval_s,
            )
        else:
            from gateway.registry.embedded import EmbeddedRegistry

            base = EmbeddedRegistry(settings.workers, upstream_for, settings.health_interval_s)
            if not settings.workers and settings.process_index == 0:
                log.warning(
                    "no --worker and no --redis-url: every request is a 503 until workers "
                    "are added through the admin API (POST /admin/upstreams)"
                )
        # plus what operators register at run time (the admin API), minus what they remove
        self.registry = DynamicRegistry(base, upstream_for, settings.health_interval_s)
        self.router = router = Router(
            settings.routing,
            settings.model_routing,
            settings.sticky_sessions,
            settings.balance_rel,
            settings.balance_abs,
            settings.cache_threshold,
            settings.miss_weight,
        )
        policy = router.prefix_aware()
        self.share: SiblingShare | RedisShare | None = None
        if policy is not None:
            # With Redis, one channel reaches siblings and other gateways alike.
            self.share = (
                RedisShare(settings.redis_url, policy.learn)
                if settings.redis_url
                else SiblingShare.from_env(policy.learn)
            )
            policy.share = self.share.publish if self.share else None
            policy.tokenizers = TokenizerStore(settings.tokenizers)
        self.cache_watcher: CacheWatcher | None = None
        if policy is not None and settings.watch_caches:
            self.cache_watcher = CacheWatcher(self.registry, tls=self.upstream_tls)
            policy.views = self.cache_watcher.views
            tokenizers = policy.tokenizers
            if tokenizers is not None:
                # Load a reporting worker's tokenizer now, not at the first request: until
                # it is loaded this gateway routes on text keys, which cannot match the
                # token keys that other gateways (or sibling processes) share.
                self.cache_watcher.on_snapshot = lambda v: tokenizers.get(v.model_id, v.tokenizer)
        self.dispatcher = Dispatcher(
            self.registry,
            router,
            functools.partial(make_upstream, tls=self.upstream_tls),
            DispatchSettings(
                max_attempts=settings.max_attempts,
                ttft_timeout_s=settings.ttft_timeout_s,
                idle_timeout_s=settings.idle_timeout_s,
                retry_budget_ratio=settings.retry_budget,
                relay_to_workers=settings.relay_to_workers,
                forward_token_ids=settings.forward_token_ids,
            ),
        )
        dispatcher_ref.append(self.dispatcher)
        if self.share is not None and policy is not None:
            # every decision bounded by the whole fleet's load, new prefixes placed by the
            # whole fleet's new cache content
            self.share.local_loads = self.dispatcher.outstanding
            self.dispatcher.loads_changed = self.share.loads_changed
            self.dispatcher.remote_loads = self.share.remote.totals
            self.share.content = policy.learn_content
            self.share.new_content = policy.take_content
        self.admission = build_admission(settings)
        self.concurrency = self.dispatcher.concurrency = AdaptiveConcurrency()
        self._fleet_task: asyncio.Task[None] | None = None
        self.app = web.Application(middlewares=[json_errors])
        routes = GatewayRoutes(
            self.dispatcher,
            settings.request_timeout_s,
            settings.max_request_timeout_s,
            self.admission,
        )
        routes.process.update(index=settings.process_index, processes=settings.processes)
        routes.share = self.share
        routes.session_header = settings.session_header
        routes.allowed_origins = frozenset(settings.allowed_origins)
        routes.body_timeout_s = settings.client_body_timeout_s or None
        routes.send_watch.timeout_s = settings.send_timeout_s
        if self.cache_watcher is not None:
            routes.cache_views = self.cache_watcher.views
        routes.add_to(self.app)
        self.metrics = GatewayMetrics(
            self._metric_sources, self._metric_gauges, settings.gpu_hour_price, settings.request_log
        )
        self.metrics.index = settings.process_index
        self.metrics.serves = self.dispatcher.has_model
        tracer = make_tracer(settings.trace_exporter, "breakwater-gateway")
        routes.tracer = self.dispatcher.tracer = tracer
        routes.on_finished = self.metrics.finished
        self.overrides = Overrides(
            RedisStore(settings.redis_url)
            if settings.redis_url
            else FileStore(settings.state_dir, durable=True)
            if settings.state_dir
            # run_gateway always sets the shared directory; a private one otherwise, never a
            # common /tmp file that unrelated gateways on the host would share
            else FileStore(os.environ.get(shared_dir.ENV) or tempfile.mkdtemp(prefix="bw-admin-"))
        )
        self.shadows = Shadows(self.dispatcher)
        routes.shadows = self.shadows
        self.dispatcher.blocked = self.overrides.blocked
        self.dispatcher.weights = lambda: self.overrides.weights
        self.dispatcher.resolve_model = self.overrides.resolve
        self.overrides.listeners.append(self._apply_overrides)
        self.dispatcher.model_aliases = lambda: self.overrides.splits.keys()
        self.tell_siblings: Callable[[], None] = lambda: None
        """After an admin change: make the other processes re-read the overrides now."""
        self.admin_runner: web.AppRunner | None = None
        self.admin_url: str | None = None
        self.app.router.add_get("/metrics", self._metrics)
        self.routes = routes
        self.breaker_sync: BreakerSync | SiblingBreakerSync | None = None
        if settings.redis_url:
            self.breaker_sync = BreakerSync(
                settings.redis_url, self.dispatcher.breakers, pools=self.dispatcher.pools_of
            )
        elif settings.processes > 1 and (directory := os.environ.get(shared_dir.ENV)):
            self.breaker_sync = SiblingBreakerSync(
                directory,
                settings.process_index,
                settings.processes,
                self.dispatcher.breakers,
                pools=self.dispatcher.pools_of,
            )
        self.runner: web.AppRunner | None = None
        self.connections: ConnectionCap | None = None
        self.grpc_front: GatewayInference | None = None
        self.fast_front: FastFront | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.grpc_health: GatewayHealth | None = None
        self.http_port = 0
        self.grpc_port: int | None = None

    def _follow_fleet(self) -> None:
        """Admission's limits from the replicas now ready (see admission/adaptive.py)."""
        workers = self.registry.workers()
        self.concurrency.sync(workers, self.dispatcher.outstanding)
        ready = [w.worker_id for w in self.dispatcher.healthy()]
        self.admission.follow_fleet(self.concurrency.total(ready), self.concurrency.wait_budgets())

    async def _fleet_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self._follow_fleet()

    def _apply_overrides(self) -> None:
        """An operator changed something: follow it (registered upstreams, ...).

        Each consumer on its own: one that raises is logged and the others still follow, so
        a bad entry (a quota that overflowed once) cannot keep a revoked key working or a
        deregistered upstream in use for every later change."""
        o = self.overrides
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("API keys", lambda: self.admission.tenants.set_runtime_keys(o.keys)),
            ("upstreams", lambda: self.registry.apply(o.upstreams)),
            ("shadows", lambda: self.shadows.configure(o.shadows)),
            ("quotas", lambda: self.admission.set_quotas(o.quotas)),
            (
                "upstream pruning",
                lambda: self.dispatcher.prune_upstreams(
                    {w.worker_id for w in self.registry.workers()}
                ),
            ),
        )
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("applying the admin overrides' %s failed", what)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.metrics.render)  # reads siblings' files
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    def _metric_sources(self) -> dict[str, Mapping[str, float]]:
        d = self.dispatcher.counters
        upstream = dict(d)
        upstream["retries"] = max(0, d["attempts"] - d["requests"])
        policy = self.router.prefix_aware()
        return {
            "admission": self.admission.counts,
            "retry_advice": self.admission.retry_advice,
            "upstream": upstream,
            "routing": policy.stats if policy is not None else {},
            "routing_decisions": policy.decisions if policy is not None else {},
            "client_disconnects": {
                "": self.routes.client_disconnects
                + (self.grpc_front.client_disconnects if self.grpc_front else 0)
            },
            "connections_refused": {"": cap.refused if (cap := self.connections) else 0},
            "shadow": self.shadows.counts,
        }

    def _metric_gauges(self) -> dict[str, Any]:
        limiter = self.admission.limiter
        return {
            "in_flight": limiter.in_flight,
            "queued": limiter.queued,
            "outstanding": dict(self.dispatcher.outstanding),
            "breakers": {w: b["state"] for w, b in self.dispatcher.breakers.snapshot().items()},
            "ready": {w.worker_id: w.ready for w in self.registry.workers()},
        }

    def _is_tenant_key(self, authorization: str | None) -> bool:
        tenants = self.admission.tenants
        if tenants.default is not None:  # no keys configured: nothing is a tenant's key
            return False
        try:
            tenants.authenticate(authorization)
        except OpenAIError:
            return False
        return True

    @property
    def scheme(self) -> str:
        return "http" if self.front_tls is None else "https"

    def _ssl_context(self) -> ssl.SSLContext | None:
        return None if self.front_tls is None else self.front_tls.ssl_context()

    async def _start_admin(self) -> None:
        s = self.settings
        if s.admin_port is None or s.process_index != 0:
            return
        api = AdminAPI(
            s.admin_token,
            self.overrides,
            self.routes.workers_view,
            lambda: {w.worker_id for w in self.registry.workers()},
            self._is_tenant_key,
            lambda: {m for w in self.registry.workers() for m in w.models},
            lambda: self.tell_siblings(),
            self.metrics.render,
            admission=self.admission,
            shadows=self.shadows,
            fleet_workers=lambda: {w.worker_id for w in self.registry.base.workers()},
        )
        self.admin_runner = web.AppRunner(
            api.app(), access_log=None, keepalive_timeout=s.keepalive_timeout_s
        )
        await self.admin_runner.setup()
        answer_errors_in_json(self.admin_runner)
        host = s.admin_host or s.host
        site = web.TCPSite(
            self.admin_runner,
            host,
            s.admin_port,
            ssl_context=self._ssl_context(),
            backlog=LISTEN_BACKLOG,
        )
        await site.start()
        port = self.admin_runner.addresses[0][1]
        self.admin_url = f"{self.scheme}://{host}:{port}"
        if not s.admin_token:
            log.warning("no --admin-token: the admin listener on %s refuses every call", port)

    async def start(self) -> None:
        await self.metrics.start()
        await self.overrides.start()
        # process 0 signals an admin change; re-read at once rather than at the next poll
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.overrides.refresh_soon)
        if self.share is not None:
            await self.share.start()
        await self.admission.start()
        await self.registry.start()
        self._follow_fleet()
        self._fleet_task = asyncio.create_task(self._fleet_loop())
        self.concurrency.loop_lag.start()
        if self.breaker_sync is not None:
            await self.breaker_sync.start()
        if self.cache_watcher is not None:
            await self.cache_watcher.start()
        # handler_cancellation: a client that disconnects cancels its handler, and with it
        # the upstream call (aiohttp leaves this off by default).
        # keepalive_timeout: aiohttp's timer also closes a connection that has not sent a
        # complete request head in that time (its default is an hour).
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            access_log=None,
            keepalive_timeout=self.settings.keepalive_timeout_s,
            # aiohttp waits this long for its handlers, then as long again after cancelling
            # them (a streaming handler goes on writing), and takes 0 as no limit: half the
            # drain, never 0, so --drain-timeout is the streams' whole time on this server too
            shutdown_timeout=max(self.settings.drain_timeout_s / 2, 0.001),
            auto_decompress=False,  # read_body decompresses, bounded (serving/openai_http.py)
        )
        await self.runner.setup()
        answer_errors_in_json(self.runner)
        assert self.runner.server is not None
        self.connections = ConnectionCap(
            self.runner.server, fit_fd_limit(self.settings.max_connections)
        )
        shared = self.settings.processes > 1  # SO_REUSEPORT: siblings serve the same port
        first = self.settings.process_index == 0  # siblings join the ports it checked
        try:
            if first:
                refuse_taken(self.settings.host, self.settings.port)
            await self._listen_http(shared)
        except OSError as e:
            raise ListenError("HTTP", self.settings.host, self.settings.port, e) from None
        if self.settings.grpc_port is not None:
            try:
                if first:
                    refuse_taken(self.settings.host, self.settings.grpc_port)
                await self._listen_grpc(shared)
            except (OSError, RuntimeError) as e:  # grpc: RuntimeError("Failed to bind ...")
                raise ListenError("gRPC", self.settings.host, self.settings.grpc_port, e) from None
        try:
            await self._start_admin()
        except OSError as e:
            s = self.settings
            raise ListenError("admin", s.admin_host or s.host, s.admin_port or 0, e) from None

    async def _listen_http(self, shared: bool) -> None:
        ssl_context = self._ssl_context()
        if self.settings.http_server == "fast" and ssl_context is None:
            hot = {
                b"/v1/completions": self.routes.completions,
                b"/v1/chat/completions": self.routes.chat,
            }
            self.fast_front = FastFront(
                hot,
                self.runner.server,
                self.connections,
                self.settings.keepalive_timeout_s,
                self.routes.limits.max_body_bytes,
            )
            self.http_port = await self.fast_front.start(
                self.settings.host, self.settings.port, reuse_port=shared or None
            )
        else:
            site = web.TCPSite(
                self.runner,
                self.settings.host,
                self.settings.port,
                reuse_port=shared or None,
                ssl_context=ssl_context,
                backlog=LISTEN_BACKLOG,
            )
            await site.start()
            self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _listen_grpc(self, shared: bool) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", int(shared)),
                # a Generate request is bounded like an HTTP body (413 there) by the
                # servicer's check; grpc's limit, above it, only bounds memory
                ("grpc.max_receive_message_length", 4 * DEFAULT_LIMITS.max_body_bytes),
            ]
        )
        s = self.settings
        front = GatewayInference(
            self.dispatcher, s.request_timeout_s, self.admission, s.max_request_timeout_s
        )
        self.grpc_front = front
        front.session_header = self.settings.session_header.lower()
        front.on_finished = self.metrics.finished
        front.tracer = self.dispatcher.tracer
        add_inference_servicer(front, server, DEFAULT_LIMITS.max_body_bytes)
        self.grpc_health = GatewayHealth(self.dispatcher)
        health_pb2_grpc.add_HealthServicer_to_server(self.grpc_health, server)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        self.grpc_port = (
            server.add_secure_port(address, self.front_tls.grpc_credentials())
            if self.front_tls is not None
            else server.add_insecure_port(address)
        )
        await server.start()
        self.grpc_server = server  # stop() stops only a started server

    async def stop(self) -> list[str]:
        """Stop serving, let requests in flight finish (up to --drain-timeout), release the rest.
        Returns the steps that did not finish in their time (gateway/shutdown.py)."""
        if self._fleet_task is not None:
            self._fleet_task.cancel()
        self.concurrency.loop_lag.stop()
        drain = self.settings.drain_timeout_s
        # What is still in flight when a door's drain ends is cut (aiohttp cancels its
        # handlers after half of it, see the runner): logged and counted as 503s, not 499s
        now = time.monotonic()
        self.routes.cut_from = now + drain / 2 - CUT_SLACK_S
        if self.grpc_front is not None:
            self.grpc_front.cut_from = now + drain - CUT_SLACK_S
        doors: list[Step] = []  # drain at once: a gRPC stream gets the time an HTTP one does
        if self.grpc_health is not None:
            self.grpc_health.stopping = True
        if self.grpc_server is not None:
            stop_grpc = functools.partial(self.grpc_server.stop, drain)
            doors.append(("grpc server", stop_grpc, drain + STEP_S))
        if self.fast_front is not None:
            shut = functools.partial(self.fast_front.shutdown, drain)
            doors.append(("http front door", shut, drain + STEP_S))
        if self.runner is not None:
            doors.append(("http server", self.runner.cleanup, drain + STEP_S))
        steps: list[Step | list[Step]] = [doors]
        if self.breaker_sync is not None:
            steps.append(("breaker sync", self.breaker_sync.close, STEP_S))
        if self.cache_watcher is not None:
            steps.append(("cache watcher", self.cache_watcher.close, STEP_S))
        steps.append(("metrics", self.metrics.close, STEP_S))
        if self.admin_runner is not None:
            steps.append(("admin listener", self.admin_runner.cleanup, STEP_S))
        steps += [
            ("overrides", self.overrides.close, STEP_S),
            ("shadows", self.shadows.close, STEP_S),
            ("registry", self.registry.close, STEP_S),
            ("dispatcher", self.dispatcher.close, STEP_S),
            ("admission", self.admission.close, STEP_S),
        ]
        if self.share is not None:
            steps.append(("routing share", self.share.close, STEP_S))
        return await run_steps(steps)


async def _serve(settings: GatewaySettings, own_dir: str | None) -> int:
    share_socks = None
    group = settings.processes > 1 and settings.process_index == 0
    prefix_aware = "prefix-aware" in {settings.routing, *settings.model_routing.values()}
    if group and prefix_aware and not settings.redis_url:
        share_socks = bind_sockets(settings.processes)
        os.environ.update(child_env(share_socks, 0, dup=True))  # Gateway reads it back
    try:  # a bad setting or config file (admission, a Redis URL): one line, not a traceback
        gw = Gateway(settings)
    except (ValueError, OSError) as e:
        print(f"breakwater gateway: {e}", file=sys.stderr, flush=True)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Not a forced exit on a second signal: a terminal's Ctrl-C reaches every process of
    # `breakwater up` and of a gateway's process group, and their parents' SIGTERM follows.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await gw.start()
    except ListenError as e:  # a taken port: one line, not a traceback
        print(f"breakwater gateway: {e}", file=sys.stderr, flush=True)
        await gw.stop()
        return 1
    siblings = None
    if group:
        siblings = Siblings(settings, gw.http_port, gw.grpc_port, share_socks)
        try:
            await siblings.start()
        except (RuntimeError, TimeoutError) as e:  # one died or hung while starting
            print(f"breakwater gateway: {str(e) or 'a process did not start'}", file=sys.stderr,
                  flush=True)  # fmt: skip
            await asyncio.gather(siblings.stop(), gw.stop())
            return 1
        gw.tell_siblings = siblings.notify
    grpc_part = f" grpc={settings.host}:{gw.grpc_port}" if gw.grpc_port else ""
    admin_part = f" admin={gw.admin_url}" if gw.admin_url else ""
    settle()  # the heap startup built is kept out of every collection from now on
    print(
        f"{READY_LINE} http={gw.scheme}://{settings.host}:{gw.http_port}{grpc_part}{admin_part}"
        f" processes={settings.processes}",
        flush=True,
    )
    await stop.wait()
    # operators watch a rollout in the log: a drain that starts and ends there
    draining = time.monotonic()
    log.info(
        "draining: new connections refused, requests in flight get up to %g s",
        settings.drain_timeout_s,
    )
    if siblings is not None:
        _, left = await asyncio.gather(siblings.stop(), gw.stop())
    else:
        left = await gw.stop()
    log.info("drained in %.1f s", time.monotonic() - draining)
    if left:  # the loop's own cleanup would wait for them too: leave without it
        log.error("exiting with %s unfinished", ", ".join(left))
        shared_dir.remove(own_dir)
        flush_all()
        logging.shutdown()
        os._exit(1)
    return 0


def run_gateway(settings: GatewaySettings) -> int:
    # SIGUSR1 means "re-read the overrides" once the loop runs; until then it must not
    # kill a process that is still starting (its default action).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:  # before anything starts: a bad file is one line on stderr, not a traceback
        settings.front_tls()
        settings.upstream_tls()
    except TLSConfigError as e:
        print(f"breakwater gateway: {e}", file=sys.stderr, flush=True)
        return 2
    problem = exporter_problem(settings.trace_exporter)
    if problem is None and settings.state_dir and not settings.redis_url:
        problem = state_dir_problem(settings.state_dir)
    if problem is not None:
        print(f"breakwater gateway: {problem}", file=sys.stderr, flush=True)
        return 2
    own_dir = shared_dir.ensure()
    try:
        return _run(settings, own_dir)
    finally:
        shared_dir.remove(own_dir)


def _run(settings: GatewaySettings, own_dir: str | None) -> int:
    configure_logging()
    # uvloop: about twice the request rate of asyncio's own loop on this path (peer_bench).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(settings, own_dir))


if __name__ == "__main__":  # a sibling process started by process 0 (see process_group)
    sys.exit(run_gateway(sibling_settings()) if die_with_parent() else 0)
