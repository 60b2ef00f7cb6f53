"""Per-request KV block tables over the block pool, with prefix-cache lookup."""

from __future__ import annotations

from collections.abc import Sequence

from prompts.block_keys import hash_block, salted
from worker.engine.block_pool import BlockPool, KVBlock
from worker.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Maps requests to KV blocks; all mutation happens on the engine's step thread."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool, extra_key: bytes = b""
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.extra_key = extra_key
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_blocks - 1

    def _update_block_hashes(self, request: Request) -> None:
        hashes = request.block_hashes
        bs = self.block_size
        tokens = request.all_token_ids
        extra = salted(self.extra_key, request.cache_salt)
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs], extra))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of the request, in whole blocks.

        The hit stops short of the last token so that at least one token is computed and its
        logits can be sampled.
        """
        if not self.enable_caching:
            return [], 0
        self._update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVBlock] = ()
    ) -> bool:
        """Grow the request's block table to hold `num_new_tokens` more; False if out of blocks."""
        blocks = self.req_blocks.get(request.request_id)
        first = blocks is None
        if blocks is None:
            blocks = []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_new_blocks = cdiv(total, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hits on free cached blocks leave the free queue, so they cost free capacity too.
        num_free_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_free_hits:
            return False
        if first:
            self.req_blocks[request.request_id] = blocks
            self._num_cached_blocks[request.request_id] = 0
        if first and self.enable_caching:
            # Counted once per admission, not per lookup: a request that waits for blocks
            # is looked up again on every step, and would count its prompt each time.
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += len(new_computed_blocks) * self.block_size
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.get_new_blocks(num_new_blocks))
        if self.enable_caching:
            self._update_block_hashes(request)
            start = self._num_cached_blocks[request.request_id]
            end = min(total // self.block_size, len(request.block_hashes))
            if end > start:
                self.pool.cache_full_blocks(blocks, request.block_hashes, start, end)
                self._num_cached_blocks[request.request_id] = end
        return True

    def commit_cached_blocks(self) -> None:
        """The step just scheduled was computed: the blocks it registered stay in the cache."""
        self.pool.commit()

    def uncache_uncommitted_blocks(self) -> int:
        """The step just scheduled failed: blocks registered for it (in allocate_slots, before
        their KV was computed) leave the prefix cache, so no later prompt hits garbage.

        Their owners keep the blocks but will not register them again; the caller aborts
        them anyway (their computed-token counts include this step's prefix hits)."""
        return self.pool.uncache_uncommitted()

    def can_ever_fit(self, num_tokens: int) -> bool:
        return cdiv(num_tokens, self.block_size) <= self.num_usable_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks[request_id]]

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def num_tokens_held(self) -> int:
        """Slots allocated to live requests (for utilisation figures)."""
        return sum(len(b) for b in self.req_blocks.values()) * self.block_size
