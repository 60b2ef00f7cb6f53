"""A gateway's shared directory: held by its processes while they live, removed by the next
gateway to start once they are gone, however they went."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import shared_dir

HOLD = (
    "import sys; from gateway import shared_dir; "
    "print(shared_dir.ensure(), flush=True); sys.stdin.read()"
)


@pytest.fixture
def holders(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes that each make a shared directory under tmp_path and hold it until their
    stdin closes (or they are killed)."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.close()
        p.stdout.close()


def hold(tmp: Path, procs: list[subprocess.Popen[str]], env: dict[str, str] | None = None) -> str:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp), **(env or {})},
    )
    procs.append(p)
    assert p.stdout is not None
    return p.stdout.readline().strip()


def test_a_killed_gateways_directory_is_removed_and_a_live_ones_kept(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    live = hold(tmp_path, holders)
    dead = hold(tmp_path, holders)
    assert Path(live, shared_dir.LOCK).exists() and Path(dead, shared_dir.LOCK).exists()
    holders[1].send_signal(signal.SIGKILL)  # no exit handler runs
    holders[1].wait(timeout=30)
    assert Path(dead).is_dir()
    operators = tmp_path / f"{shared_dir.PREFIX}operator"  # no lock file: not ours to judge
    operators.mkdir()
    assert shared_dir.sweep(str(tmp_path)) == [dead]
    assert Path(live).is_dir() and operators.is_dir() and not Path(dead).exists()


def test_a_sibling_holds_the_directory_it_inherited(
    tmp_path: Path, holders: list[subprocess.Popen[str]]
) -> None:
    first = hold(tmp_path, holders)
    assert hold(tmp_path, holders, {shared_dir.ENV: first}) == "None"  # not its to remove
    holders[0].send_signal(signal.SIGKILL)
    holders[0].wait(timeout=30)
    assert shared_dir.sweep(str(tmp_path)) == []  # the sibling still runs
    holders[1].send_signal(signal.SIGKILL)
    holders[1].wait(timeout=30)
    assert shared_dir.sweep(str(tmp_path)) == [first]
