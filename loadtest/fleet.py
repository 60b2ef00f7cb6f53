"""Start and stop real Breakwater processes on 127.0.0.1 (chaos scenarios and tests share it).

Ports are picked at bind time and read back from each process's READY line; every process
is stopped by PID; its stderr goes to a log file shown when a start fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class Proc:
    def __init__(
        self,
        args: list[str],
        ready_prefix: str,
        timeout: float = 180.0,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        """`python`: the interpreter to run breakwater with (a vLLM worker runs in vLLM's own
        virtualenv, see loadtest.vllm_env)."""
        self.args = args
        self.log = Path(tempfile.mkstemp(prefix="bw-", suffix=".log")[1])
        self._log_f = self.log.open("w")
        self.popen = subprocess.Popen(
            [python, "-m", "breakwater.cli", *args],
            stdout=subprocess.PIPE,
            stderr=self._log_f,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.ready: dict[str, str] = {}
        self._ready = threading.Event()
        self.stdout_lines: list[str] = []
        threading.Thread(target=self._read, args=(ready_prefix,), daemon=True).start()
        if not self._ready.wait(timeout) or not self.ready:
            self.kill()
            text = self.log_text()[-4000:]
            self._log_f.close()
            self.log.unlink(missing_ok=True)  # its text is in the error
            raise RuntimeError(f"{args[0]} did not become ready:\n{text}")

    def _read(self, prefix: str) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.stdout_lines.append(line)
            if line.startswith(prefix) and not self._ready.is_set():
                self.ready = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                self.ready.setdefault("line", line)
                self._ready.set()
        self._ready.set()  # exited

    def log_text(self) -> str:
        self._log_f.flush()
        return self.log.read_text()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 40.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGCONT)  # a paused process cannot drain
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if not self._log_f.closed:
            self._log_f.close()
        self.log.unlink(missing_ok=True)
        return self.popen.returncode

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_worker(
    model: Path | str | None,
    *extra: str,
    engine: str = "torch",
    name: str = "tiny",
    grpc_port: int = 0,
    timeout: float = 180.0,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Proc:
    args = [
        "worker",
        "--engine",
        engine,
        "--grpc-port",
        str(grpc_port),
        "--served-model-name",
        name,
        "--kv-cache-memory",
        "32MiB",
        "--max-model-len",
        "1024",
    ]
    if model is not None:
        args += ["--model", str(model)]
    return Proc([*args, *extra], "BREAKWATER_WORKER_READY", timeout, env=env, python=python)


def start_sim_worker(
    *extra: str, preset: str = "tiny", grpc_port: int = 0, name: str = "sim"
) -> Proc:
    return start_worker(
        None, "--sim-preset", preset, *extra, engine="sim", name=name, grpc_port=grpc_port
    )


ADMIN_TOKEN = "fleet-admin-token"
"""The admin token gateways started here are given (their admin listener: ready["admin"])."""


def start_gateway(
    *extra: str, timeout: float = 60.0, processes: int = 1, env: dict[str, str] | None = None
) -> Proc:
    """One event-loop process unless asked: a scenario's figures (ejections seen, limits
    hit) then belong to one gateway view, not to siblings that each learn on their own."""
    args = ["gateway", "--port", "0", "--processes", str(processes)]
    if "--admin-token" not in extra:
        args += ["--admin-token", ADMIN_TOKEN]
    return Proc([*args, *extra], "BREAKWATER_GATEWAY_READY", timeout, env=env)


def admin_call(gw: Proc, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """An admin call with a JSON body that may be refused: (status, JSON answer)."""
    req = urllib.request.Request(
        gw.ready["admin"] + path,
        method=method,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None,
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def admin_json(
    gw: Proc, path: str, method: str = "GET", token: str = ADMIN_TOKEN, timeout: float = 10.0
) -> Any:
    """A call to the gateway's admin listener, e.g. admin_json(gw, "/admin/workers")."""
    req = urllib.request.Request(
        gw.ready["admin"] + path,
        method=method,
        headers={"Authorization": f"Bearer {token}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(cond: Callable[[], T], timeout: float = 30.0, interval: float = 0.05) -> T:
    """Poll until cond() is truthy; returns its value or raises after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def read_ready(popen: subprocess.Popen[str], prefix: str, timeout: float) -> dict[str, str] | None:
    """The key=value pairs of the first stdout line starting with prefix; None if the process
    exited or said nothing in time (its stdout must be a text pipe)."""
    import selectors

    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = popen.stdout.readline()
            if not line:
                return None
            if line.startswith(prefix):
                return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    return None


def terminate(popen: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; by PID, never by name."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
