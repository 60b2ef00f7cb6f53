"""Our SDK against the real gateway (the SDK's own tests script a fake for failure modes)."""

from __future__ import annotations

import asyncio

import pytest

from breakwater.client import AsyncClient, Client
from breakwater.errors import BadRequestError, NotFoundError
from tests.procs import Proc


def test_sync_client(gateway: Proc) -> None:
    with Client(gateway.ready["http"]) as client:
        assert [m.id for m in client.models.list()] == ["tiny"]
        comp = client.completions.create(
            model="tiny", prompt="sdk", max_tokens=5, temperature=0, ignore_eos=True
        )
        assert comp.usage is not None and comp.usage.completion_tokens == 5
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=6,
                temperature=0,
                ignore_eos=True,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
        with pytest.raises(NotFoundError):
            client.completions.create(model="missing", prompt="x")
        with pytest.raises(BadRequestError) as e:
            client.completions.create(model="tiny", prompt="x", top_p=7)
        assert e.value.param == "top_p"


def test_async_client(gateway: Proc) -> None:
    async def main() -> None:
        async with AsyncClient(gateway.ready["http"]) as client:
            results = await asyncio.gather(
                *(
                    client.completions.create(
                        model="tiny", prompt=f"p{i}", max_tokens=4, ignore_eos=True
                    )
                    for i in range(6)
                )
            )
            assert all(r.usage is not None and r.usage.completion_tokens == 4 for r in results)
            stream = await client.completions.create(
                model="tiny", prompt="s", max_tokens=3, ignore_eos=True, stream=True
            )
            text = "".join([c.choices[0].text async for c in stream if c.choices])
            assert isinstance(text, str)

    asyncio.run(main())
