from __future__ import annotations

import hmac
from collections.abc import Iterator

import pytest

from gateway.admission import tenants as tenants_mod
from tests.gateway.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def compare_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every hmac.compare_digest call the tenant directory makes, in order."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tenants_mod.hmac, "compare_digest", counting)
    return calls
