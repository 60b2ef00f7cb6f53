"""`breakwater gateway --processes N`: N event-loop processes serving one port.

Python runs one event loop per core at best, so a gateway that must use every core runs
several processes. The first binds the ports (resolving port 0) with SO_REUSEPORT, then
starts the others on the same ports; the kernel spreads new connections across them. Each
process is a whole gateway: its own registry view, breakers and admission. Admission limits
are split among the processes (see `per_process`); with Redis, buckets and ejections are
shared as between any gateway replicas. The first process restarts a sibling that dies,
stops them all on SIGTERM, and they die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys

from gateway.routing.decision_share import child_env
from gateway.settings import GatewaySettings
from gateway.shutdown import sibling_stop_s

log = logging.getLogger("breakwater.gateway")

SETTINGS_ENV = "BREAKWATER_GATEWAY_SETTINGS_JSON"
PARENT_ENV = "BREAKWATER_GATEWAY_PARENT_PID"
READY_LINE = "BREAKWATER_GATEWAY_READY"
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0


class Siblings:
    """Processes 1..N-1, started and supervised by process 0."""

    def __init__(
        self,
        settings: GatewaySettings,
        http_port: int,
        grpc_port: int | None,
        share_socks: list[socket.socket] | None = None,
    ) -> None:
        self.settings = settings
        self.share_socks = share_socks
        """One datagram socket per process for sharing routing decisions, or None."""
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    def notify(self) -> None:
        """Tell every sibling to re-read the operator overrides now (SIGUSR1)."""
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGUSR1)

    def _env(self, index: int) -> dict[str, str]:
        s = dataclasses.replace(
            self.settings,
            port=self.http_port,
            grpc_port=self.grpc_port,
            process_index=index,
            admin_token=None,  # only process 0 serves the admin API
        )
        env = {
            **os.environ,
            SETTINGS_ENV: json.dumps(dataclasses.asdict(s)),
            PARENT_ENV: str(os.getpid()),
        }
        if self.share_socks:
            env.update(child_env(self.share_socks, index))
        return env

    async def _spawn(self, index: int, timeout: float = 60.0) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.app",
            env=self._env(index),
            stdout=asyncio.subprocess.PIPE,
            pass_fds=(self.share_socks[index].fileno(),) if self.share_socks else (),
        )
        self.procs[index] = proc
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while line := await proc.stdout.readline():
                    if line.startswith(READY_LINE.encode()):
                        break
                else:
                    raise RuntimeError(f"gateway process {index} exited during start-up")
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        self._watchers.append(asyncio.create_task(self._watch(index, proc)))

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        # Passed on, not only drained: what a sibling prints after its ready line (the
        # console trace exporter's spans) was lost, half of them with two processes.
        # Whole lines, so they do not cut into process 0's own.
        pending = b""
        while data := await proc.stdout.read(1 << 16):
            pending += data
            cut = pending.rfind(b"\n") + 1 if len(pending) < 1 << 20 else len(pending)
            if cut:
                await asyncio.to_thread(_write_stdout, pending[:cut])
                pending = pending[cut:]
        if pending:
            await asyncio.to_thread(_write_stdout, pending)
        code = await proc.wait()
        if self._stopping:
            return
        log.warning("gateway process %d exited with %s; restarting it", index, code)
        # Until it is back, as a master process does (nginx, gunicorn): a restart that
        # failed once was the end of it, leaving the gateway a process short for good.
        delay = RESTART_DELAY_S
        while not self._stopping:
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                await self._spawn(index)
                return
            except Exception as e:
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
                log.error(
                    "gateway process %d did not restart (%s); trying again in %g s",
                    index,
                    e,
                    delay,
                )

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(i) for i in range(1, self.settings.processes)))

    async def stop(self) -> None:
        self._stopping = True
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        # one deadline for all (they drain at once): N that hang must not take N times it
        waits = [asyncio.ensure_future(p.wait()) for p in self.procs.values()]
        if waits:
            await asyncio.wait(waits, timeout=sibling_stop_s(self.settings.drain_timeout_s))
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if waits:
            await asyncio.wait(waits, timeout=5.0)
        if self._watchers:  # a sibling's last lines (its spans' last batch) come at exit
            await asyncio.wait(self._watchers, timeout=2.0)
        for w in self._watchers:
            w.cancel()


def die_with_parent() -> bool:
    """Linux: SIGTERM when process 0 goes, however it goes. False if it is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    return os.getppid() == int(os.environ.pop(PARENT_ENV, "0") or 0)


def sibling_settings() -> GatewaySettings:
    """A sibling's settings, as process 0 passed them."""
    return GatewaySettings(**json.loads(os.environ.pop(SETTINGS_ENV)))


def _write_stdout(data: bytes) -> None:
    """In a thread: a slow reader of process 0's stdout must not stall its event loop."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
