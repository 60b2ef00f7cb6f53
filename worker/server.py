"""`breakwater worker`: host an engine behind gRPC, warm up, publish stats, drain on SIGTERM.

Life cycle: the gRPC server starts at once with health NOT_SERVING (probes get an answer
while the model loads); the engine loads and runs one real generate; only then does health
turn SERVING. SIGTERM drains: NOT_SERVING, new calls UNAVAILABLE, in-flight calls finish
within the drain timeout, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from serving.grpc_requests import add_inference_servicer
from serving.heap import settle
from serving.logs import configure_logging
from serving.registry_record import WorkerInfo, WorkerState, openai_url
from serving.tls import TLSConfigError
from serving.tracing import exporter_problem, make_tracer
from worker.cache_feed import CacheFeed
from worker.engine_factory import build_engine
from worker.grpc_service import NOT_SERVING, SERVICE_NAME, SERVING, InferenceService
from worker.grpc_service import WorkerState as State
from worker.metrics import MeteredEngine, WorkerMetrics
from worker.settings import WorkerSettings

log = logging.getLogger("breakwater.worker")

READY_LINE = "BREAKWATER_WORKER_READY"
CUT_GRACE_S = 2.0
"""After the drain timeout, how long the streams the engine's stop cut get to send their
error (and the HTTP port's shutdown waits for its handlers)."""


async def _warm_up(engine: Any) -> None:
    from worker.engine import GenerateRequest, SamplingParams

    req = GenerateRequest(
        "warmup", prompt="warm up", sampling=SamplingParams(temperature=0.0, max_tokens=2)
    )
    async for delta in engine.generate(req):
        if delta.error or delta.finish_reason == "error":
            # A dead engine (vLLM's EngineDeadError, say) must not report ready.
            raise RuntimeError(f"the engine failed its warm-up request: {delta.error}")


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.service = InferenceService(
            settings.worker_id, settings.max_queue, settings.fault_fail_rate, settings.fault_code
        )
        self.service.tracer = make_tracer(settings.trace_exporter, "breakwater-worker")
        self.tls = settings.server_tls()
        self.port = 0
        self.publisher: Any = None
        self.http_runner: Any = None
        self.server: grpc.aio.Server | None = None
        self._watch: asyncio.Task[None] | None = None

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def info(self) -> WorkerInfo:
        s = self.service.stats()
        address = self.settings.advertise or f"{self.settings.host}:{self.port}"
        return WorkerInfo(
            worker_id=self.settings.worker_id,
            address=address,
            kind="grpc",
            openai_url=openai_url(address, s.http_port, s.http_tls) if s.http_port else "",
            models=[self.service.model_name] if self.service.model_name else [],
            version=s.version,
            state=WorkerState(s.state),
            stats={
                "queue_depth": s.queue_depth,
                "running": s.running,
                "max_running": s.max_running,
                "in_flight": s.in_flight,
                "kv_cache_usage": s.kv_cache_usage,
                "prefix_cache_hit_rate": s.prefix_cache_hit_rate,
            },
        )

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.publisher.publish(self.info())
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _watch_engine(self, interval_s: float = 0.5) -> None:
        """gRPC health is pushed, not computed per probe: turn it NOT_SERVING once the engine's
        loop dies (service.state already reports it to admission, HTTP and the heartbeat)."""
        while self.service.state != State.NOT_SERVING:
            await asyncio.sleep(interval_s)
        log.error("the engine's step loop has died: health is NOT_SERVING")
        await self._set_health(NOT_SERVING)
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await self.publisher.publish(self.info())

    async def start(self) -> None:
        s = self.settings
        # grpc.aio objects bind to the running loop, so they are made here, not in __init__.
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)]
        )
        add_inference_servicer(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{s.host}:{s.grpc_port}"
        self.port = (
            self.server.add_secure_port(address, self.tls.grpc_credentials())
            if self.tls is not None
            else self.server.add_insecure_port(address)
        )
        await self.server.start()
        await self._set_health(NOT_SERVING)
        log.info("gRPC listening on %s:%d; loading the %s engine", s.host, self.port, s.engine)
        t0 = time.perf_counter()
        engine = await asyncio.to_thread(build_engine, s)
        await _warm_up(engine)
        self.metrics = WorkerMetrics(self.service)
        self.service.engine = MeteredEngine(engine, self.metrics)
        if CacheFeed.supported(engine):
            self.service.cache_feed = CacheFeed(engine)
            self.service.cache_feed.start()
        if s.http_port is not None:
            # before SERVING, so the first Stats a gateway reads names the port (it answers
            # 503 "starting" until then, as gRPC does)
            from worker.http_port import start_http

            self.http_runner = await start_http(
                self.service,
                s.host,
                s.http_port,
                self.metrics,
                ssl_context=self.tls.ssl_context() if self.tls is not None else None,
            )
            self.service.http_port = self.http_runner.addresses[0][1]
            self.service.http_tls = self.tls is not None
        self.service.state = State.SERVING
        await self._set_health(SERVING)
        self._watch = asyncio.create_task(self._watch_engine())
        if s.redis_url:
            from worker.registry_publisher import RedisPublisher

            self.publisher = RedisPublisher(s.redis_url, ttl=s.registry_ttl_s)
            self._hb = asyncio.create_task(self._heartbeat())
        log.info(
            "worker %s SERVING %s (ready in %.1fs)",
            s.worker_id,
            engine.model_name,
            time.perf_counter() - t0,
        )
        http = ""
        if self.http_runner is not None:
            http = f" http={'https' if self.tls else 'http'}://{s.host}:{self.service.http_port}"
        print(f"{READY_LINE} grpc={s.host}:{self.port}{http} model={engine.model_name}", flush=True)

    async def drain(self) -> None:
        s = self.settings
        self.service.state = State.DRAINING
        if self._watch is not None:
            self._watch.cancel()
        await self._set_health(NOT_SERVING)
        log.info("draining: %d request(s) in flight", self.service.in_flight)
        if self.publisher is not None:
            self._hb.cancel()
            with contextlib.suppress(Exception):
                await self.publisher.publish(self.info())
                await self.publisher.withdraw(s.worker_id)
        try:
            await asyncio.wait_for(self.service.idle.wait(), s.drain_timeout_s)
        except TimeoutError:
            log.warning("drain timeout: %d request(s) cut off", self.service.in_flight)
            # Cut them now: stopping the engine ends every open stream with an error (gRPC
            # and HTTP alike). Only logged, an HTTP stream went on to its end, and the exit
            # waited for it (plus aiohttp's 60 s shutdown), past the pod's grace period.
            if self.service.engine is not None:
                await asyncio.to_thread(self.service.engine.shutdown)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.service.idle.wait(), CUT_GRACE_S)
        if self.service.cache_feed is not None:
            await self.service.cache_feed.close()  # ends the HTTP port's watch streams too
        if self.http_runner is not None:
            from worker.http_port import end_cache_watches

            end_cache_watches(self.http_runner)  # and any whose reader stopped reading
            await self.http_runner.cleanup()
        assert self.server is not None
        await self.server.stop(grace=1.0)
        if self.publisher is not None:
            await self.publisher.close()
        if self.service.engine is not None:
            await asyncio.to_thread(self.service.engine.shutdown)

    async def run(self) -> int:
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        start = asyncio.create_task(self.start())
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if start in done and start.exception() is not None:
            log.error("worker failed to start: %s", start.exception())
            if self.server is not None:
                await self.server.stop(grace=0)
            return 1
        if stop in done and not start.done():
            start.cancel()
            if self.server is not None:
                await self.server.stop(grace=0)
            return 0
        settle()  # the engine and its libraries are loaded: out of every collection from now on
        await stop
        await self.drain()
        log.info("worker stopped")
        return 0


def _redis_url_problem(url: str | None) -> str | None:
    """A URL redis-py cannot read, found before the engine loads (it was found after, in
    minutes with a real model, in a message that named no flag). Reachability is not
    checked: Redis is soft state, and a worker may start before it."""
    if not url:
        return None
    import redis

    from serving.cli_types import redacted

    try:
        redis.Redis.from_url(url).close()
    except (ValueError, TypeError) as e:
        return f"--redis-url {redacted(url)}: {e}"
    return None


def run_worker(settings: WorkerSettings) -> int:
    try:  # before the engine loads: a bad file is one line on stderr, not a traceback
        settings.server_tls()
    except TLSConfigError as e:
        print(f"breakwater worker: {e}", file=sys.stderr, flush=True)
        return 2
    problem = exporter_problem(settings.trace_exporter) or _redis_url_problem(settings.redis_url)
    if problem is not None:
        print(f"breakwater worker: {problem}", file=sys.stderr, flush=True)
        return 2
    configure_logging()
    return asyncio.run(Worker(settings).run())
