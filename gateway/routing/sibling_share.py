"""Prefix-aware routing decisions shared between a gateway's sibling processes.

With `--processes N` the kernel hands each connection to any process, so the turns of one
conversation land on different processes; each would otherwise learn only its own share
of the fleet's cache contents. Every process tells its siblings, in UDP datagrams on
127.0.0.1, which block keys it just sent to which worker. Process 0 binds one socket per
process before starting them and passes each its own, so the addresses are known up front
and a restarted sibling gets the same one. Loss is harmless (the index is a hint), so there
is no acknowledgement; decisions are batched for up to `FLUSH_S` to keep this off the
request path's cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from array import array
from collections.abc import Callable

FLUSH_S = 0.01
MAX_DATAGRAM = 60_000
FDS_ENV = "BREAKWATER_GATEWAY_SHARE_FD"
PORTS_ENV = "BREAKWATER_GATEWAY_SHARE_PORTS"
_HEAD = struct.Struct("!BH")  # worker id length, key count


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


def decode(data: bytes) -> list[tuple[str, list[int]]]:
    """Entries of one datagram; a malformed tail is dropped."""
    out = []
    view = memoryview(data)
    while len(view) >= _HEAD.size:
        n_id, n_keys = _HEAD.unpack_from(view)
        end = _HEAD.size + n_id + 8 * n_keys
        if end > len(view):
            break
        wid = bytes(view[_HEAD.size : _HEAD.size + n_id]).decode(errors="replace")
        keys = array("Q")
        keys.frombytes(view[_HEAD.size + n_id : end])
        out.append((wid, keys.tolist()))
        view = view[end:]
    return out


class SiblingShare(asyncio.DatagramProtocol):
    """Sends this process's decisions to its siblings and applies theirs to the index."""

    def __init__(
        self, sock: socket.socket, ports: list[int], apply: Callable[[str, list[int]], None]
    ) -> None:
        self.sock = sock
        own = sock.getsockname()[1]
        self.peers = [("127.0.0.1", p) for p in ports if p != own]
        self.apply = apply
        self._batch: list[bytes] = []
        self._size = 0
        self._flush: asyncio.TimerHandle | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0
        self.sent = 0
        """Decisions received from siblings and sent to them, for /admin/workers."""

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
        for worker, keys in decode(data):
            self.received += 1
            self.apply(worker, keys)

    def error_received(self, exc: Exception) -> None:  # a sibling restarting: drop
        pass

    def publish(self, worker: str, keys: list[int]) -> None:
        if not self.peers or self.transport is None:
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
        if not self._batch or self.transport is None:
            return
        data = b"".join(self._batch)
        self._batch.clear()
        self._size = 0
        for peer in self.peers:
            with contextlib.suppress(OSError):
                self.transport.sendto(data, peer)

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()
