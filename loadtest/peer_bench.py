"""Router benchmark: Breakwater's gateway against vLLM's and SGLang's routers and nginx.

    python -m loadtest.peer_bench [--quick] [--json] [--duration S] [--connections N]
        [--targets direct,breakwater,...] [--no-peers] [--generator auto|wrk|python]

Every target fronts the same three mock OpenAI backends (`loadtest.mock_openai`: zero model
time, answers pre-encoded), so what differs between targets is the router alone. Each target
is driven closed-loop at N connections (wrk, or a built-in Python generator where wrk is not
installed) with two workloads:

- json: POST /v1/completions, a 16-token JSON answer;
- sse: POST /v1/chat/completions with `stream: true`, a 32-chunk SSE stream and [DONE].

Targets: `direct` (one backend, no router), `breakwater` (the gateway, one process),
`breakwater_all_cores` (`--processes` = cores, when the gateway has that flag),
`vllm_router` and `sglang_router` (pip packages, each in its own virtualenv under
~/.cache/breakwater/peers, never in the project's environment), `nginx` and
`nginx_all_cores` (Debian's nginx, round robin with upstream keepalive).

Figures per target and workload: rps (good answers only), p50/p99 ms, errors (non-2xx,
socket errors, and 200s whose body is wrong), the router's CPU microseconds per request
(utime+stime of its whole process tree from /proc, before and after), and p50 added over
`direct`. `ratios` holds Breakwater against vLLM's router (CPU per request, rps) and the p50
Breakwater adds to a stream. A target whose answer is wrong before measuring is an error in
`skipped`, not a result. All traffic goes to 127.0.0.1; every process started is stopped
by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.fleet import Proc, free_port, terminate
from loadtest.mock_openai import (
    JSON_TOKENS,
    SSE_CHUNKS,
    MockBackend,
    start_mock_backends,
    token_text,
)

MODEL = "mock"
ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = Path.home() / ".cache" / "breakwater" / "peers"
ALL_TARGETS = (
    "direct",
    "breakwater",
    "breakwater_all_cores",
    "vllm_router",
    "sglang_router",
    "nginx",
    "nginx_all_cores",
)
PEER_TARGETS = ("vllm_router", "sglang_router")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_ERROR_SHARE = 0.01
"""A run with more errors than this share of its requests is marked invalid."""


def log(msg: str) -> None:
    print(f"[peer_bench] {msg}", file=sys.stderr, flush=True)


# -- workloads -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    body: dict[str, Any]
    markers: tuple[str, ...]
    """Substrings every good answer holds (checked per request by the generators)."""

    @property
    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()

    def check(self, status: int, headers: dict[str, str], body: bytes) -> str | None:
        """Why one full answer is wrong, or None: the exact text the mock sent, intact."""
        if status != 200:
            return f"HTTP {status}: {body[:300]!r}"
        if self.name == "json":
            try:
                choice = json.loads(body)["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return f"not a completion ({e}): {body[:300]!r}"
            text = choice.get("text", (choice.get("message") or {}).get("content"))
            want = token_text(JSON_TOKENS)
            return None if text == want else f"text {text!r}, expected {want!r}"
        ctype = headers.get("content-type", "")
        if not ctype.startswith("text/event-stream"):
            return f"content-type {ctype!r}, expected text/event-stream"
        datas = [
            line[5:].strip()
            for line in body.decode("utf-8", "replace").splitlines()
            if line.startswith("data:")
        ]
        if not datas or datas[-1] != "[DONE]":
            return f"stream does not end with data: [DONE]: {body[-200:]!r}"
        text = ""
        for d in datas[:-1]:
            try:
                event = json.loads(d)
                text += event["choices"][0]["delta"].get("content") or ""
            except (ValueError, KeyError, IndexError, TypeError) as e:
                return f"bad event {d[:200]!r}: {e}"
        want = token_text(SSE_CHUNKS)
        return None if text == want else f"streamed text {text!r}, expected {want!r}"


WORKLOADS = (
    Workload(
        "json",
        "/v1/completions",
        {"model": MODEL, "prompt": "Hello", "max_tokens": JSON_TOKENS},
        (f' t{JSON_TOKENS - 1}"',),
    ),
    Workload(
        "sse",
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": SSE_CHUNKS,
            "stream": True,
        },
        (f'" t{SSE_CHUNKS - 1}"', "data: [DONE]"),
    ),
)


def fetch(url: str, wl: Workload, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One request with the standard library (chunked bodies decoded): the verifier."""
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", wl.path, wl.body_bytes, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def verify(url: str, wl: Workload, timeout: float = 20.0) -> str | None:
    """None once the target answers correctly; else the last reason it did not.

    Retried until `timeout`: a router may accept connections before its first health
    check has admitted any backend.
    """
    deadline = time.monotonic() + timeout
    reason = "no attempt"
    while True:
        try:
            reason = wl.check(*fetch(url, wl)) or ""
        except (OSError, http.client.HTTPException) as e:
            reason = f"{type(e).__name__}: {e}"
        if not reason:
            return None
        if time.monotonic() > deadline:
            return reason
        time.sleep(0.25)


