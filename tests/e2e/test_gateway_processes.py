"""`breakwater gateway --processes N`: siblings share one port, are restarted, and stop together."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loadtest.fleet import ADMIN_TOKEN, admin_json, free_port
from tests.procs import Proc, start_gateway, start_sim_worker, wait_for


@pytest.fixture(scope="module")
def worker() -> Iterator[Proc]:
    w = start_sim_worker()
    yield w
    w.stop()


def _process(url: str) -> int:
    """Which process answered; a new connection each time, so the kernel may pick either."""
    req = urllib.request.Request(url + "/healthz", headers={"Connection": "close"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(json.loads(r.read())["process"])


def _complete(url: str) -> dict:
    body = json.dumps({"model": "sim", "prompt": "hi", "max_tokens": 4}).encode()
    req = urllib.request.Request(
        url + "/v1/completions", body, {"Content-Type": "application/json", "Connection": "close"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _served(url: str, headers: dict[str, str] | None = None) -> float:
    """Requests answered 200, from the merged /metrics (any process may answer it)."""
    req = urllib.request.Request(
        url + "/metrics", headers={"Connection": "close", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("breakwater_requests_total{") and 'status="200"' in line
    )


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_two_processes_serve_one_port(worker: Proc) -> None:
    gw = start_gateway("--worker", worker.ready["grpc"], processes=2)
    try:
        assert gw.ready["processes"] == "2"
        url = gw.ready["http"]

        def answering() -> set[int]:
            return {_process(url) for _ in range(20)}

        assert wait_for(lambda: answering() == {0, 1}, timeout=60)
        # Every process serves requests (admission split between them, both route).
        for _ in range(10):
            assert _complete(url)["choices"][0]["finish_reason"] == "length"
        (sibling,) = _children(gw.pid)
        view = admin_json(gw, "/admin/workers")  # the admin listener is process 0's
        assert (view["process"]["pid"], view["process"]["processes"]) == (gw.pid, 2)
        # Ready to serve, the process froze what startup built (serving/heap.py).
        assert view["process"]["gc"]["frozen_objects"] > 10_000
        assert view["process"]["gc"]["thresholds"][0] == 10_000
        # What explains a 503 from the learnt limits: each replica's, and the loop's lag.
        assert 0 <= view["process"]["loop_lag_ms"] < 10_000
        limits = view["admission"]["replica_limits"]
        assert set(limits) == {w["worker_id"] for w in view["workers"]}

        # A sibling that dies is replaced on the same port, and the merged counters keep
        # what it had counted (they went backwards: its replacement starts from zero).
        # process 0 (the admin listener's) sees the sibling's 10 only from its snapshot
        wait_for(lambda: _served(gw.ready["admin"] + "/admin", ADMIN) == 10, timeout=30)
        os.kill(sibling, signal.SIGKILL)
        replaced = wait_for(lambda: (_children(gw.pid) - {sibling}) or None, timeout=60)
        (new_sibling,) = replaced
        assert new_sibling != sibling
        wait_for(lambda: 1 in answering(), timeout=60)
        _complete(url)
        assert wait_for(lambda: _served(url) == 11, timeout=30)
        # grpc-core's fork handlers are off in process 0: skipped in the parent while its
        # threads ran, they crashed a forked sibling before its exec now and then
        assert "skipping fork() handlers" not in gw.log_text()
    finally:
        children = _children(gw.pid)
        assert gw.stop() == 0
    # Stopping the first process stops them all.
    wait_for(lambda: not any(_alive(p) for p in children), timeout=30)


def test_prefix_aware_processes_share_their_routing(worker: Proc) -> None:
    """Turns of one conversation reach either process; both send them to the same replica."""
    other = start_sim_worker()
    gw = start_gateway(
        "--worker",
        worker.ready["grpc"],
        "--worker",
        other.ready["grpc"],
        "--routing",
        "prefix-aware",
        processes=2,
    )
    try:
        url = gw.ready["http"]

        def where(prompt: str) -> str:
            body = json.dumps({"model": "sim", "prompt": prompt, "max_tokens": 2}).encode()
            req = urllib.request.Request(
                url + "/v1/completions",
                body,
                {"Content-Type": "application/json", "Connection": "close"},
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.headers["x-breakwater-worker"]

        def shared() -> dict[int, dict[str, int]]:
            """Decisions each process has sent to and heard from its sibling, by index."""
            seen: dict[int, dict[str, int]] = {}
            while len(seen) < 2:
                req = urllib.request.Request(url + "/healthz", headers={"Connection": "close"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    h = json.loads(r.read())
                seen[h["process"]] = h["routing_shared"]
            return seen

        def all_delivered() -> bool:
            counts = shared().values()
            return sum(c["sent"] for c in counts) == sum(c["received"] for c in counts)

        def routes_on_tokens() -> dict[int, bool]:
            """Per process: it has loaded the workers' tokenizer and follows both caches."""
            seen: dict[int, bool] = {}
            while len(seen) < 2:
                req = urllib.request.Request(url + "/healthz", headers={"Connection": "close"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    h = json.loads(r.read())
                seen[h["process"]] = h["routing_tokenizers"] > 0 and h["cache_reports"] == 2
            return seen

        # Both processes route on the engine's token blocks before the first decision: a
        # decision made on token keys is shared as those keys only (text keys too would
        # cost every request ~30 us), so a sibling still loading the tokenizer, seconds
        # on a loaded machine, could not match it and placed the next turn elsewhere.
        wait_for(lambda: all(routes_on_tokens().values()), timeout=60)
        for n in range(4):
            prompt = f"conversation {n}: " + "a long shared system prompt. " * 20
            first = where(prompt)
            # Every decision so far has reached the other process (in milliseconds); from
            # then on every turn, whichever process takes its connection, goes where the
            # first one went.
            wait_for(all_delivered, timeout=30)
            assert [where(prompt) for _ in range(8)] == [first] * 8
    finally:
        gw.stop()
        other.stop()


def test_a_killed_gateways_shared_directory_goes_with_the_next_start(
    worker: Proc, tmp_path: Path
) -> None:
    """A gateway killed outright leaves its processes' shared directory behind; the next
    gateway to start on the host removes it, and its own goes when it stops."""

    def dirs() -> set[str]:
        return {p.name for p in tmp_path.glob("breakwater-gateway-*")}

    env = {"TMPDIR": str(tmp_path)}
    killed = start_gateway("--worker", worker.ready["grpc"], processes=2, env=env)
    try:
        (left,) = dirs()
        (sibling,) = wait_for(lambda: _children(killed.pid), timeout=60)
        killed.kill()
        wait_for(lambda: not _alive(sibling), timeout=30)  # it dies with its parent
    finally:
        killed.stop()
    assert dirs() == {left}
    gw = start_gateway("--worker", worker.ready["grpc"], processes=2, env=env)
    try:
        (own,) = dirs()
        assert own != left
    finally:
        assert gw.stop() == 0
    assert dirs() == set()


def _gateway_run(*args: str) -> subprocess.CompletedProcess[str]:
    """A gateway expected to exit by itself: its exit code and what it wrote."""
    argv = [sys.executable, "-m", "breakwater.cli", "gateway", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_a_port_another_gateway_serves_is_refused(worker: Proc) -> None:
    """Siblings share their ports through SO_REUSEPORT, which lets any process of the same
    user join them: a second gateway started on a port the first serves must fail in one
    line, not silently take a share of its connections."""
    first = start_gateway("--worker", worker.ready["grpc"], processes=2)
    try:
        port = urlsplit(first.ready["http"]).port
        assert port is not None
        second = _gateway_run(
            "--port", str(port), "--processes", "2", "--worker", worker.ready["grpc"]
        )
        assert second.returncode == 1, second.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{port} for HTTP: Address already in use" in (
            second.stderr
        )
        assert "Traceback" not in second.stderr
        assert _complete(first.ready["http"])["choices"][0]["finish_reason"] == "length"
    finally:
        assert first.stop() == 0


def test_a_taken_grpc_port_is_named_and_the_gateway_exits_cleanly() -> None:
    """The gateway stops what it started and exits 1. Its workers cannot be reached here,
    so the cache watcher is retrying when it stops: its follow once lost that cancel (to
    asyncio.wait_for) and held the shutdown for the step's 10 s limit."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        out = _gateway_run(
            "--port", "0", "--grpc-port", str(port), "--worker", f"127.0.0.1:{free_port()}"
        )
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port} for gRPC: Address already in use" in out.stderr
    assert "Traceback" not in out.stderr
    assert "did not stop" not in out.stderr  # every shutdown step ended in its time


def test_merged_counters_never_go_back_between_scrapes(worker: Proc) -> None:
    """A scrape merged the answering process's live counts with its siblings' snapshots of
    up to a second before: the next scrape, answered by a sibling, read the first process
    at its older snapshot, and the totals went back (33 times in 150 scrapes at three
    processes), each a counter reset to rate()."""
    import itertools
    import threading

    gw = start_gateway("--worker", worker.ready["grpc"], processes=3)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            _complete(gw.ready["http"])

    senders = [threading.Thread(target=load) for _ in range(3)]
    try:
        for t in senders:
            t.start()
        totals = []
        for _ in range(80):
            totals.append(_served(gw.ready["http"]))
        stop.set()
        for t in senders:
            t.join(60)
        back = [(a, b) for a, b in itertools.pairwise(totals) if b < a]
        assert not back, back
        assert totals[-1] > totals[0]
    finally:
        stop.set()
        gw.stop()
