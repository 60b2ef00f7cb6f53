"""A fake upstream for end-to-end tests: a raw HTTP/1.1 server on 127.0.0.1, on its own
event loop and thread, standing in for a third-party OpenAI-compatible server.

Subclasses answer one request at a time in `respond`; this module keeps the plumbing (the
thread and loop, the keep-alive request loop, shutdown) in one place.
"""

from __future__ import annotations

import asyncio
import threading


async def read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off a keep-alive connection: its head (through the blank line) and its
    body (by Content-Length; none without one)."""
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


class FakeHTTPServer:
    """A fake OpenAI-compatible HTTP/1.1 server on its own loop and thread (a stand-in for a
    third-party server). Serves from construction until `close()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        async def start() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        assert ready.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def respond(self, head: bytes, body: bytes, w: asyncio.StreamWriter) -> bool:
        """Write the answer to one request; False closes the connection."""
        raise NotImplementedError

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await read_request(r)
                if not await self.respond(head, body, w):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            w.close()

    def close(self) -> None:
        """Stop listening, cancel the connections still being served, stop the loop."""

        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
