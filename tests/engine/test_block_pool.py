"""Block-level accounting: allocation, prefix hits, LRU eviction, hash reuse, no leaks."""

from __future__ import annotations

import pytest

from prompts.block_keys import hash_block
from worker.engine.block_pool import BlockPool, FreeBlockQueue, KVBlock
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Priority, Request, SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], max_tokens: int = 8) -> Request:
    return Request(rid, tokens, SamplingParams(), Priority.INTERACTIVE, max_tokens, frozenset())


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit a request the way the scheduler does; returns the cached-token count."""
    hits, n_hit = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - n_hit, hits)
    req.num_computed_tokens = req.num_tokens
    return n_hit


def test_free_queue_o1_removal_and_order() -> None:
    blocks = [KVBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3, 4]
    assert q.popleft().block_id == 0
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 4, 2]
    assert q.num_free == 4
    with pytest.raises(ValueError):
        q.remove(blocks[0])


def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(4)
    got = pool.get_new_blocks(3)
    assert 0 not in [b.block_id for b in got]
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_hash_chains_prefix_and_extra_key() -> None:
    a = hash_block(None, [1, 2, 3, 4], b"m")
    assert a == hash_block(None, [1, 2, 3, 4], b"m")
    assert a != hash_block(None, [1, 2, 3, 4], b"other-model")
    assert hash_block(a, [5, 6, 7, 8], b"m") != hash_block(None, [5, 6, 7, 8], b"m")


def test_allocate_hit_and_last_token_always_computed() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True)
    a = make_request("a", list(range(1, 13)))  # 3 full blocks
    assert admit(kv, a) == 0
    assert len(kv.req_blocks["a"]) == 3
    # Same 12 tokens: only 2 blocks may hit, so the 12th token is computed for its logits.
    b = make_request("b", list(range(1, 13)))
    assert admit(kv, b) == 8
    assert kv.req_blocks["b"][:2] == kv.req_blocks["a"][:2]
    assert kv.req_blocks["b"][2] is not kv.req_blocks["a"][2]
    assert kv.req_blocks["a"][0].ref_cnt == 2
    # A longer prompt sharing the prefix hits all three blocks.
    c = make_request("c", [*range(1, 13), 99])
    assert admit(kv, c) == 12
    for r in (a, b, c):
        kv.free(r)
    assert kv.pool.num_free_blocks == 15
    assert kv.prefix_cache_hits == 20


def test_freed_cached_blocks_stay_findable_until_evicted_lru() -> None:
    kv = KVCacheManager(num_blocks=7, block_size=BS, enable_caching=True)  # 6 usable
    a = make_request("a", list(range(1, 9)) + [50])  # 2 full blocks + 1 partial
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(100, 108)) + [51])
    admit(kv, b)
    kv.free(b)
    # Both prefixes are cached while free.
    assert admit(kv, make_request("a2", list(range(1, 9)) + [60])) == 8
    kv.free(make_request("x", [0]))  # freeing an unknown request is a no-op
    kv2 = KVCacheManager(num_blocks=7, block_size=BS, enable_caching=True)
    first = make_request("first", list(range(1, 9)) + [1])
    second = make_request("second", list(range(20, 28)) + [1])
    admit(kv2, first)
    admit(kv2, second)
    kv2.free(first)
    kv2.free(second)
    # Free queue, LRU first: first's 3 blocks (tail first), then second's 3. A 5-block request
    # evicts all of first's and second's partial tail and its second full block.
    admit(kv2, make_request("big", list(range(300, 318))))
    assert kv2.get_computed_blocks(make_request("q1", list(range(1, 9)) + [5]))[1] == 0
    _, n = kv2.get_computed_blocks(make_request("q2", list(range(20, 28)) + [5]))
    assert n == 4  # second's first block survived


def test_reused_block_drops_old_hash() -> None:
    pool = BlockPool(3)
    (blk,) = pool.get_new_blocks(1)
    h = hash_block(None, [1, 2, 3, 4], b"")
    pool.cache_full_blocks([blk], [h], 0, 1)
    assert pool.get_cached_block(h) is blk
    pool.free_blocks([blk])
    assert pool.get_cached_block(h) is blk  # free but findable
    got = pool.get_new_blocks(2)
    assert blk in got
    assert blk.block_hash is None
    assert pool.get_cached_block(h) is None


def test_duplicate_hash_is_not_registered_twice() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=True)
    a = make_request("a", [1, 2, 3, 4, 5])
    b = make_request("b", [1, 2, 3, 4, 6])
    # Both admitted before either is cached: simulate by allocating b without lookup.
    assert kv.allocate_slots(a, 5)
    assert kv.allocate_slots(b, 5)
    blk_a, blk_b = kv.req_blocks["a"][0], kv.req_blocks["b"][0]
    assert blk_a.block_hash is not None
    assert blk_b.block_hash is None
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_free_blocks == 9


def test_out_of_blocks_returns_false_without_side_effects() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)
    a = make_request("a", list(range(1, 13)))
    assert kv.allocate_slots(a, 12)
    b = make_request("b", list(range(50, 58)))
    assert not kv.allocate_slots(b, 8)
    assert kv.pool.num_free_blocks == 0
    assert "b" not in kv.req_blocks  # not even an empty block table
    kv.free(b)
    kv.free(a)
    assert kv.pool.num_free_blocks == 3


def test_a_request_waiting_for_blocks_is_counted_once() -> None:
    """Hit counters are per admission: failed allocations (the request keeps waiting and is
    looked up again next step) must not add its prompt to the queries again."""
    kv = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=True)  # 3 usable
    hog = make_request("hog", list(range(1, 3 * BS + 1)))
    assert admit(kv, hog) == 0
    waiting = make_request("w", list(range(100, 100 + 2 * BS)))
    for _ in range(3):
        hits, n_hit = kv.get_computed_blocks(waiting)
        assert not kv.allocate_slots(waiting, waiting.num_tokens - n_hit, hits)
    assert kv.prefix_cache_queries == hog.num_tokens
    kv.free(hog)
    assert admit(kv, waiting) == 0
    assert kv.prefix_cache_queries == hog.num_tokens + waiting.num_tokens
