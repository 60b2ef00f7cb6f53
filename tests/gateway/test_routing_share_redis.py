"""The routing share between gateways over Redis pub/sub, when the connection goes silent.

A half-open TCP connection, or a failover that leaves the subscription on a server nobody
publishes to any more, raises nothing: the subscriber must notice the silence itself.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from gateway.routing import decision_share
from gateway.routing.decision_share import RedisShare
from tests.gateway._async import run, wait_for
from tests.gateway.redis_server import RedisServer


class SwitchingProxy:
    """A TCP proxy on 127.0.0.1 to one Redis; `switch()` leaves the connections it has
    open but forwards nothing more on them, and sends new ones to another Redis."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.silent: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def switch(self, target: int) -> None:
        for event in self.silent:
            event.set()
        self.target = target

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent = asyncio.Event()
        self.silent.append(silent)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if silent.is_set():
                    continue  # read and dropped: the peer sees a live socket that says nothing
                dst.write(data)
                await dst.drain()

        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            t = asyncio.create_task(task)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.server is not None:
            self.server.close()


async def subscribers(port: int) -> int:
    client = aioredis.Redis(port=port)
    try:
        numsub = dict(await client.pubsub_numsub(decision_share.DEFAULT_CHANNEL))
        return int(numsub[decision_share.DEFAULT_CHANNEL.encode()])
    finally:
        await client.aclose()


def test_a_silent_subscription_is_made_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the subscriber waited on the silent connection for good, with no log line:
    one gateway's decisions never reached the other again."""
    # short enough to test quickly, long enough that a loaded machine's pong is in time
    monkeypatch.setattr(decision_share, "PING_S", 1.0)
    caplog.set_level(logging.INFO, logger="serving.redis_client")
    with RedisServer() as first, RedisServer() as second:

        async def main() -> None:
            proxy = SwitchingProxy(first.port)
            url = await proxy.start()
            got: list[tuple[str, list[int]]] = []
            listener = RedisShare(url, lambda w, keys: got.append((w, keys)))
            sender = RedisShare(url, lambda w, keys: None)
            await listener.start()
            await sender.start()
            try:
                await wait_for(listener.subscribed.is_set, "the subscription")
                sender.publish("w1", [1, 2, 3])
                await wait_for(lambda: ("w1", [1, 2, 3]) in got, "the first decision")
                await asyncio.sleep(3 * 1.0)  # a quiet, healthy subscription is kept
                assert "unavailable" not in caplog.text

                proxy.switch(second.port)  # as a failover to an empty replica looks
                # Both subscribe again, through the proxy to the second Redis; a publish on
                # a pooled connection the switch silenced times out and is lost, the next
                # goes over a new connection: decisions flow again.
                deadline = asyncio.get_running_loop().time() + 20
                while await subscribers(second.port) < 2:
                    assert asyncio.get_running_loop().time() < deadline, "no resubscription"
                    await asyncio.sleep(0.05)
                while ("w2", [4, 5]) not in got:
                    assert asyncio.get_running_loop().time() < deadline, "no decision since"
                    sender.publish("w2", [4, 5])
                    await asyncio.sleep(0.2)
            finally:
                await listener.close()
                await sender.close()
                await proxy.close()

        run(main())
