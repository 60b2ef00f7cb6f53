"""vLLM's prefix cache, followed through its KV events, as the block hashes our routers use.

vLLM publishes every block it stores in or evicts from its prefix cache on a ZMQ socket
(`kv_events_config`, the feed llm-d's and Dynamo's routers read). Its hashes are its own
(a seeded hash of Python objects), but each BlockStored event carries the blocks' token ids
and the parent block, so the hash chain the gateway predicts (prompts.block_keys, with the
model name as extra key) is rebuilt here block by block. The result has the interface the
worker's CacheFeed follows for our engine: `cache_events()` and `cached_hashes()`.

Runs on a thread of its own: vLLM's publisher never waits for it, and a reader that falls
behind (a gap in vLLM's sequence numbers, or our buffer overflowing) is counted as dropped,
which makes the feed send gateways a fresh snapshot.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from prompts.block_keys import hash_block

log = logging.getLogger(__name__)

MAX_EVENTS = 1 << 16


class KVEventFollower:
    def __init__(self, extra_key: bytes, block_size: int = 0) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import (  # vLLM's own wire types
            AllBlocksCleared,
            BlockRemoved,
            BlockStored,
            KVEventBatch,
        )

        self._types = (BlockStored, BlockRemoved, AllBlocksCleared)
        self._decode = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        self.block_size = block_size
        """vLLM's block size, set once its engine is built (each event also carries it)."""
        self.extra_key = extra_key
        self.ours: dict[Any, bytes] = {}
        """vLLM's block hash -> ours, for every block vLLM holds now."""
        self.events: deque[tuple[bool, bytes]] = deque(maxlen=MAX_EVENTS)
        self.dropped = 0
        self.unchained = 0
        """Stored blocks whose parent we never saw (joined late): not predictable, skipped."""
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.RCVTIMEO, 200)
        # vLLM's publisher binds only wildcard or ipc endpoints and connects to any other, so
        # the subscriber binds: a loopback port picked here, with no race for it.
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        """Where vLLM's publisher connects (kv_events_config.endpoint)."""
        self._zmq_again = zmq.Again
        self._stop = threading.Event()
        self._next_seq: int | None = None
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    # -- what CacheFeed reads ---------------------------------------------------------------

    def cache_events(self) -> tuple[list[tuple[bool, bytes]], int]:
        with self._lock:
            out = list(self.events)
            self.events.clear()
            return out, self.dropped

    def cached_hashes(self) -> list[bytes]:
        with self._lock:
            return list(self.ours.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _topic, seq_bytes, payload = self._sock.recv_multipart()
            except self._zmq_again:
                continue
            except Exception:  # socket closed under us at shutdown
                if not self._stop.is_set():
                    log.exception("vLLM KV event socket failed; prefix-cache feed stops")
                return
            seq = int.from_bytes(seq_bytes, "big")
            try:
                batch = self._decode(payload)
            except Exception as e:  # a vLLM whose wire types changed: say so once
                log.warning("undecodable vLLM KV event batch (%s); feed resyncs", e)
                with self._lock:
                    self.dropped += 1
                continue
            with self._lock:
                if self._next_seq is not None and seq != self._next_seq:
                    self.dropped += 1  # missed batches: gateways take a snapshot
                self._next_seq = seq + 1
                for event in batch.events:
                    self._apply(event)

    def _apply(self, event: Any) -> None:
        stored, removed, cleared = self._types
        if isinstance(event, stored):
            parent = None
            if event.parent_block_hash is not None:
                parent = self.ours.get(event.parent_block_hash)
                if parent is None:
                    self.unchained += len(event.block_hashes)
                    return
            bs = event.block_size or self.block_size
            for i, theirs in enumerate(event.block_hashes):
                tokens = event.token_ids[i * bs : (i + 1) * bs]
                if len(tokens) < bs:
                    break
                parent = hash_block(parent, tokens, self.extra_key)
                self.ours[theirs] = parent
                self._event(True, parent)
        elif isinstance(event, removed):
            for theirs in event.block_hashes:
                mine = self.ours.pop(theirs, None)
                if mine is not None:
                    self._event(False, mine)
        elif isinstance(event, cleared):
            for mine in self.ours.values():
                self._event(False, mine)
            self.ours.clear()

    def _event(self, stored: bool, block_hash: bytes) -> None:
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append((stored, block_hash))
