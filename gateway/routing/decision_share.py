"""Prefix-aware routing decisions shared between gateway processes and gateway replicas.

The turns of one conversation reach whichever process (`--processes N`: the kernel hands
each connection to any of them) or gateway replica (behind a load balancer) takes the
connection; each would otherwise learn only its own share of the fleet's cache contents.
So each tells the others which block keys it just sent to which worker:

- `SiblingShare`: UDP datagrams on 127.0.0.1 between the processes of one gateway.
  Process 0 binds one socket per process before starting them and passes each its own,
  so the addresses are known up front and a restarted sibling gets the same one.
- `RedisShare`: a Redis pub/sub channel between every process of every gateway that
  shares the Redis (it then also covers siblings).

Each also tells the others how many calls it has in flight on each worker, so that the
load bound of every decision counts the whole fleet's calls, not one process's share of
them, and the new cache content it sent each worker (uncached prompt tokens), by which
prefix-aware places new prefixes (the most cache room): each would otherwise judge room
by its own share of what went where. A sender's counts are trusted for `LOAD_TTL_S`
after its last message (it repeats them every `LOAD_REFRESH_S` while any is non-zero),
so a process that died stops counting.

Loss is harmless (the index is a hint, and counts are repeated), so there is no
acknowledgement; messages are batched for up to `FLUSH_S` to keep this off the request
path's cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from array import array
from collections.abc import Callable, Mapping

import orjson

from serving.redis_client import OP_TIMEOUT, REDIS_ERRORS, OutageLog, make_client

FLUSH_S = 0.01
LOAD_REFRESH_S = 0.5
LOAD_TTL_S = 2.0
MAX_DATAGRAM = 60_000
FDS_ENV = "BREAKWATER_GATEWAY_SHARE_FD"
PORTS_ENV = "BREAKWATER_GATEWAY_SHARE_PORTS"
log = logging.getLogger(__name__)

DEFAULT_CHANNEL = "breakwater:routing"
_HEAD = struct.Struct("!BH")  # worker id length, key count
"""An entry's head. A worker id of length 0 marks an entry of loads instead of keys: its
"keys" are 8-byte words of (sender id, JSON of calls in flight per worker id, padded with
blanks). A gateway of an earlier version, mid-rollout, reads it as keys sent to a worker
named "" that does not exist, which routes nothing."""


def bind_sockets(n: int) -> list[socket.socket]:
    """One datagram socket per process, on 127.0.0.1; made by process 0."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    return socks


def child_env(socks: list[socket.socket], index: int, dup: bool = False) -> dict[str, str]:
    """Where process `index` finds its socket; `dup` for process 0, which keeps all of them
    open for restarts and so hands its own gateway a descriptor of its own to close."""
    fd = socks[index].fileno()
    return {
        FDS_ENV: str(os.dup(fd) if dup else fd),
        PORTS_ENV: ",".join(str(s.getsockname()[1]) for s in socks),
    }


