"""`breakwater up`: a gateway and N local workers as child processes, in one command.

Children learn their ports at bind time (port 0) and report them on a READY line; on
Ctrl-C or SIGTERM the gateway stops first, then the workers drain, and nothing is left
behind (children also get SIGKILL if this process dies, through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


WORKER_STOP_S = 30.0 + 10.0
"""A worker's drain (--drain-timeout's default) and the rest of its shutdown."""
KILL_WAIT_S = 5.0
"""After SIGKILL: the kernel reaps at once, unless this process stopped reading its pipe."""


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    ready: dict[str, str]
    pump: asyncio.Task[None] | None = None
    """Forwards the child's stdout after READY: a pipe nobody reads fills (64 KiB), and a
    child writing to it (console traces, vLLM's logs) then blocks: serving stalled and
    the child could not even exit."""


async def _forward(stdout: asyncio.StreamReader) -> None:
    """Bytes as they come (a line over the reader's 64 KiB limit would end readline())."""
    out = sys.stdout.buffer
    while data := await stdout.read(1 << 16):
        with contextlib.suppress(OSError, ValueError):  # our own stdout closed: drop it
            out.write(data)
            out.flush()


async def _spawn(name: str, args: list[str], ready_prefix: str, timeout: float) -> Child:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "breakwater.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        preexec_fn=_die_with_parent,
        # A group of its own: a terminal's Ctrl-C reaches `up` alone, which stops the
        # gateway and then the workers in order. Reaching every child at once, it cut
        # workers' start-up mid-import (a traceback each, "Fatal Python error" in site)
        # and drained the workers while the gateway still sent them requests.
        process_group=0,
    )
    assert proc.stdout is not None

    async def wait_ready() -> dict[str, str]:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:  # its stdout closed: it has exited, or is about to
                code = await proc.wait()
                raise RuntimeError(f"{name} exited before it was ready (exit code {code})")
            text = line.decode().strip()
            if text.startswith(ready_prefix):
                return dict(kv.split("=", 1) for kv in text.split()[1:])
            print(text, flush=True)

    try:
        try:
            ready = await asyncio.wait_for(wait_ready(), timeout)
        except TimeoutError:  # asyncio's has no text: name what was not ready
            raise TimeoutError(f"{name} was not ready within {timeout:g}s") from None
    except BaseException:  # not ready in time, exited, or startup was stopped: none left
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await proc.wait()
        raise
    return Child(name, proc, ready, asyncio.create_task(_forward(proc.stdout)))


class _Stopped(Exception):
    """Ctrl-C or SIGTERM came while starting."""


async def _unless_stopped(aw: Awaitable[T], stop: asyncio.Event) -> T:
    """`aw`, or _Stopped (and `aw` cancelled) once Ctrl-C or SIGTERM comes: a start that
    waits for readiness would otherwise sit out its whole timeout (300 s) after the
    children it waits for have already exited on that same Ctrl-C."""
    task = asyncio.ensure_future(aw)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if stop.is_set():  # even if `aw` ended too: a child that died of the same Ctrl-C
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Stopped
    return task.result()


async def _stop(children: list[Child], timeout: float) -> None:
    """SIGTERM all at once (each drains in parallel), SIGKILL any still running after
    `timeout`; never waits without a bound."""

    async def stop(child: Child) -> None:
        if child.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.proc.wait(), timeout)
        except TimeoutError:
            print(f"breakwater up: {child.name} did not stop in {timeout:g}s; killed",
                  file=sys.stderr, flush=True)  # fmt: skip
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.proc.wait(), KILL_WAIT_S)
        if child.pump is not None:
            child.pump.cancel()

    await asyncio.gather(*(stop(c) for c in children))


async def _stop_all(children: list[Child]) -> None:
    """The gateway first, for as long as its own drain may take (so that requests in
    flight finish on live workers), then every worker at once."""
    from gateway.shutdown import sibling_stop_s

    gateways = [c for c in children if c.name == "gateway"]
    # the gateway's own drain, which it may take from the environment it inherits
    try:
        drain = float(os.environ.get("BREAKWATER_GATEWAY_DRAIN_TIMEOUT") or "nan")
    except ValueError:
        drain = float("nan")
    await _stop(gateways, (sibling_stop_s(drain) if drain >= 0 else sibling_stop_s()) + 10.0)
    await _stop([c for c in children if c not in gateways], WORKER_STOP_S)


async def _gather_children(spawns: list[Awaitable[Child]], children: list[Child]) -> list[Child]:
    """Start them together; every one that started joins `children` (to be stopped) even
    when another failed, whose error is raised (the others' are read, not left unhandled)."""
    tasks = [asyncio.ensure_future(s) for s in spawns]
    try:
        await asyncio.wait(tasks)
    finally:  # also when Ctrl-C cancels this: the ready ones are stopped (drained) too
        for t in tasks:
            if not t.done():
                t.cancel()  # _spawn kills a child it had not finished starting
        done = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        children.extend(t.result() for t in done)
    for t in tasks:
        if (exc := t.exception()) is not None:
            raise exc
    return [t.result() for t in tasks]


