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
PING_S = 5.0
"""A subscription silent this long is pinged; silent twice as long, it is made again: a
half-open connection, or a failover that left it on a server nobody publishes to, sends
nothing and raises nothing (redis-py's health checks run only on a read that waits)."""
_HEAD = struct.Struct("!BH")  # worker id length, key count
_LOADS_MARK = _HEAD.pack(0, 0xFFFF)
"""Heads an entry of loads (then a 4-byte length, the sender id and JSON), always a
message's last. It claims 512 KB of keys, more than any message holds, so a gateway of an
earlier version (mid-rollout) stops reading there, after the decisions, as at a torn tail."""
_LEN = struct.Struct("!I")


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
    tokens it sent each since its last message (new cache content): a message's last entry."""
    payload = sender + orjson.dumps({"l": loads, "c": content or {}})
    return _LOADS_MARK + _LEN.pack(len(payload)) + payload


Loads = tuple[bytes, dict[str, int], dict[str, float]]
"""A sender's id, its calls in flight per worker id, and the new content it sent each."""


def decode_all(data: bytes) -> tuple[list[tuple[str, list[int]]], Loads | None]:
    """The decisions and the loads in one message; a malformed entry ends the message."""
    decisions: list[tuple[str, list[int]]] = []
    view = memoryview(data)
    while len(view) >= _HEAD.size:
        if view[: _HEAD.size] == _LOADS_MARK:
            return decisions, _loads(view[_HEAD.size :])
        n_id, n_keys = _HEAD.unpack_from(view)
        end = _HEAD.size + n_id + 8 * n_keys
        if n_id == 0 or end > len(view):
            break
        wid = bytes(view[_HEAD.size : _HEAD.size + n_id]).decode(errors="replace")
        keys = array("Q")
        keys.frombytes(view[_HEAD.size + n_id : end])
        decisions.append((wid, keys.tolist()))
        view = view[end:]
    return decisions, None


def _loads(view: memoryview) -> Loads | None:
    if len(view) < _LEN.size + 8:
        return None
    (n,) = _LEN.unpack_from(view)
    payload = bytes(view[_LEN.size : _LEN.size + n])
    if n < 8 or len(payload) != n:
        return None
    try:
        doc = orjson.loads(payload[8:])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    counts, content = doc.get("l"), doc.get("c")
    if not isinstance(counts, dict) or not all(
        type(c) is int and 0 <= c < 1 << 31 for c in counts.values()
    ):
        return None
    if not isinstance(content, dict) or not all(
        type(t) in (int, float) and 0 <= t < 1e12 for t in content.values()
    ):
        return None
    return payload[:8], counts, {w: float(t) for w, t in content.items()}


def decode(data: bytes) -> list[tuple[str, list[int]]]:
    """The decisions in one message."""
    return decode_all(data)[0]


class RemoteLoads:
    """Calls in flight per worker from every other process or gateway that said so lately.

    Totals move by each message's difference from its sender's last (a full pass only when
    a sender falls silent), so a message costs its own size, not the fleet's."""

    def __init__(self, ttl_s: float = LOAD_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._senders: dict[bytes, tuple[float, dict[str, int]]] = {}
        self._totals: dict[str, int] = {}
        self._oldest = float("inf")
        """The earliest last-message time of a sender (a bound: a sender heard since may
        be counted as older, which only brings the next check forward)."""

    def update(self, sender: bytes, counts: dict[str, int]) -> None:
        now = time.monotonic()
        old = self._senders.get(sender)
        self._add(old[1] if old is not None else {}, -1)
        self._add(counts, 1)
        self._senders[sender] = (now, counts)
        self._oldest = min(self._oldest, now)
        self._expire(now)

    def totals(self) -> Mapping[str, int]:
        """Worker id -> calls in flight elsewhere (absent: none)."""
        if self._senders:
            self._expire(time.monotonic())
        return self._totals

    def _add(self, counts: dict[str, int], sign: int) -> None:
        totals = self._totals
        for wid, n in counts.items():
            left = totals.get(wid, 0) + sign * n
            if left > 0:
                totals[wid] = left
            else:
                totals.pop(wid, None)

    def _expire(self, now: float) -> None:
        cutoff = now - self.ttl_s
        if self._oldest > cutoff:
            return
        for sender in [s for s, (at, _) in self._senders.items() if at <= cutoff]:
            self._add(self._senders.pop(sender)[1], -1)
        self._oldest = min((at for at, _ in self._senders.values()), default=float("inf"))


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
        self.closed = False

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _apply_all(self, data: bytes) -> None:
        """Learn what a message says; a bad message is dropped, never fatal."""
        try:
            decisions, loads = decode_all(data)
            for worker, keys in decisions:
                self.apply(worker, keys)
                self.received += 1
            if loads is not None and loads[0] != self.sender:
                sender, counts, content = loads
                self.remote.update(sender, counts)
                if self.content is not None:
                    for worker, tokens in content.items():
                        self.content(worker, tokens)
        except Exception as e:
            log.debug("routing share: dropped a message: %s", e)

    def loads_changed(self) -> None:
        """A call started or ended here: the others hear of it with the next message."""
        if self.local_loads is None or self.closed or not self._ready():
            return
        self._loads_changed = True
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def _loads_entry(self) -> bytes:
        """This process's loads (and new content) as a message's last entry, or b""."""
        assert self.local_loads is not None
        self._loads_changed = False
        counts = {w: n for w, n in self.local_loads.items() if n > 0}
        content = self.new_content() if self.new_content is not None else None
        if counts and self._refresh is None and not self.closed:  # again while non-zero
            self._refresh = asyncio.get_running_loop().call_later(LOAD_REFRESH_S, self._refreshed)
        entry = encode_loads(self.sender, counts, content)
        return entry if len(entry) <= MAX_DATAGRAM else b""  # thousands of workers: keys go

    def _refreshed(self) -> None:
        self._refresh = None
        self.loads_changed()

    def _ready(self) -> bool:
        return True

    def publish(self, worker: str, keys: list[int]) -> None:
        if self.closed or not self._ready():
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
        loads = b""
        if self._loads_changed and self.local_loads is not None:
            loads = self._loads_entry()
        if self._batch and self._size + len(loads) > MAX_DATAGRAM:
            self._send(b"".join(self._batch))
            self._batch.clear()
        if not self._batch and not loads:
            return
        data = b"".join(self._batch) + loads
        self._batch.clear()
        self._size = 0
        self._send(data)

    def _close(self) -> None:
        """Last message out (calls still finishing are no longer told: their counts expire
        at the others within LOAD_TTL_S), then nothing more is sent."""
        self.flush()
        self.closed = True
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None


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
        self._close()
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
                heard = pinged = time.monotonic()
                while True:
                    msg = await pubsub.get_message(timeout=min(1.0, PING_S / 2))
                    now = time.monotonic()
                    if msg is not None:
                        heard = now
                        if msg["type"] == "message":
                            self._on_message(msg["data"])
                    elif now - heard > 2 * PING_S:
                        raise ConnectionError(f"no answer to a ping in {PING_S:g} s")
                    elif now - max(heard, pinged) > PING_S:
                        pinged = now
                        await pubsub.ping()
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
        else:
            self._outage.ok()  # an outage the subscription outlived ends here (it logs once)

    async def close(self) -> None:
        self._close()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        with contextlib.suppress(*REDIS_ERRORS):
            await self._client.aclose()