# -- CPU accounting --------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime in ticks) of one process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces and parens
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds used so far by `roots` and all their live descendants (routers rename
    themselves and fork workers, so they are found by PID and parentage, never by name)."""
    stats: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            stats[int(entry)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [p for p in roots if p in stats]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += children.get(pid, [])
    return sum(stats[p][1] for p in seen) / CLK_TCK


# -- load generators -------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int = 0
    """Complete answers, good or not."""
    duration_s: float = 0.0
    status_errors: int = 0
    socket_errors: int = 0
    bad_body: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    generator: str = ""

    @property
    def good(self) -> int:
        return max(0, self.requests - self.status_errors - self.bad_body)

    @property
    def errors(self) -> int:
        return self.status_errors + self.socket_errors + self.bad_body


_WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
local markers = {%(markers)s}
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status == 200 then
    for _, m in ipairs(markers) do
      if not string.find(body, m, 1, true) then bad = bad + 1; return end
    end
  end
end
function done(summary, latency, requests)
  local b = 0
  for _, t in ipairs(threads) do b = b + t:get("bad") end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%%d,"duration_us":%%d,"status":%%d,"socket":%%d,' ..
    '"bad_body":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    b, latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(
    url: str, wl: Workload, duration_s: float, connections: int, threads: int = 2
) -> LoadResult:
    """wrk closed-loop: C connections, each sending its next request when the last ends."""
    markers = ", ".join(f"[==[{m}]==]" for m in wl.markers)
    script = _WRK_LUA % {"body": wl.body_bytes.decode(), "markers": markers}
    with tempfile.TemporaryDirectory(prefix="peer-bench-wrk-") as tmp:
        path = Path(tmp) / "post.lua"
        path.write_text(script)
        secs = max(1, round(duration_s))
        args = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{secs}s"]
        args += ["--latency", "--timeout", "5s", "-s", str(path), url + wl.path]
        out = subprocess.run(args, capture_output=True, text=True, timeout=secs + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            r = json.loads(line.split(" ", 1)[1])
            return LoadResult(
                requests=r["requests"],
                duration_s=r["duration_us"] / 1e6,
                status_errors=r["status"],
                socket_errors=r["socket"],
                bad_body=r["bad_body"],
                p50_ms=r["p50_us"] / 1000,
                p99_ms=r["p99_us"] / 1000,
                generator="wrk",
            )
    raise RuntimeError(f"wrk gave no result (rc={out.returncode}): {out.stderr[-1000:]}")


async def _py_connection(
    host: str, port: int, request: bytes, wl: Workload, stop_at: float, out: LoadResult
) -> list[float]:
    """One keep-alive connection sending requests back to back until stop_at."""
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while loop.time() < stop_at:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    out.socket_errors += 1
                    await asyncio.sleep(0.05)
                    continue
            assert reader is not None
            t0 = time.perf_counter()
            try:
                writer.write(request)
                status, body, keep = await asyncio.wait_for(_read_response(reader), 5.0)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                out.socket_errors += 1
                writer.close()
                writer = None
                continue
            latencies.append(time.perf_counter() - t0)
            out.requests += 1
            if status < 200 or status >= 300:
                out.status_errors += 1
            elif status == 200 and not all(m.encode() in body for m in wl.markers):
                out.bad_body += 1
            if not keep:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()
    return latencies


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length, chunked, keep = None, False, True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            keep = False
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers
                break
            parts.append(await reader.readexactly(size + 2))
        return status, b"".join(p[:-2] for p in parts), keep
    if length is not None:
        return status, await reader.readexactly(length), keep
    return status, await reader.read(), False


def run_python(url: str, wl: Workload, duration_s: float, connections: int) -> LoadResult:
    """The same closed loop as wrk in pure Python (uvloop): slower, so its rps is a floor,
    but it needs nothing installed and checks every answer the same way."""
    from loadtest.mock_openai import run

    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    body = wl.body_bytes
    request = (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (wl.path.encode(), host_port.encode(), len(body), body)
    )
    out = LoadResult(generator="python")
    lat: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stop_at = t0 + duration_s
        tasks = [
            _py_connection(host, int(port), request, wl, stop_at, out) for _ in range(connections)
        ]
        for part in await asyncio.gather(*tasks):
            lat.extend(part)
        out.duration_s = loop.time() - t0

    run(main())
    lat.sort()
    if lat:
        out.p50_ms = lat[len(lat) // 2] * 1000
        out.p99_ms = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    return out


Generator = Callable[[str, Workload, float, int], LoadResult]


# -- targets ---------------------------------------------------------------------------------


@dataclass
class Running:
    url: str
    pids: list[int]
    """Roots of the process trees whose CPU is the router's."""
    info: dict[str, Any] = field(default_factory=dict)


