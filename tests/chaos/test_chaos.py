"""The chaos scenarios in reduced form: each starts its own fleet and must pass.

Every scenario runs as `breakwater up` deploys (workers with their OpenAI port, HTTP
streams relayed there); the ones where the transport decides what a failure looks like
run again with every call over gRPC.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from loadtest import chaos
from loadtest.chaos import SCENARIOS

GRPC_TOO = ("kill-worker", "hang-worker", "rolling-restart")


@pytest.fixture
def grpc_only() -> Iterator[None]:
    chaos.OPTIONS.relay = False
    try:
        yield
    finally:
        chaos.OPTIONS.relay = True


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    res = SCENARIOS[name](True)
    assert res["scenario"] == name
    assert res["passed"], json.dumps(res["figures"])  # whole: pytest cuts a long dict short


@pytest.mark.parametrize("name", GRPC_TOO)
def test_scenario_over_grpc_only(name: str, grpc_only: None) -> None:
    res = SCENARIOS[name](True)
    assert res["passed"], json.dumps(res["figures"])  # whole: pytest cuts a long dict short
