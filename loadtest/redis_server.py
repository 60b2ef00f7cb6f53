"""A real, throwaway redis-server for tests: own port, own temp dir, no persistence.

Tests that need Redis start one of these instead of touching the system Redis (6379), and
can kill, restart, pause and resume it to exercise outages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

REDIS_SERVER = os.environ.get("BREAKWATER_REDIS_SERVER", "/usr/bin/redis-server")
START_DEADLINE = 30.0
"""Generous: a loaded CI machine can take a while to exec and bind."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``with RedisServer() as r: ... r.url ...``; stopped by PID and cleaned up on exit."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="breakwater-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        if self.port == 6379:
            raise ValueError("refusing to run a test Redis on the system port 6379")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = (self.dir / "redis.log").open("ab")
        # The port comes from a just-closed ephemeral socket; if another process grabs it
        # first, redis-server exits and we fail loudly below rather than hang.
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "dir": str(self.dir),
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
            "protected-mode": "no",
        }
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *(a for k, v in options.items() for a in (f"--{k}", v))],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.paused = False
        deadline = time.monotonic() + START_DEADLINE
        while not _ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited on port {self.port}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: Redis vanishes mid-flight, as on a crash or a lost node."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.paused = False

    def restart(self) -> RedisServer:
        """Kill (if running) and start again on the same port, with an empty dataset."""
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung server)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Terminate by PID (SIGCONT first: a stopped process cannot act on SIGTERM), then kill."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            if self.paused:
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.paused = False

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