def encode(worker: str, keys: list[int]) -> bytes:
    wid = worker.encode()[:255]
    keys = keys[: (MAX_DATAGRAM - 300) // 8]
    return _HEAD.pack(len(wid), len(keys)) + wid + array("Q", keys).tobytes()


def encode_loads(
    sender: bytes, loads: Mapping[str, int], content: Mapping[str, float] | None = None
) -> bytes:
    """A sender's calls in flight per worker (the non-zero ones), and the uncached prompt
    tokens it sent each since its last message (new cache content), as one entry."""
    payload = sender + orjson.dumps({"l": loads, "c": content or {}})
    payload += b" " * (-len(payload) % 8)
    return _HEAD.pack(0, len(payload) // 8) + payload


Loads = tuple[bytes, dict[str, int], dict[str, float]]
"""A sender's id, its calls in flight per worker id, and the new content it sent each."""


def decode_all(data: bytes) -> tuple[list[tuple[str, list[int]]], list[Loads]]:
    """The decisions and the loads in one message; a malformed entry ends the message."""
    decisions: list[tuple[str, list[int]]] = []
    loads: list[Loads] = []
    view = memoryview(data)
    while len(view) >= _HEAD.size:
        n_id, n_keys = _HEAD.unpack_from(view)
        end = _HEAD.size + n_id + 8 * n_keys
        if end > len(view):
            break
        body = view[_HEAD.size + n_id : end]
        if n_id == 0:
            got = _counts(bytes(body[8:]))
            if got is None:
                break
            loads.append((bytes(body[:8]), *got))
        else:
            wid = bytes(view[_HEAD.size : _HEAD.size + n_id]).decode(errors="replace")
            keys = array("Q")
            keys.frombytes(body)
            decisions.append((wid, keys.tolist()))
        view = view[end:]
    return decisions, loads


def _counts(data: bytes) -> tuple[dict[str, int], dict[str, float]] | None:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    counts, content = doc.get("l"), doc.get("c")
    if not isinstance(counts, dict) or not all(
        type(n) is int and 0 <= n < 1 << 31 for n in counts.values()
    ):
        return None
    if not isinstance(content, dict) or not all(
        type(t) in (int, float) and 0 <= t < 1e12 for t in content.values()
    ):
        return None
    return counts, {w: float(t) for w, t in content.items()}


def decode(data: bytes) -> list[tuple[str, list[int]]]:
    """The decisions in one message."""
    return decode_all(data)[0]


class RemoteLoads:
    """Calls in flight per worker from every other process or gateway that said so lately."""

    def __init__(self, ttl_s: float = LOAD_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._senders: dict[bytes, tuple[float, dict[str, int]]] = {}
        self._totals: dict[str, int] = {}
        self._until = float("inf")
        """When the oldest sender's counts go stale: the totals are summed again then."""

    def update(self, sender: bytes, counts: dict[str, int]) -> None:
        self._senders[sender] = (time.monotonic(), counts)
        self._sum(time.monotonic())

    def totals(self) -> Mapping[str, int]:
        """Worker id -> calls in flight elsewhere (absent: none)."""
        if self._until < float("inf") and time.monotonic() > self._until:
            self._sum(time.monotonic())
        return self._totals

    def _sum(self, now: float) -> None:
        cutoff = now - self.ttl_s
        for sender in [s for s, (at, _) in self._senders.items() if at <= cutoff]:
            del self._senders[sender]
        totals: dict[str, int] = {}
        for _, counts in self._senders.values():
            for wid, n in counts.items():
                totals[wid] = totals.get(wid, 0) + n
        self._totals = totals
        at = min((at for at, _ in self._senders.values()), default=None)
        self._until = float("inf") if at is None else at + self.ttl_s


class _Batcher:
    """Collects decisions and sends them, with this process's loads when they changed, as
    one message every `FLUSH_S` at most."""

    apply: Callable[[str, list[int]], None]
    content: Callable[[str, float], None] | None = None
    """Learns new cache content another process sent a worker (PrefixAware.learn_content)."""
    new_content: Callable[[], dict[str, float]] | None = None
    """This process's new content per worker since it last asked (PrefixAware.take_content)."""

    def __init__(self) -> None:
        self._batch: list[bytes] = []
        self._size = 0
        self._flush: asyncio.TimerHandle | None = None
        self.received = 0
        self.sent = 0
        """Decisions received from the others and sent to them, for /admin/workers."""
        self.sender = os.urandom(8)
        self.local_loads: Mapping[str, int] | None = None
        """This process's calls in flight per worker (the dispatcher's), told to the others."""
        self.remote = RemoteLoads()
        """The others' calls in flight."""
        self._loads_changed = False
        self._refresh: asyncio.TimerHandle | None = None

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _apply_all(self, data: bytes) -> None:
        """Learn what a message says; a bad message is dropped, never fatal."""
        try:
            decisions, loads = decode_all(data)
            for worker, keys in decisions:
                self.apply(worker, keys)
                self.received += 1
            for sender, counts, content in loads:
                if sender != self.sender:
                    self.remote.update(sender, counts)
                    if self.content is not None:
                        for worker, tokens in content.items():
                            self.content(worker, tokens)
        except Exception as e:
            log.debug("routing share: dropped a message: %s", e)

    def loads_changed(self) -> None:
        """A call started or ended here: the others hear of it with the next message."""
        if self.local_loads is None or not self._ready():
            return
        self._loads_changed = True
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def _add_loads(self) -> None:
        assert self.local_loads is not None
        self._loads_changed = False
        counts = {w: n for w, n in self.local_loads.items() if n > 0}
        content = self.new_content() if self.new_content is not None else None
        entry = encode_loads(self.sender, counts, content)
        if len(entry) > MAX_DATAGRAM:
            return  # thousands of workers: their keys still go
        if self._size + len(entry) > MAX_DATAGRAM:
            self.flush()
        self._batch.append(entry)
        self._size += len(entry)
        if counts and self._refresh is None:  # said again while any is non-zero
            self._refresh = asyncio.get_running_loop().call_later(LOAD_REFRESH_S, self._refreshed)

    def _refreshed(self) -> None:
        self._refresh = None
        self.loads_changed()

    def _stop_refresh(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None

    def _ready(self) -> bool:
        return True

    def publish(self, worker: str, keys: list[int]) -> None:
        if not self._ready():
            return
        entry = encode(worker, keys)
        if self._size + len(entry) > MAX_DATAGRAM:
            self.flush()
        self.sent += 1
        self._batch.append(entry)
        self._size += len(entry)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._loads_changed and self.local_loads is not None:
            self._add_loads()
        if not self._batch:
            return
        data = b"".join(self._batch)
        self._batch.clear()
        self._size = 0
        self._send(data)


class SiblingShare(_Batcher, asyncio.DatagramProtocol):
    """Between the processes of one gateway, over loopback datagrams."""

    def __init__(
        self, sock: socket.socket, ports: list[int], apply: Callable[[str, list[int]], None]
    ) -> None:
        super().__init__()
        self.sock = sock
        own = sock.getsockname()[1]
        self.peers = [("127.0.0.1", p) for p in ports if p != own]
        self.apply = apply
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    def from_env(cls, apply: Callable[[str, list[int]], None]) -> SiblingShare | None:
        fd, ports = os.environ.pop(FDS_ENV, None), os.environ.pop(PORTS_ENV, None)
        if not fd or not ports:
            return None
        sock = socket.socket(fileno=int(fd))
        return cls(sock, [int(p) for p in ports.split(",")], apply)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, sock=self.sock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._apply_all(data)

    def error_received(self, exc: Exception) -> None:  # a sibling restarting: drop
        pass

    def _ready(self) -> bool:
        return bool(self.peers) and self.transport is not None

    def _send(self, data: bytes) -> None:
        if self.transport is None:
            return
        for peer in self.peers:
            with contextlib.suppress(OSError):
                self.transport.sendto(data, peer)

    async def close(self) -> None:
        self.flush()
        self._stop_refresh()
        if self.transport is not None:
            self.transport.close()


class RedisShare(_Batcher):
    """Between every gateway process that shares a Redis: one pub/sub channel.

    Messages carry a random sender id so a process skips its own. While Redis is down
    decisions are dropped and the subscriber retries every second: each gateway keeps
    routing on what it learnt itself.
    """

    def __init__(
        self,
        url: str,
        apply: Callable[[str, list[int]], None],
        channel: str = DEFAULT_CHANNEL,
    ) -> None:
        super().__init__()
        self.url = url
        self.apply = apply
        self.channel = channel
        self._id = self.sender
        self._client = make_client(url, decode_responses=False)
        self._outage = OutageLog("routing share")
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="routing-share-listen")

    async def _listen(self) -> None:
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                self._outage.ok()
                while True:
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None:
                        self._on_message(msg["data"])
            except REDIS_ERRORS as exc:
                self.subscribed.clear()
                self._outage.failed(exc)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
            await asyncio.sleep(1.0)

    def _on_message(self, data: bytes) -> None:
        if isinstance(data, bytes) and data[:8] != self._id:
            self._apply_all(data[8:])

    def _send(self, data: bytes) -> None:
        task = asyncio.create_task(self._publish(self._id + data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(OP_TIMEOUT):
                await self._client.publish(self.channel, data)
        except REDIS_ERRORS as exc:
            self._outage.failed(exc)

    async def close(self) -> None:
        self.flush()
        self._stop_refresh()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
