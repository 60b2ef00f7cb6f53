"""Router benchmark: Breakwater's gateway against vLLM's and SGLang's routers and nginx.

    python -m loadtest.peer_bench [--quick] [--json] [--duration S] [--connections N]
        [--targets direct,breakwater,...] [--no-peers] [--generator auto|wrk|python]
    python -m loadtest.peer_bench --workload chat [--quick] [--json] [--targets ...]
        [--no-peers] [--workers 4] [--rate R | --load 0.7] [routing_bench's workload flags]

The default workload (mock) measures what a router costs; `--workload chat` measures where
it sends requests (both are described below).

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
`skipped`, not a result.

`--workload chat`: `loadtest.routing_bench`'s multi-turn chat (shared system prompts, whole
histories resent each turn, Poisson arrivals at `--load` of the capacity one closed-loop
probe measures) through each target in turn, all fronting the same sim workers (`--workers`
4, each with its gRPC port and its own OpenAI HTTP port, a KV cache that holds a share of
the system prompts). Targets: `breakwater` (the gateway, one process, default routing, over
the workers' HTTP ports), `breakwater_grpc` (the same given their gRPC ports, as `breakwater
up` runs it: streams relayed to the OpenAI port each worker reports, the rest over gRPC),
`vllm_router_cache_aware`, `vllm_router_power_of_two`, `vllm_router_kv_aware`,
`sglang_router_cache_aware` and `nginx_round_robin`. Every target gets the same arrivals
and prompts, each run salted so no run hits another's blocks. Per target: hit rate from
the workers' own counters (gRPC Stats, differenced around the run), TTFT p50/p99,
throughput, errors (must be 0), the router's CPU microseconds per request (its process
tree, /proc), the workers' (all four trees: what routing spares or costs them, such as
tokenizing), and load imbalance (requests per worker, from the tokens each generated);
`ratios` puts every target against `breakwater` (> 1 where Breakwater is better) and
`goal` judges the issue's target (hit rate and TTFT p50 better than both Rust routers'
cache-aware policies). A router that cannot start is in `skipped` with its reason.

All traffic goes to 127.0.0.1; every process started is stopped by PID.
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadtest.fleet import Proc, admin_json, free_port, terminate
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
    ejections: Callable[[], int] | None = None
    """Breakwater's: times it ejected a replica so far (none should, on a healthy fleet)."""
    decisions: Callable[[], dict[str, int]] | None = None
    """Breakwater's: its prefix-aware decisions so far, by reason (routing.policy.DECISIONS)."""


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
    command: Callable[[Path, list[str], int, int, str], list[str]]
    """(venv, worker URLs, port, prometheus port, policy) -> argv."""


