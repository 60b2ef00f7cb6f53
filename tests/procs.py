"""Real Breakwater processes for tests: the same harness the chaos suite uses."""

import json
import os
import signal
import urllib.error
import urllib.request

from loadtest.fleet import Proc, start_gateway, start_sim_worker, start_worker, wait_for

__all__ = [
    "Proc",
    "child_pids",
    "complete",
    "interrupt_and_reap",
    "metric_total",
    "start_gateway",
    "start_sim_worker",
    "start_worker",
    "vm_kb",
    "wait_for",
]


def complete(
    gw: Proc, i: int, model: str = "sim", key: str | None = None, stream: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One short completion through the gateway's HTTP port: (status, headers, body)."""
    headers = {"Content-Type": "application/json", "Connection": "close"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {"model": model, "prompt": f"p{i}", "max_tokens": 3, "stream": stream}
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def vm_kb(pid: int, key: str) -> int:
    """A /proc/<pid>/status figure in kB (VmRSS: now, VmHWM: the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child_pids(proc: Proc) -> list[int]:
    return [int(p) for p in os.popen(f"pgrep -P {proc.pid}").read().split()]


def interrupt_and_reap(proc: Proc, children: list[int]) -> None:
    """Ctrl-C: the process exits 0 and every child it had is gone."""
    proc.signal(signal.SIGINT)
    assert proc.wait(90) == 0
    for pid in children:
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=30)


def metric_total(gw: Proc, sample: str, label: str) -> float:
    """The sum of `sample` over the gateway's series whose labels include `label` (e.g.
    'status="400"'), read from its /metrics."""
    with urllib.request.urlopen(gw.ready["http"] + "/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(sample + "{") and label in line
    )
