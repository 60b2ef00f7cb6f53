"""Property test: random arrivals, aborts and steps never break block accounting or deadlock."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.request import Priority, Request, SamplingParams
from worker.engine.scheduler import Scheduler

BS = 4
NUM_BLOCKS = 24  # 23 usable: small enough that preemption is common

arrival = st.tuples(
    st.just("arrive"),
    st.lists(st.integers(1, 3), min_size=1, max_size=30),  # tiny alphabet: shared prefixes
    st.integers(1, 20),
    st.sampled_from([Priority.INTERACTIVE, Priority.BATCH]),
)
ops = st.lists(
    st.one_of(arrival, st.tuples(st.just("abort"), st.integers(0, 50)), st.just(("step",))),
    max_size=80,
)


def check_invariants(kv: KVCacheManager, sched: Scheduler) -> None:
    pool = kv.pool
    holders = Counter(id(b) for blocks in kv.req_blocks.values() for b in blocks)
    free_ids = {id(b) for b in pool.free_queue}
    assert pool.free_queue.num_free == len(free_ids)
    for block in pool.blocks[1:]:
        assert block.ref_cnt == holders[id(block)], block
        assert (block.ref_cnt == 0) == (id(block) in free_ids), block
    for h, block in pool.cached.items():
        assert block.block_hash == h
    live = {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting}
    assert len(live) == len(sched.running) + len(sched.waiting)
    assert set(kv.req_blocks) <= live
    for r in sched.running:
        assert len(kv.req_blocks[r.request_id]) * BS >= r.num_computed_tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, caching=st.booleans(), budget=st.sampled_from([1, 5, 16, 64]))
def test_random_traffic_keeps_blocks_consistent(ops: list, caching: bool, budget: int) -> None:
    kv = KVCacheManager(NUM_BLOCKS, BS, caching)
    sched = Scheduler(kv, max_num_batched_tokens=budget, max_num_seqs=6, max_model_len=64)
    live: dict[str, Request] = {}
    counter = 0

    def step() -> None:
        batch = sched.schedule()
        assert batch.total_tokens <= budget
        assert len(sched.running) <= 6
        for r, _ in batch.failed:
            live.pop(r.request_id)
        sched.on_step_done(batch)
        for r in batch.requests:
            if r.num_computed_tokens == r.num_tokens:
                r.append_output_token(1 + (r.num_tokens * 7) % 3)
                if r.num_output_tokens >= r.max_tokens:
                    sched.finish(r)
                    live.pop(r.request_id)
        check_invariants(kv, sched)

    for op in ops:
        if op[0] == "arrive":
            _, prompt, max_tokens, prio = op
            if not kv.can_ever_fit(len(prompt) + max_tokens):
                continue
            r = Request(f"r{counter}", prompt, SamplingParams(), prio, max_tokens, frozenset())
            counter += 1
            live[r.request_id] = r
            sched.add(r)
        elif op[0] == "abort":
            if live:
                victim = sorted(live)[op[1] % len(live)]
                sched.finish(live.pop(victim))
        else:
            step()
        check_invariants(kv, sched)

    # Drain: everything finishes within a bounded number of steps (no deadlock, no livelock).
    for _ in range(5000):
        if not live:
            break
        step()
    assert not live, f"stuck: {len(live)} requests never finished"
    assert kv.pool.num_free_blocks == NUM_BLOCKS - 1
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
