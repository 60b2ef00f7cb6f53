from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Proc, start_gateway, start_worker


@pytest.fixture(scope="module")
def worker(tiny_llama: Path) -> Iterator[Proc]:
    w = start_worker(tiny_llama, "--http-port", "0")
    yield w
    w.stop()


@pytest.fixture(scope="module")
def gateway(worker: Proc) -> Iterator[Proc]:
    g = start_gateway("--worker", worker.ready["grpc"], "--grpc-port", "0")
    yield g
    g.stop()
