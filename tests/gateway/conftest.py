from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