def _router_args(
    urls: list[str], port: int, prom: int, log_level: str, policy: str = "round_robin"
) -> list[str]:
    """Flags both Rust routers take alike: loopback only, the routing policy (`--policy`,
    round robin for the mock workloads), Prometheus moved off its default port 29000."""
    return [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *urls,
        "--policy",
        policy,
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
        lambda venv, urls, port, prom, policy: [
            str(venv / "bin" / "vllm-router"),
            *_router_args(urls, port, prom, "warning", policy),
        ],
    ),
    "sglang_router": Peer(
        "sglang-router",
        "0.3.2",
        lambda venv, urls, port, prom, policy: [
            str(venv / "bin" / "python"),
            "-m",
            "sglang_router.launch_router",
            *_router_args(urls, port, prom, "warn", policy),
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
def start_peer(
    name: str, urls: list[str], install: bool = True, policy: str = "round_robin"
) -> Iterator[Running]:
    """The peer router `name` in front of the OpenAI servers at `urls`."""
    peer = PEERS[name]
    venv = ensure_peer(name, peer, install)
    port, prom = free_port(), free_port()
    args = peer.command(venv, urls, port, prom, policy)
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


def nginx_path() -> str:
    """Debian's nginx, or '' when it is not installed."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")


@contextlib.contextmanager
def start_nginx(urls: list[str], workers: str) -> Iterator[Running]:
    """nginx round robin over the HTTP servers at `urls` (upstream keepalive, unbuffered)."""
    nginx = nginx_path()
    if not nginx:
        raise Skip("nginx is not installed (apt-get install -y nginx)")
    with tempfile.TemporaryDirectory(prefix="peer-bench-nginx-") as tmp:
        port = free_port()
        servers = "\n".join(f"        server {u.split('://', 1)[1]};" for u in urls)
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
        with start_peer(name, [b.url for b in backends], install_peers) as r:
            yield r
    elif name == "nginx":
        with start_nginx([b.url for b in backends], "1") as r:
            yield r
    elif name == "nginx_all_cores":
        with start_nginx([b.url for b in backends], "auto") as r:
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
    changed = subprocess.run(
        # read-only: no index refresh, so no lock a concurrent git command could trip on
        ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    wrk = shutil.which("wrk")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
        "commit": commit or None,
        "uncommitted_changes": bool(changed) if commit else None,
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


# -- the chat workload (--workload chat) -----------------------------------------------------

CHAT_TARGETS = (
    "breakwater",
    "breakwater_grpc",
    "vllm_router_cache_aware",
    "vllm_router_power_of_two",
    "vllm_router_kv_aware",
    "sglang_router_cache_aware",
    "nginx_round_robin",
)
CHAT_PEERS = {
    "vllm_router_cache_aware": ("vllm_router", "cache_aware"),
    "vllm_router_power_of_two": ("vllm_router", "power_of_two"),
    "vllm_router_kv_aware": ("vllm_router", "kv_aware"),
    "sglang_router_cache_aware": ("sglang_router", "cache_aware"),
}
"""Chat targets that are pip-installed peers: (PEERS key, its --policy)."""
CACHE_AWARE_PEERS = ("vllm_router_cache_aware", "sglang_router_cache_aware")
"""The peers the issue's goal is judged against."""
CHAT_NOTES = {
    "breakwater": "the gateway, 1 process, default routing, over the workers' OpenAI ports",
    "breakwater_grpc": (
        "the gateway, 1 process, default routing, given the workers' gRPC ports as "
        "`breakwater up` does: health, stats and cache reports over gRPC, streams relayed "
        "to the OpenAI port each worker reports"
    ),
    "vllm_router_cache_aware": (
        "tokenizes each chat on a worker first (POST /v1/chat/completions/render, which the "
        "worker does not serve, then POST /tokenize) and matches token prefixes"
    ),
    "vllm_router_kv_aware": (
        "blind here: it scores workers by the KV events they publish over ZMQ "
        "(GET /kv_event_sources), which sim workers do not, so it credits no cached prefix"
    ),
    "sglang_router_cache_aware": "matches text prefixes of the chat in its own radix tree",
    "nginx_round_robin": "nginx, 1 worker process, round robin, upstream keepalive",
}
CHAT_ERROR_REASONS = 8
"""Distinct error kinds kept per target."""


@dataclass
class ChatFleet:
    """The sim workers every chat target fronts: gRPC addresses (their counters, and the
    breakwater_grpc target) and OpenAI HTTP URLs (every other target)."""

    procs: list[Proc]

    @property
    def grpc(self) -> list[str]:
        return [p.ready["grpc"] for p in self.procs]

    @property
    def http(self) -> list[str]:
        return [p.ready["http"] for p in self.procs]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]


@contextlib.contextmanager
def start_chat_target(name: str, fleet: ChatFleet, install_peers: bool) -> Iterator[Running]:
    from loadtest.routing_bench import ejections, refusal, start_policy_gateway

    info: dict[str, Any] = {"note": CHAT_NOTES.get(name, "")}
    if name in ("breakwater", "breakwater_grpc"):
        specs = fleet.http if name == "breakwater" else fleet.grpc
        try:
            # Probes at the gateway's default interval (1 s), as the peers run at theirs:
            # routing_bench's 0.25 s costs an idle gateway in front of 4 gRPC workers
            # 15.5 ms of CPU a second against 8.5, which a per-request figure at 8 req/s
            # would charge to routing.
            gw = start_policy_gateway(None, specs, health_interval=None)
        except (RuntimeError, AssertionError) as e:
            raise RuntimeError(f"the gateway did not start: {refusal(e)}") from None
        try:
            yield Running(
                gw.ready["http"],
                [gw.pid],
                info | {"processes": 1},
                lambda: ejections(gw),
                lambda: admin_json(gw, "/admin/workers")["routing"].get("decisions", {}),
            )
        finally:
            gw.stop()
    elif name in CHAT_PEERS:
        peer, policy = CHAT_PEERS[name]
        with start_peer(peer, fleet.http, install_peers, policy) as r:
            r.info |= info | {"policy": policy}
            yield r
    elif name == "nginx_round_robin":
        with start_nginx(fleet.http, "1") as r:
            r.info |= info
            yield r
    else:
        raise ValueError(f"unknown chat target {name!r}")


def verify_chat(url: str, send_one: Callable[[str, str], Any], salt: str, timeout: float) -> str:
    """'' once one streamed chat turn through `url` comes back whole; else the last reason it
    did not. Retried until `timeout`: a router may listen before it has admitted a worker."""
    deadline = time.monotonic() + timeout
    while True:
        rec = send_one(url, salt)
        if rec.ok and rec.output_tokens > 0:
            return ""
        reason = f"{rec.status}" + (f" ({rec.error_code})" if rec.error_code else "")
        if time.monotonic() > deadline:
            return reason
        time.sleep(0.5)


def chat_figures(
    figs: dict[str, Any], cpu_s: float, max_tokens: int, deltas: list[dict[str, int]]
) -> dict[str, Any]:
    """The issue's figures first (hit rate from the workers' counters, TTFT, throughput,
    errors, router CPU per request, imbalance), then routing_bench's explaining figures."""
    ok = figs["ok"]
    head = {
        "hit_rate": figs["hit_rate"],
        "ttft_p50_ms": figs["ttft_p50_ms"],
        "ttft_p99_ms": figs["ttft_p99_ms"],
        "throughput_rps": figs["throughput_rps"],
        "errors": figs["failed"],
        "router_cpu_us_per_request": round(cpu_s * 1e6 / ok, 1) if ok else None,
        "load_imbalance": figs["load_imbalance"],
    }
    rest = {k: v for k, v in figs.items() if k not in head and k != "errors"}
    kinds = sorted(figs["errors"].items(), key=lambda kv: -kv[1])[:CHAT_ERROR_REASONS]
    return (
        head
        | rest
        | {
            "error_kinds": dict(kinds),
            "router_cpu_s": round(cpu_s, 3),
            "requests_per_worker_from": "generation_tokens_total / max_tokens (workers' counters)",
            "generation_tokens_per_worker": [d["generation_tokens_total"] for d in deltas],
            "max_tokens": max_tokens,
        }
    )


def chat_ratios(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every other target against `breakwater`, each ratio > 1 where Breakwater is better:
    hit rate and throughput Breakwater's over the target's; TTFT and router CPU per
    request the target's over Breakwater's."""
    bw = targets.get("breakwater")
    if bw is None:
        return {}
    out: dict[str, Any] = {}
    for name, t in targets.items():
        if name == "breakwater":
            continue
        out[f"breakwater_vs_{name}"] = {
            "hit_rate": _ratio(bw["hit_rate"], t["hit_rate"]),
            "ttft_p50": _ratio(t["ttft_p50_ms"], bw["ttft_p50_ms"]),
            "ttft_p99": _ratio(t["ttft_p99_ms"], bw["ttft_p99_ms"]),
            "throughput": _ratio(bw["throughput_rps"], t["throughput_rps"]),
            "router_cpu_per_request": _ratio(
                t["router_cpu_us_per_request"], bw["router_cpu_us_per_request"]
            ),
        }
    return out


def chat_goal(targets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's target: Breakwater's hit rate higher and TTFT p50 lower than both Rust
    routers' cache-aware policies, in the same run; judged only when all three ran."""
    bw = targets.get("breakwater")
    peers = {n: targets[n] for n in CACHE_AWARE_PEERS if n in targets}
    if bw is None or len(peers) < len(CACHE_AWARE_PEERS):
        return {"judged": False, "why": "breakwater and both cache-aware peers must run"}
    hit = {n: bw["hit_rate"] > p["hit_rate"] for n, p in peers.items()}
    ttft = {
        n: bw["ttft_p50_ms"] is not None
        and p["ttft_p50_ms"] is not None
        and bw["ttft_p50_ms"] < p["ttft_p50_ms"]
        for n, p in peers.items()
    }
    clean = {n: targets[n]["errors"] == 0 for n in ("breakwater", *peers)}
    return {
        "judged": True,
        "hit_rate_better": hit,
        "ttft_p50_better": ttft,
        "no_errors": clean,
        "met": all(hit.values()) and all(ttft.values()) and all(clean.values()),
    }


def run_chat(
    cfg: Any, targets: list[str], install_peers: bool = True, verify_timeout: float = 30.0
) -> dict[str, Any]:
    """The chat workload of `loadtest.routing_bench` through each target in turn, all
    fronting the same sim workers (`cfg`: a routing_bench.BenchConfig)."""
    from loadtest.chat_workload import ChatWorkload
    from loadtest.loadgen import Schedule
    from loadtest.routing_bench import (
        HIT_COUNTER_UNIT,
        chat_open_loop,
        counted,
        kv_tokens_for,
        policy_figures,
        probe_capacity,
        start_workers,
        stop_all,
        workload_info,
    )

    t_start = time.monotonic()
    mach = machine()
    workload = ChatWorkload(cfg.seed, cfg.system_prompts, turns=cfg.turns)
    sys_tokens = workload.system_prompt_tokens()
    kv_tokens = kv_tokens_for(cfg, sys_tokens)
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    info: dict[str, Any] = {}
    timings: dict[str, float] = {}
    out: dict[str, Any] = {"workload": "chat", "capacity_rps": None, "offered_rps": None}

    def send_one(url: str, salt: str) -> Any:
        return asyncio.run(chat_open_loop([url], workload, [0.0], cfg, salt))[0].record

    log(f"starting {cfg.workers} sim workers ({cfg.preset}, {kv_tokens} KV tokens each)")
    t = time.monotonic()
    fleet = ChatFleet(start_workers(cfg, kv_tokens, "--http-port", "0"))
    timings["start_workers_s"] = round(time.monotonic() - t, 1)
    try:
        rate = cfg.rate
        if rate is None:
            t = time.monotonic()
            out["capacity_probe"] = probe = probe_capacity(cfg, workload, fleet.grpc)
            timings["probe_s"] = round(time.monotonic() - t, 1)
            out["capacity_rps"] = probe["capacity_rps"]
            rate = cfg.load * probe["capacity_rps"]
        if not rate > 0:
            raise RuntimeError("the capacity probe completed no requests")
        out["offered_rps"] = round(rate, 2)
        offsets = Schedule(rate=rate, seed=cfg.seed).arrivals(cfg.duration_s)
        for n, name in enumerate(targets):
            t = time.monotonic()
            log(f"{name}: starting")
            try:
                with start_chat_target(name, fleet, install_peers) as running:
                    why = verify_chat(running.url, send_one, f"verify {n}", verify_timeout)
                    if why:
                        skipped[name] = f"error: no good answer before measuring: {why}"
                        log(f"{name}: {skipped[name]}")
                        continue
                    log(f"{name}: {len(offsets)} turns at {rate:.2f} req/s")
                    cpu0 = tree_cpu_s(running.pids)
                    workers_cpu0 = tree_cpu_s(fleet.pids)
                    sent, deltas = counted(
                        fleet.grpc,
                        lambda n=n, url=running.url: asyncio.run(
                            chat_open_loop([url], workload, offsets, cfg, f"run {n}")
                        ),
                    )
                    cpu_s = tree_cpu_s(running.pids) - cpu0
                    workers_cpu_s = tree_cpu_s(fleet.pids) - workers_cpu0
                    per_worker = [
                        round(d["generation_tokens_total"] / cfg.max_tokens) for d in deltas
                    ]
                    figs = policy_figures(
                        sent, workload, fleet.grpc, deltas, cfg.duration_s, per_worker
                    )
                    results[name] = m = chat_figures(figs, cpu_s, cfg.max_tokens, deltas)
                    ok = figs["ok"]
                    m["workers_cpu_us_per_request"] = (
                        round(workers_cpu_s * 1e6 / ok, 1) if ok else None
                    )
                    if running.ejections is not None:
                        m["replica_ejections"] = running.ejections()
                    if running.decisions is not None:
                        m["routing_decisions"] = running.decisions()
                    info[name] = running.info
                    log(
                        f"{name}: hit rate {m['hit_rate']}, TTFT p50 {m['ttft_p50_ms']} ms, "
                        f"errors {m['errors']}, cpu {m['router_cpu_us_per_request']} us/req"
                    )
            except Skip as e:
                skipped[name] = str(e)
                log(f"{name}: skipped: {e}")
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                skipped[name] = f"error: {type(e).__name__}: {str(e)[-1500:]}"
                log(f"{name}: {skipped[name]}")
            timings[f"{name}_s"] = round(time.monotonic() - t, 1)
    finally:
        stop_all(fleet.procs)
    oracles = [t["oracle_hit_rate"] for t in results.values()]
    mach["loadavg_end"] = list(os.getloadavg())
    timings["total_s"] = round(time.monotonic() - t_start, 1)
    return out | {
        "oracle_hit_rate": round(statistics.mean(oracles), 4) if oracles else None,
        "targets": results,
        "ratios": chat_ratios(results),
        "goal": chat_goal(results),
        "skipped": skipped,
        "target_info": info,
        "hit_counter_unit": HIT_COUNTER_UNIT,
        "workload_info": workload_info(cfg, sys_tokens, kv_tokens),
        "config": {k: v for k, v in asdict(cfg).items() if k != "policies"},
        "timings": timings,
        "machine": mach,
    }


def format_chat_table(report: dict[str, Any]) -> str:
    cols = (
        ("hit_rate", "hit rate", "g"),
        ("ttft_p50_ms", "TTFT p50", "g"),
        ("ttft_p99_ms", "TTFT p99", "g"),
        ("throughput_rps", "req/s", "g"),
        ("errors", "errors", "d"),
        ("router_cpu_us_per_request", "cpu us/req", ".0f"),
        ("load_imbalance", "imbalance", "g"),
    )
    cap = report["capacity_rps"]
    lines = [
        (f"capacity {cap} req/s (closed loop, round-robin)" if cap else "capacity not measured")
        + f"; offered {report['offered_rps']} req/s to each target; "
        f"oracle hit rate {report['oracle_hit_rate']}",
        f"{'target':<27}" + "".join(f"{title:>11}" for _, title, _ in cols),
    ]
    for name, t in report["targets"].items():
        cells = ("-" if t[k] is None else format(t[k], f) for k, _, f in cols)
        lines.append(f"{name:<27}" + "".join(f"{c:>11}" for c in cells))
    if report["ratios"]:
        lines.append(
            "breakwater vs each (> 1: breakwater better): hit rate bw/x, TTFT x/bw, "
            "req/s bw/x, cpu x/bw"
        )
    for key, r in report["ratios"].items():
        cells = " ".join(f"{k} {v}" for k, v in r.items())
        lines.append(f"  {key.removeprefix('breakwater_vs_'):<25} {cells}")
    goal = report["goal"]
    if goal.get("judged"):
        lines.append(
            "goal (hit rate and TTFT p50 better than both cache-aware Rust routers, no "
            f"errors): {'met' if goal['met'] else 'NOT met'}"
        )
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from loadtest.routing_bench import QUICK, BenchConfig, add_workload_args

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument(
        "--workload",
        choices=("mock", "chat"),
        default="mock",
        help="mock: JSON and SSE against mock backends (default); chat: multi-turn chat "
        "over sim workers, hit rates from their counters",
    )
    ap.add_argument("--quick", action="store_true", help="short runs (chat: about 2 minutes)")
    ap.add_argument(
        "--duration", type=float, help="seconds per run (mock 10, quick 3; chat 60, quick 6)"
    )
    ap.add_argument("--targets", help="comma list (default: all of the workload's targets)")
    ap.add_argument("--no-peers", action="store_true", help="skip the pip-installed routers")
    ap.add_argument("--no-install", action="store_true", help="never pip install a peer")
    ap.add_argument("--json", action="store_true", help="print one JSON object last on stdout")
    mock = ap.add_argument_group("mock workload")
    mock.add_argument("--connections", type=int, default=64)
    mock.add_argument("--warmup", type=float, help="seconds (default 2, quick 1)")
    mock.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    chat = ap.add_argument_group("chat workload (as loadtest.routing_bench)")
    add_workload_args(chat)
    args = ap.parse_args(argv)
    if args.workload == "chat":
        # Quick: 10 s of traffic per target, ~2 minutes in all for the seven targets.
        main_chat(ap, args, replace(QUICK, duration_s=10.0) if args.quick else BenchConfig())
        return
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


def main_chat(ap: argparse.ArgumentParser, args: argparse.Namespace, base: Any) -> None:
    from loadtest.routing_bench import workload_config

    targets = args.targets.split(",") if args.targets else list(CHAT_TARGETS)
    if unknown := [t for t in targets if t not in CHAT_TARGETS]:
        ap.error(f"unknown chat targets {unknown}; choose from {','.join(CHAT_TARGETS)}")
    cfg = replace(workload_config(base, args), policies=())
    pre_skipped: dict[str, str] = {}
    if args.no_peers:
        pre_skipped = {t: "--no-peers" for t in targets if t in CHAT_PEERS}
        targets = [t for t in targets if t not in CHAT_PEERS]
    if "nginx_round_robin" in targets and not nginx_path():
        pre_skipped["nginx_round_robin"] = "nginx is not installed (apt-get install -y nginx)"
        targets.remove("nginx_round_robin")
    report = run_chat(cfg, targets, not args.no_install)
    report["skipped"] = pre_skipped | report["skipped"]
    print(format_chat_table(report), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
