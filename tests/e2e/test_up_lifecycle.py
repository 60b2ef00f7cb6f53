"""`breakwater up` stops on Ctrl-C at any moment, and children that print never stall it.

A Ctrl-C in its first seconds (the demo model being written, workers half spawned) once
went to asyncio's own handling and hung `up` for good; a child's stdout, unread after its
READY line, filled its pipe, which blocked the child (console traces) and then `up`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.procs import Proc, child_pids, interrupt_and_reap, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("delay_s", [0.8, 1.6, 2.4])
def test_ctrl_c_while_starting_ends_up_promptly(delay_s: float, tmp_path: Path) -> None:
    env = {**os.environ, "BREAKWATER_CACHE": str(tmp_path / "cache")}  # a model to write
    proc = subprocess.Popen(
        [sys.executable, "-m", "breakwater.cli", "up", "--engine", "torch", "--workers", "2",
         "--gateway-processes", "1", "--port", "0"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        time.sleep(delay_s)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the foreground group
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"`breakwater up` still ran 120 s after Ctrl-C at {delay_s} s")
    with pytest.raises(ProcessLookupError):  # nothing of the group is left
        os.killpg(proc.pid, 0)
    # nor any child (each has a group of its own): they have this run's cache in their env
    mark = f"BREAKWATER_CACHE={tmp_path / 'cache'}".encode()
    wait_for(lambda: not _with_env(mark), timeout=30)


def _with_env(mark: bytes) -> list[int]:
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if mark in fh.read().split(b"\0"):
                    found.append(pid)
        except OSError:
            pass
    return found


def test_a_child_that_prints_a_lot_stalls_nothing() -> None:
    up = Proc(
        ["up", "--engine", "sim", "--workers", "1", "--gateway-processes", "1", "--port", "0"],
        "Breakwater is up",
        timeout=120,
        env={"BREAKWATER_TRACE_EXPORTER": "console"},  # every call: a span on stdout
    )
    try:
        line = next(x for x in up.stdout_lines if x.startswith("Breakwater is up"))
        url = line.split("gateway ")[1].split()[0]
        model = line.split("model ")[1].rstrip(")\n")
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        req = urllib.request.Request(
            url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        for _ in range(300):  # ~1 MB of spans: many times a pipe's 64 KiB
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200
        assert sum(len(x) for x in up.stdout_lines) > 256 * 1024  # forwarded, in order
        interrupt_and_reap(up, child_pids(up))  # exits 0, no child left
    finally:
        up.kill()


def test_a_worker_that_dies_is_restarted_on_its_ports_and_up_goes_on() -> None:
    """One worker's crash stopped all of `up`, the gateway and the healthy workers with it:
    it now comes back on the ports it had, and the gateway routes around it meanwhile."""
    up = Proc(
        ["up", "--engine", "sim", "--sim-preset", "tiny", "--workers", "2",
         "--gateway-processes", "1", "--port", "0"],
        "Breakwater is up",
        timeout=240,
    )  # fmt: skip
    try:
        line = next(x for x in up.stdout_lines if x.startswith("Breakwater is up"))
        url = line.split("gateway ")[1].split()[0]
        model = line.split("model ")[1].rstrip(")\n")
        text = "\n".join(up.stdout_lines)
        metrics = [u.removesuffix(",") for u in text.split("workers: ")[1].split()[:2]]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

        def ok(target: str) -> bool:
            try:
                with urllib.request.urlopen(target, timeout=10) as r:
                    return r.status == 200
            except OSError:
                return False

        def chat() -> int:
            req = urllib.request.Request(
                url + "/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status

        workers = [p for p in child_pids(up) if "breakwater.cli worker " in _cmdline(p)]
        assert len(workers) == 2 and all(ok(m) for m in metrics)
        os.kill(workers[0], signal.SIGKILL)
        assert [chat() for _ in range(6)] == [200] * 6  # the other worker serves meanwhile
        wait_for(lambda: all(ok(m) for m in metrics), timeout=120)  # back, on its ports
        assert up.alive()
        assert any("restarting it" in x for x in up.log_text().splitlines())
        interrupt_and_reap(up, child_pids(up))
    finally:
        up.kill()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""