class Skip(Exception):
    """A target that cannot run here (not installed, no such flag): a reason, not a failure."""


def _wait_port(port: int, popen: subprocess.Popen[Any], timeout: float, logfile: Path) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"exited with {popen.returncode}:\n{_tail(logfile)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"not listening on {port} after {timeout:.0f}s:\n{_tail(logfile)}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


@contextlib.contextmanager
def _process(args: list[str], port: int, timeout: float = 60.0) -> Iterator[subprocess.Popen[Any]]:
    """A router process with its output in a temp dir, listening on `port`; stopped by PID."""
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        logfile = Path(tmp) / "out.log"
        with logfile.open("w") as f:
            popen = subprocess.Popen(
                args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp
            )
        try:
            _wait_port(port, popen, timeout, logfile)
            yield popen
        finally:
            terminate(popen)


def gateway_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "breakwater.cli", "gateway", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    return out.stdout


@contextlib.contextmanager
def start_breakwater(backends: list[MockBackend], processes: int | None) -> Iterator[Running]:
    """The gateway with every default on; `processes` only when the gateway has the flag."""
    args = ["gateway", "--host", "127.0.0.1", "--port", "0"]
    if processes is not None:
        args += ["--processes", str(processes)]
    for b in backends:
        args += ["--worker", b.url]
    proc = Proc(args, "BREAKWATER_GATEWAY_READY", timeout=90.0)
    try:
        yield Running(proc.ready["http"], [proc.pid], {"processes": processes or 1})
    finally:
        proc.stop()


@dataclass(frozen=True)
class Peer:
    """A pip-installed router, each in its own virtualenv."""

    package: str
    version: str
    command: Callable[[Path, list[str], int, int], list[str]]
    """(venv, worker URLs, port, prometheus port) -> argv."""


def _router_args(urls: list[str], port: int, prom: int, log_level: str) -> list[str]:
    """Flags both Rust routers take alike: loopback only, round robin, Prometheus moved off
    its default port 29000."""
    return [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *urls,
        "--policy",
        "round_robin",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(prom),
        "--log-level",
        log_level,
    ]


PEERS = {
    "vllm_router": Peer(
        "vllm-router",
        "0.1.17",
        lambda venv, urls, port, prom: [
            str(venv / "bin" / "vllm-router"),
            *_router_args(urls, port, prom, "warning"),
        ],
    ),
    "sglang_router": Peer(
        "sglang-router",
        "0.3.2",
        lambda venv, urls, port, prom: [
            str(venv / "bin" / "python"),
            "-m",
            "sglang_router.launch_router",
            *_router_args(urls, port, prom, "warn"),
        ],
    ),
}


