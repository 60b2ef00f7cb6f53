from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sdk.openai_fake import FakeGateway


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # AsyncClient sleeps with asyncio between retries


@pytest.fixture
def fake() -> Iterator[FakeGateway]:
    gateway = FakeGateway()
    gateway.start()
    yield gateway
    gateway.stop()
