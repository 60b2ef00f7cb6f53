"""KV block pool: free queue with O(1) removal, ref counts, and the prefix-cache hash map.

A freed block keeps its hash and stays findable until it is handed out again (LRU
eviction from the head of the free queue), so a later request with the same prefix can
reuse it without recomputation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence


class KVBlock:
    """One block of `block_size` token slots in every layer's K and V tensors."""

    __slots__ = ("block_hash", "block_id", "is_null", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None
        self.is_null = False
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently freed at the head.

    A plain deque cannot remove from the middle in O(1), which a prefix-cache hit on a free
    block needs.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def popleft(self) -> KVBlock:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise IndexError("no free blocks")
        self.remove(first)
        return first

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free


class BlockPool:
    """Owns every KV block; block 0 is the null block used to pad block tables."""

    def __init__(
        self, num_blocks: int, enable_caching: bool = True, max_events: int = 1 << 16
    ) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.is_null = True
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[bytes, KVBlock] = {}
        self.events: deque[tuple[bool, bytes]] = deque(maxlen=max_events)
        """(stored?, hash) as the cache changes, for a router to follow (see cache_events)."""
        self.events_dropped = 0
        self.uncommitted: list[KVBlock] = []
        """Blocks registered since the last commit(): their KV is not computed until the step
        that registered them succeeds (see uncache_uncommitted)."""

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        """Share of usable blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0 and not block.is_null:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks, only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                self._event(False, block.block_hash)
            block.block_hash = None

    def _event(self, stored: bool, block_hash: bytes) -> None:
        if len(self.events) == self.events.maxlen:
            self.events_dropped += 1  # a reader that fell this far behind takes a snapshot
        self.events.append((stored, block_hash))

    def cache_events(self) -> tuple[list[tuple[bool, bytes]], int]:
        """Take the changes since the last call, and how many were dropped unread so far.

        Safe from another thread: deque appends and pops are atomic, so the engine thread
        never waits for a reader.
        """
        out = []
        pop = self.events.popleft
        for _ in range(len(self.events)):
            out.append(pop())
        return out, self.events_dropped

    def cached_hashes(self) -> list[bytes]:
        """Every hash held now (a snapshot: `list(dict)` runs without yielding the GIL)."""
        return list(self.cached)

    def cache_full_blocks(
        self, blocks: Sequence[KVBlock], block_hashes: Sequence[bytes], start: int, end: int
    ) -> None:
        """Register blocks[start:end] (now full) under their hashes.

        If another block already holds the same hash (two requests computed the same prefix
        at once), this one stays unregistered and is simply freed later.
        """
        for i in range(start, end):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            h = block_hashes[i]
            if h not in self.cached:
                self.cached[h] = block
                block.block_hash = h
                self.uncommitted.append(block)
                self._event(True, h)

    def commit(self) -> None:
        """The step that registered the uncommitted blocks computed them: keep them cached."""
        self.uncommitted.clear()

    def uncache_uncommitted(self) -> int:
        """Take back the hashes registered since commit() (their step failed, so the blocks
        hold no valid KV and must not be prefix-cache hits); returns how many were dropped."""
        n = 0
        for block in self.uncommitted:
            h = block.block_hash
            if h is None:  # evicted and handed out again since
                continue
            if self.cached.get(h) is block:
                del self.cached[h]
                self._event(False, h)
                n += 1
            block.block_hash = None
        self.uncommitted.clear()
        return n

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; pass blocks tail-first so a prefix's tail is evicted first."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, block
            if block.ref_cnt == 0 and not block.is_null:
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused while any block is in use."""
        if self.num_free_blocks != self.num_blocks - 1:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.uncommitted.clear()
        for h in self.cached:
            self._event(False, h)
        self.cached.clear()
        return True