async def _up(args: argparse.Namespace) -> int:
    children: list[Child] = []
    model = args.model
    # First of all: a Ctrl-C before these were in place went to asyncio's own handling,
    # which cancelled half-made child spawns and then hung for good in its shutdown.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    interrupts = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal interrupts
        interrupts += sig == signal.SIGINT
        # a second Ctrl-C: the operator wants out now. Only SIGINT: a process manager
        # that sends SIGTERM after the terminal's SIGINT means "stop", not "kill"
        if interrupts >= 2:
            print("\nbreakwater up: stopped at once", file=sys.stderr, flush=True)
            os._exit(130)  # the children follow (PR_SET_PDEATHSIG)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    t0 = time.perf_counter()
    try:
        if args.engine in ("torch", "vllm") and model is None:
            from worker.engine.demo_model import ensure_demo_model

            # once, before the workers race to write it; in a thread, so Ctrl-C works
            await _unless_stopped(asyncio.to_thread(ensure_demo_model, "demo"), stop)
        # Each worker also gets an HTTP port of its own: /metrics (vLLM's names) and its
        # OpenAI routes, for scrapes and for debugging one replica directly.
        common = [
            "--engine", args.engine, "--host", args.host, "--grpc-port", "0", "--http-port", "0",
        ]  # fmt: skip
        if model:
            common += ["--model", model]
        if args.engine == "sim":
            common += ["--sim-preset", args.sim_preset]
        if args.enforce_eager:
            common += ["--enforce-eager"]
        if args.kv_cache_memory:
            common += ["--kv-cache-memory", args.kv_cache_memory]
        if args.max_model_len is not None:
            common += ["--max-model-len", str(args.max_model_len)]
        if args.redis_url:
            common += ["--redis-url", args.redis_url]
        if args.max_num_seqs is not None:  # the parser refuses 0, which must not be dropped
            common += ["--max-num-seqs", str(args.max_num_seqs)]

        async def spawn_worker(i: int) -> Child:
            return await _spawn(
                f"worker-{i}",
                ["worker", *common, "--worker-id", f"local-{i}"],
                "BREAKWATER_WORKER_READY",
                args.ready_timeout,
            )

        workers = await _unless_stopped(
            _gather_children([spawn_worker(i) for i in range(args.workers)], children), stop
        )
        gw_args = ["gateway", "--host", args.host, "--port", str(args.port)]
        if args.grpc_port is not None:
            gw_args += ["--grpc-port", str(args.grpc_port)]
        if args.gateway_processes is not None:
            gw_args += ["--processes", str(args.gateway_processes)]
        if args.redis_url:
            gw_args += ["--redis-url", args.redis_url]
        else:
            for w in workers:
                gw_args += ["--worker", w.ready["grpc"]]
        # The admin API's token: the operator's, or one made for this run and shown below.
        admin_token = os.environ.get("BREAKWATER_ADMIN_TOKEN") or secrets.token_urlsafe(18)
        os.environ["BREAKWATER_ADMIN_TOKEN"] = admin_token  # inherited, never on a command line
        gateway = await _unless_stopped(
            _spawn("gateway", gw_args, "BREAKWATER_GATEWAY_READY", args.ready_timeout), stop
        )
        children.insert(0, gateway)  # stopped first
        url = gateway.ready["http"]
        await _unless_stopped(_wait_ready(url, args.ready_timeout), stop)
        model_name = workers[0].ready.get("model", "")
        print(
            f"\nBreakwater is up in {time.perf_counter() - t0:.1f}s: gateway {url} "
            f"({args.workers} {args.engine} worker(s), model {model_name})\n"
            f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model": "{model_name}", "messages": '
            f'[{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}\'\n'
            f"  metrics: {url}/metrics; workers: "
            + ", ".join(f"{w.ready.get('http', '?')}/metrics" for w in workers)
            + (f"\n  grpc: {gateway.ready['grpc']}" if gateway.ready.get("grpc") else "")
            + f"\n  admin: {gateway.ready.get('admin', '-')}/admin/workers "
            f"(Authorization: Bearer {admin_token})" + "\nPress Ctrl-C to stop.",
            flush=True,
        )
        waits = {asyncio.create_task(c.proc.wait()): c for c in children}
        stopper = asyncio.create_task(stop.wait())
        others = [stopper]
        if args.autoscale:
            others.append(
                asyncio.create_task(
                    _autoscale(args, gateway.ready["admin"], admin_token, spawn_worker, children)
                )
            )
        restarts: dict[str, int] = {}
        try:
            while True:
                done, _ = await asyncio.wait([*others, *waits], return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    print("\nstopping...", file=sys.stderr, flush=True)
                    return 0
                exited = [waits.pop(t) for t in done if t in waits]
                if any(c is gateway for c in exited) or not exited:
                    dead = [c.name for c in children if c.proc.returncode is not None]
                    print(f"breakwater up: {', '.join(dead)} exited; stopping", file=sys.stderr)
                    return 1
                for child in exited:  # a worker: the gateway routes around it meanwhile
                    while True:
                        try:
                            new = await _restart(child, common, restarts, args.ready_timeout, stop)
                            break
                        except (TimeoutError, RuntimeError) as e:  # did not come back up
                            if restarts[child.name] >= MAX_RESTARTS:
                                raise RuntimeError(f"{child.name} failed to restart: {e}") from e
                    children[children.index(child)] = new
                    waits[asyncio.create_task(new.proc.wait())] = new
        finally:
            for t in [*others, *waits]:
                t.cancel()
    except _Stopped:
        print("\nstopping...", file=sys.stderr, flush=True)
        return 0
    except (TimeoutError, RuntimeError) as e:
        print(f"breakwater up: {str(e) or 'timed out waiting for readiness'}", file=sys.stderr)
        return 1
    finally:
        await _stop_all(children)


RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
MAX_RESTARTS = 8
"""Restarts of one worker that failed to come up again before `up` gives up and stops."""


async def _restart(
    child: Child,
    common: list[str],
    restarts: dict[str, int],
    timeout: float,
    stop: asyncio.Event,
) -> Child:
    """A worker that exited (a crash, an OOM kill), started again on the ports it had, so
    the gateway's health checks bring it back: one worker's death stopped the whole of
    `up`, gateway and healthy workers with it. Restarts back off (1 s, doubling, at most
    30 s) so one that keeps crashing does not spin."""
    n = restarts[child.name] = restarts.get(child.name, 0) + 1
    delay = min(MAX_RESTART_DELAY_S, RESTART_DELAY_S * 2 ** (n - 1))
    print(
        f"breakwater up: {child.name} exited (code {child.proc.returncode}); "
        f"restarting it in {delay:g}s on its ports",
        file=sys.stderr,
        flush=True,
    )
    if child.pump is not None:
        child.pump.cancel()
    await _unless_stopped(asyncio.sleep(delay), stop)
    grpc_port = child.ready["grpc"].rsplit(":", 1)[1]
    http_port = child.ready.get("http", ":0").rsplit(":", 1)[1]
    index = child.name.rsplit("-", 1)[1]
    argv = ["worker", *common, "--grpc-port", grpc_port, "--http-port", http_port]
    argv += ["--worker-id", f"local-{index}"]  # the flags given last win
    return await _unless_stopped(_spawn(child.name, argv, "BREAKWATER_WORKER_READY", timeout), stop)


async def _autoscale(
    args: argparse.Namespace,
    admin_url: str,
    admin_token: str,
    spawn_worker: Callable[[int], Awaitable[Child]],
    children: list[Child],
) -> None:
    import aiohttp

    from breakwater.autoscale import AutoscalePolicy, Autoscaler

    policy = AutoscalePolicy(
        min_workers=args.min_workers if args.min_workers is not None else args.workers,
        max_workers=args.max_workers,
        target_queue=args.target_queue,
        scale_down_window_s=args.scale_down_window,
    )

    async def spawn(i: int) -> tuple[Child, dict[str, str]]:
        child = await spawn_worker(i)
        children.append(child)  # stopped with the rest on the way out
        return child, child.ready

    async def stop(child: Child) -> None:
        await _stop([child], WORKER_STOP_S)
        children.remove(child)

    scaler = Autoscaler(
        policy, admin_url, admin_token, spawn, stop, registered_by_gateway=not args.redis_url
    )
    print(
        f"autoscale: {policy.min_workers}..{policy.max_workers} workers, "
        f"{policy.target_queue:g} waiting per worker, scale down after "
        f"{policy.scale_down_window_s:g}s",
        flush=True,
    )
    async with aiohttp.ClientSession() as session:
        await scaler.run(session, args.workers, args.workers)


async def _wait_ready(url: str, timeout: float) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("the gateway did not become ready")


def run_up(args: argparse.Namespace) -> int:
    if args.autoscale:
        lo = args.min_workers if args.min_workers is not None else args.workers
        if not (1 <= lo <= args.workers <= args.max_workers) or not args.target_queue > 0:
            print(
                "breakwater up: --autoscale needs 1 <= --min-workers <= --workers <= "
                "--max-workers and --target-queue > 0",
                file=sys.stderr,
            )
            return 2
    problem = _port_problem(args) or _redis_problem(args.redis_url)
    if problem is not None:  # before any worker loads a model: minutes, with a real one
        print(f"breakwater up: {problem}", file=sys.stderr)
        return 1
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(_up(args))


def _port_problem(args: argparse.Namespace) -> str | None:
    """A gateway port some other process listens on; found only once every worker had
    loaded, before."""
    for flag, number in (("--port", args.port), ("--grpc-port", args.grpc_port)):
        if not number:  # None or 0: any free port
            continue
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                s.bind((args.host, number))
            except OSError as e:
                return f"{flag} {number} on {args.host}: {e.strerror or e}"
    return None


def _redis_problem(url: str | None) -> str | None:
    """A Redis that does not answer: the workers would register nowhere, and the gateway
    would wait out --ready-timeout (300 s) for them, then say only that it was not ready."""
    if not url:
        return None
    import redis

    from serving.cli_types import redacted

    try:
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError, TypeError, OSError) as e:
        return f"--redis-url {redacted(url)}: Redis does not answer ({e})"
    return None
