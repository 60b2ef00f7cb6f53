"""The demo checkpoint is written once, safely, when several processes ask at the same time."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from worker.engine.demo_model import default_demo_dir, ensure_demo_model

# Each child waits for the go file so that all four write at the same moment.
CHILD = """
import hashlib, os, sys, time
from pathlib import Path
from worker.engine.demo_model import ensure_demo_model
go = Path(sys.argv[1])
deadline = time.monotonic() + 120
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.01)
path = ensure_demo_model("tiny")
for f in sorted(path.iterdir()):
    print(f.name, hashlib.sha256(f.read_bytes()).hexdigest())
"""


def _digests(path: Path) -> str:
    return "".join(
        f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in sorted(path.iterdir())
    )


def test_four_processes_on_an_empty_cache_agree(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = {**os.environ, "BREAKWATER_CACHE": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        time.sleep(0.1)  # not a wait for a condition: children poll for the go file
        go.touch()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "config.json" in out and "safetensors" in out
    assert len({out for out, _ in outs}) == 1, "processes saw different files"
    # Only the published directory remains: no temporary or discarded copies.
    assert [d.name for d in cache.iterdir()] == ["demo-random-tiny"]
    assert _digests(cache / "demo-random-tiny") == outs[0][0]


def test_an_incomplete_leftover_is_replaced(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BREAKWATER_CACHE", str(tmp_path))
    broken = default_demo_dir("tiny")
    broken.mkdir(parents=True)
    (broken / "tokenizer.json").write_text("{}")  # a half-written directory from a crash
    path = ensure_demo_model("tiny")
    assert path == broken
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    assert [d.name for d in tmp_path.iterdir()] == ["demo-random-tiny"]