def ensure_peer(name: str, peer: Peer, install: bool = True) -> Path:
    """The peer's virtualenv with its package at the pinned version, made on first use.

    A venv of its own keeps a peer's dependencies out of the project's environment.
    """
    venv = PEERS_DIR / f"{name}-venv"
    py = venv / "bin" / "python"
    probe = f"import importlib.metadata as m; print(m.version({peer.package!r}))"
    if py.exists():
        got = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, timeout=60)
        if got.returncode == 0 and got.stdout.strip() == peer.version:
            return venv
    if not install:
        raise Skip(f"{peer.package}=={peer.version} is not installed in {venv}")
    log(f"installing {peer.package}=={peer.version} into {venv} (once)")
    PEERS_DIR.mkdir(parents=True, exist_ok=True)
    logfile = PEERS_DIR / f"{name}-install.log"
    with logfile.open("w") as f:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(py), "-m", "pip", "install", "-q", f"{peer.package}=={peer.version}"],
        ]
        for step in steps:
            try:
                rc = subprocess.run(step, stdout=f, stderr=subprocess.STDOUT, timeout=900)
            except subprocess.TimeoutExpired:
                raise Skip(f"installing {peer.package} timed out; see {logfile}") from None
            if rc.returncode != 0:
                raise Skip(f"pip install {peer.package}=={peer.version} failed; see {logfile}")
    return venv


@contextlib.contextmanager
def start_peer(name: str, backends: list[MockBackend], install: bool = True) -> Iterator[Running]:
    peer = PEERS[name]
    venv = ensure_peer(name, peer, install)
    port, prom = free_port(), free_port()
    args = peer.command(venv, [b.url for b in backends], port, prom)
    with _process(args, port) as popen:
        info = {"package": f"{peer.package}=={peer.version}", "argv": args[1:]}
        yield Running(f"http://127.0.0.1:{port}", [popen.pid], info)


NGINX_CONF = """daemon off;
worker_processes %(workers)s;
pid %(tmp)s/nginx.pid;
error_log %(tmp)s/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path %(tmp)s/body;
    proxy_temp_path %(tmp)s/proxy;
    fastcgi_temp_path %(tmp)s/fastcgi;
    uwsgi_temp_path %(tmp)s/uwsgi;
    scgi_temp_path %(tmp)s/scgi;
    upstream backends {
%(servers)s
        keepalive 128;
    }
    server {
        listen 127.0.0.1:%(port)d reuseport;
        keepalive_requests 1000000;
        location / {
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }
    }
}
"""


@contextlib.contextmanager
def start_nginx(backends: list[MockBackend], workers: str) -> Iterator[Running]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not nginx:
        raise Skip("nginx is not installed (apt-get install -y nginx)")
    with tempfile.TemporaryDirectory(prefix="peer-bench-nginx-") as tmp:
        port = free_port()
        servers = "\n".join(f"        server {b.url.split('://', 1)[1]};" for b in backends)
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            NGINX_CONF % {"workers": workers, "tmp": tmp, "servers": servers, "port": port}
        )
        args = [nginx, "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)]
        with _process(args, port) as popen:
            yield Running(f"http://127.0.0.1:{port}", [popen.pid], {"worker_processes": workers})


@contextlib.contextmanager
def start_target(
    name: str, backends: list[MockBackend], bw_help: str, install_peers: bool
) -> Iterator[Running]:
    if name == "direct":
        b = backends[0]
        yield Running(b.url, [b.popen.pid], {"note": "one mock backend, no router"})
    elif name == "breakwater":
        procs = 1 if "--processes" in bw_help else None
        with start_breakwater(backends, procs) as r:
            yield r
    elif name == "breakwater_all_cores":
        if "--processes" not in bw_help:
            raise Skip("the gateway has no --processes flag yet (see `gateway --help`)")
        with start_breakwater(backends, os.cpu_count() or 1) as r:
            yield r
    elif name in PEERS:
        with start_peer(name, backends, install_peers) as r:
            yield r
    elif name == "nginx":
        with start_nginx(backends, "1") as r:
            yield r
    elif name == "nginx_all_cores":
        with start_nginx(backends, "auto") as r:
            yield r
    else:
        raise ValueError(f"unknown target {name!r}")


# -- the benchmark ---------------------------------------------------------------------------


def backend_counts(backends: list[MockBackend]) -> list[tuple[int, int]]:
    """(connections accepted, POSTs answered) by each mock backend so far."""
    out = []
    for b in backends:
        host, port = b.url.split("://", 1)[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/stats")
            stats = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        posts = sum(
            v for k, v in stats["paths"].items() if k.startswith("/v1/") and "models" not in k
        )
        out.append((stats["connections"], posts))
    return out


def measure(
    running: Running,
    backends: list[MockBackend],
    wl: Workload,
    gen: Generator,
    duration_s: float,
    connections: int,
    warmup_s: float,
) -> dict[str, Any]:
    if warmup_s > 0:
        gen(running.url, wl, warmup_s, connections)
    backend_pids = [b.popen.pid for b in backends]
    counts0 = backend_counts(backends)
    cpu0, back0 = tree_cpu_s(running.pids), tree_cpu_s(backend_pids)
    r = gen(running.url, wl, duration_s, connections)
    cpu1, back1 = tree_cpu_s(running.pids), tree_cpu_s(backend_pids)
    counts1 = backend_counts(backends)
    good = r.good

    def per_req(cpu_s: float) -> float | None:
        return round(cpu_s * 1e6 / good, 1) if good else None

    return {
        "rps": round(good / r.duration_s, 1) if r.duration_s else 0.0,
        "p50_ms": round(r.p50_ms, 3),
        "p99_ms": round(r.p99_ms, 3),
        "requests": r.requests,
        "errors": r.errors,
        "status_errors": r.status_errors,
        "socket_errors": r.socket_errors,
        "bad_body": r.bad_body,
        "valid": r.errors <= MAX_ERROR_SHARE * max(1, r.requests),
        "cpu_us_per_req": per_req(cpu1 - cpu0),
        "cpu_cores": round((cpu1 - cpu0) / r.duration_s, 2) if r.duration_s else None,
        "backend_cpu_us_per_req": per_req(back1 - back0),
        "backend_requests": [b[1] - a[1] for a, b in zip(counts0, counts1, strict=True)],
        # less the /stats connection each backend_counts call makes to each backend
        "backend_new_connections": sum(
            b[0] - a[0] - 1 for a, b in zip(counts0, counts1, strict=True)
        ),
        "duration_s": round(r.duration_s, 2),
        "generator": r.generator,
    }


def _ratio(a: Any, b: Any) -> float | None:
    numbers = isinstance(a, int | float) and isinstance(b, int | float)
    return round(a / b, 3) if numbers and b else None


def ratios(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Breakwater against vLLM's router; p50 every router adds over direct."""
    out: dict[str, Any] = {}
    peer = targets.get("vllm_router", {})
    for bw in ("breakwater", "breakwater_all_cores"):
        mine = targets.get(bw, {})
        for wl in (w.name for w in WORKLOADS):
            a, b = mine.get(wl), peer.get(wl)
            if a and b:
                out[f"{bw}_vs_vllm_router"] = out.get(f"{bw}_vs_vllm_router", {}) | {
                    wl: {
                        "cpu_per_req_ratio": _ratio(a["cpu_us_per_req"], b["cpu_us_per_req"]),
                        "rps_ratio": _ratio(a["rps"], b["rps"]),
                    }
                }
    direct = targets.get("direct", {})
    for wl in (w.name for w in WORKLOADS):
        if (d := direct.get(wl)) is None:
            continue
        for name, t in targets.items():
            if name != "direct" and (m := t.get(wl)) is not None:
                m["added_p50_ms"] = round(m["p50_ms"] - d["p50_ms"], 3)
    if (bw_sse := targets.get("breakwater", {}).get("sse")) and "added_p50_ms" in bw_sse:
        out["breakwater_added_p50_ms_sse"] = bw_sse["added_p50_ms"]
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    wrk = shutil.which("wrk")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
        "commit": commit or None,
        "wrk": wrk is not None,
    }


def run_bench(
    targets: list[str],
    duration_s: float,
    connections: int,
    warmup_s: float,
    gen: Generator,
    install_peers: bool = True,
    quick: bool = False,
) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    info: dict[str, Any] = {}
    mach = machine()
    bw_help = gateway_help() if any(t.startswith("breakwater") for t in targets) else ""
    with start_mock_backends(3, MODEL) as backends:
        for name in targets:
            log(f"{name}: starting")
            try:
                with start_target(name, backends, bw_help, install_peers) as running:
                    bad = {wl.name: verify(running.url, wl) for wl in WORKLOADS}
                    if any(bad.values()):
                        reasons = "; ".join(f"{k}: {v}" for k, v in bad.items() if v)
                        skipped[name] = f"error: wrong answer before measuring: {reasons}"
                        log(f"{name}: {skipped[name]}")
                        continue
                    info[name] = running.info
                    results[name] = {}
                    for i, wl in enumerate(WORKLOADS):
                        # --quick warms each target once, on its first workload.
                        warm = warmup_s if (i == 0 or not quick) else 0.0
                        log(f"{name}/{wl.name}: {duration_s:g}s at {connections} connections")
                        results[name][wl.name] = m = measure(
                            running, backends, wl, gen, duration_s, connections, warm
                        )
                        log(
                            f"{name}/{wl.name}: {m['rps']:.0f} rps, p50 {m['p50_ms']:.2f} ms,"
                            f" errors {m['errors']}, cpu {m['cpu_us_per_req']} us/req"
                        )
            except Skip as e:
                skipped[name] = str(e)
                log(f"{name}: skipped: {e}")
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                skipped[name] = f"error: {type(e).__name__}: {str(e)[-1500:]}"
                log(f"{name}: {skipped[name]}")
    mach["loadavg_end"] = list(os.getloadavg())
    return {
        "targets": results,
        "ratios": ratios(results),
        "skipped": skipped,
        "target_info": info,
        "settings": {
            "duration_s": duration_s,
            "connections": connections,
            "warmup_s": warmup_s,
            "backends": 3,
            "json_tokens": JSON_TOKENS,
            "sse_chunks": SSE_CHUNKS,
        },
        "machine": mach,
    }


def format_table(report: dict[str, Any]) -> str:
    head = (
        f"{'target':<22}{'load':<6}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'cpu us/req':>12}{'cores':>7}{'+p50 ms':>9}"
    )
    rows = [head, "-" * len(head)]
    for name, t in report["targets"].items():
        for wl, m in t.items():

            def num(v: Any, fmt: str) -> str:
                return "-" if v is None else format(v, fmt)

            flag = "" if m["valid"] else "  INVALID (errors)"
            rows.append(
                f"{name:<22}{wl:<6}{m['rps']:>9.0f}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
                f"{m['errors']:>8}{num(m['cpu_us_per_req'], '.1f'):>12}"
                f"{num(m['cpu_cores'], '.2f'):>7}{num(m.get('added_p50_ms'), '+.2f'):>9}{flag}"
            )
    for key, v in report["ratios"].items():
        rows.append(f"{key}: {json.dumps(v)}")
    for name, why in report["skipped"].items():
        rows.append(f"skipped {name}: {why}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, one warm-up per target")
    ap.add_argument("--duration", type=float, help="seconds per run (default 10, quick 3)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--warmup", type=float, help="seconds (default 2, quick 1)")
    ap.add_argument("--targets", help=f"comma list of {','.join(ALL_TARGETS)}")
    ap.add_argument("--no-peers", action="store_true", help="skip vllm_router and sglang_router")
    ap.add_argument("--no-install", action="store_true", help="never pip install a peer")
    ap.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    ap.add_argument("--json", action="store_true", help="print one JSON object last on stdout")
    args = ap.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    targets = args.targets.split(",") if args.targets else list(ALL_TARGETS)
    if unknown := [t for t in targets if t not in ALL_TARGETS]:
        ap.error(f"unknown targets {unknown}; choose from {','.join(ALL_TARGETS)}")
    pre_skipped: dict[str, str] = {}
    if args.no_peers:
        pre_skipped = {t: "--no-peers" for t in targets if t in PEER_TARGETS}
        targets = [t for t in targets if t not in PEER_TARGETS]
    use_wrk = args.generator == "wrk" or (args.generator == "auto" and shutil.which("wrk"))
    if args.generator == "wrk" and not shutil.which("wrk"):
        ap.error("wrk is not installed (apt-get install -y wrk)")
    if not use_wrk:
        log("wrk not found: using the Python generator (its rps is a floor, not a router limit)")
    gen: Generator = run_wrk if use_wrk else run_python
    report = run_bench(
        targets, duration, args.connections, warmup, gen, not args.no_install, args.quick
    )
    report["skipped"] = pre_skipped | report["skipped"]
    print(format_table(report), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
