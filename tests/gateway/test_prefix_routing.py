"""Prefix-aware routing: the index's prefix semantics and the policy's load bound."""

from __future__ import annotations

import collections
import struct
import time
from array import array

from gateway.registry.base import WorkerInfo, WorkerState
from gateway.routing.decision_share import RemoteLoads, decode, decode_all, encode, encode_loads
from gateway.routing.policy import CombinedLoads, PrefixAware, make_policy
from gateway.routing.prefix_index import BLOCK_BYTES, PrefixIndex, block_keys, prompt_bytes
from proto import inference_pb2 as pb

SYSTEM = "You are a careful assistant who answers in French. " * 20


def chat(*contents: str) -> pb.GenerateRequest:
    r = pb.GenerateRequest(model="m")
    for i, c in enumerate(contents):
        r.chat.messages.add(role="system" if i == 0 else "user", content=c)
    return r


def workers(n: int) -> list[WorkerInfo]:
    return [
        WorkerInfo(worker_id=f"w{i}", address=f"a{i}", state=WorkerState.SERVING) for i in range(n)
    ]


def test_keys_chain_so_equal_keys_mean_equal_prefixes() -> None:
    a = block_keys(b"x" * BLOCK_BYTES * 3)
    b = block_keys(b"x" * BLOCK_BYTES * 2 + b"y" * BLOCK_BYTES)
    c = block_keys(b"y" * BLOCK_BYTES + b"x" * BLOCK_BYTES * 2)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert not set(a) & set(c)  # same block content at another position is another key
    assert block_keys(b"x" * (BLOCK_BYTES - 1)) == []  # a partial block is not cached


def test_chat_and_token_prompts_have_canonical_bytes() -> None:
    assert prompt_bytes(chat("ab", "c")) != prompt_bytes(chat("a", "bc"))
    r = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]))
    assert len(prompt_bytes(r)) == 12


def test_match_counts_leading_blocks_per_worker() -> None:
    index = PrefixIndex()
    long = block_keys(b"a" * BLOCK_BYTES * 8)
    index.insert(long[:6], "w0")
    index.insert(long[:2], "w1")
    assert index.match(long, {"w0", "w1", "w2"}) == {"w0": 6, "w1": 2, "w2": 0}
    assert index.match([], {"w0"}) == {"w0": 0}


def test_bisected_match_equals_a_walk_of_whole_chains() -> None:
    import random

    rng = random.Random(3)
    index = PrefixIndex(ttl_s=100.0)
    chains = [block_keys(b"head" * 48 + bytes([c]) * BLOCK_BYTES * 4) for c in range(4)]
    now = time.monotonic()
    events = [  # whole chains' prefixes sent to various workers, in time order
        (now - rng.choice((0.0, 50.0, 150.0)), rng.choice(chains), rng.choice("abc"))
        for _ in range(300)
    ]
    for at, chain, w in sorted(events, key=lambda e: e[0]):
        index.insert(chain[: rng.randrange(len(chain) + 1)], w, now=at)

    def walk(keys: list[int], w: str) -> int:
        n = 0
        while n < len(keys) and index.routed_at(keys[n], w) > time.monotonic() - 100.0:
            n += 1
        return n

    for chain in chains:
        for cut in range(len(chain) + 1):
            got = index.match(chain[:cut], {"a", "b", "c", "d"})
            assert got == {w: walk(chain[:cut], w) for w in "abcd"}


def test_stale_entries_do_not_count_and_the_index_stays_bounded() -> None:
    index = PrefixIndex(capacity=100, ttl_s=10.0)
    keys = block_keys(b"a" * BLOCK_BYTES * 4)
    index.insert(keys, "w0", now=0.0)  # long ago
    assert index.match(keys, {"w0"}) == {"w0": 0}
    for i in range(50):
        index.insert(block_keys(bytes([i % 256]) * BLOCK_BYTES * 5), "w1")
    assert len(index) <= 100
    index.forget("w1")
    assert all("w1" not in h for h in index._holders.values())


def test_a_machine_just_booted_does_not_credit_every_worker(monkeypatch) -> None:
    """time.monotonic() counts from boot: in a machine's first ten minutes "now - TTL" is
    negative, and a worker never sent a prefix must still not count as holding it."""
    import gateway.routing.prefix_index as prefix_index

    monkeypatch.setattr(prefix_index.time, "monotonic", lambda: 5.0)
    index = PrefixIndex(ttl_s=600.0)
    keys = block_keys(b"a" * BLOCK_BYTES * 4)
    index.insert(keys, "w0")
    assert index.match(keys, {"w0", "w1"}) == {"w0": 4, "w1": 0}
    assert index.routed_at(keys[0], "w1") < 5.0 - 600.0


def test_a_shared_prefix_returns_to_the_replica_that_holds_it() -> None:
    policy = make_policy("prefix-aware")
    pool = workers(4)
    first = policy.choose(pool, chat(SYSTEM, "question one"), {})
    policy.routed(first, chat(SYSTEM, "question one"))
    for q in ("question two", "question three", "another"):
        assert policy.choose(pool, chat(SYSTEM, q), {}) is first


def test_a_hot_prefix_does_not_collapse_onto_one_replica() -> None:
    """Everyone shares one system prompt; in-flight load keeps the spread even."""
    policy = PrefixAware()
    pool = workers(4)
    outstanding: collections.Counter[str] = collections.Counter()
    for i in range(200):
        req = chat(SYSTEM, f"user {i} asks something different each time")
        w = policy.choose(pool, req, outstanding)
        policy.routed(w, req)
        outstanding[w.worker_id] += 1  # none finish: the worst case for collapse
    loads = sorted(outstanding.values())
    assert loads[-1] <= loads[0] * 1.5 + 4 + 1, loads
    # Each decision counted once, by why: the first went where nothing was held, most
    # later ones to a holder, and the spread came from the load bound.
    d = policy.decisions
    assert sum(d.values()) == 200 and d["new_prefix"] >= 1
    assert d["held"] > 0 and d["load_bound"] > 0 and d["queued_prefill"] == 0, d


def test_queued_prefill_sends_a_request_where_its_first_token_comes_sooner() -> None:
    """Cost = prompt tokens the replica must prefill first: its queue, plus what it lacks
    (a missed token weighing `miss_weight`, 1.5)."""
    policy = PrefixAware()
    pool = workers(2)
    first = chat(SYSTEM, "question one")
    holder = policy.choose(pool, first, {})
    queued = policy.routed(holder, first)
    assert queued > 200  # it held nothing: the whole prompt (~1,000 bytes) is to prefill
    assert policy.prefilling == {holder.worker_id: queued}
    other = pool[1] if holder is pool[0] else pool[0]
    # Waiting for the holder's queue (1x the prompt) beats prefilling it all elsewhere (1.5x).
    assert policy.choose(pool, chat(SYSTEM, "two"), {holder.worker_id: 1}) is holder
    # A long prefill queued on the holder outweighs what the prefix saves...
    policy.prefilling[holder.worker_id] = 4 * queued
    assert policy.choose(pool, chat(SYSTEM, "three"), {holder.worker_id: 2}) is other
    assert policy.decisions == {"new_prefix": 1, "held": 1, "queued_prefill": 1}
    # ...and the tokens are handed back when the first output comes (or the attempt ends).
    policy.prefilled(holder.worker_id, 4 * queued)
    assert policy.prefilling == {}
    assert policy.choose(pool, chat(SYSTEM, "four"), {holder.worker_id: 2}) is holder
    # With misses weighed as plain prefill time, the idle replica answers first.
    policy.miss_weight = 1.0
    policy.prefilling[holder.worker_id] = queued
    assert policy.choose(pool, chat(SYSTEM, "five"), {holder.worker_id: 1}) is other


def test_unmatched_prompts_go_to_the_least_loaded() -> None:
    policy = PrefixAware()
    pool = workers(3)
    w = policy.choose(pool, chat("something nobody has sent " * 10), {"w0": 5, "w1": 0, "w2": 3})
    assert w.worker_id == "w1"


def test_sibling_datagrams_round_trip() -> None:
    entries = [("w0", [1, 2**63, 3]), ("worker-é", list(range(100)))]
    data = b"".join(encode(w, k) for w, k in entries)
    assert decode(data) == entries
    assert decode(data + b"\x05\x00") == entries  # a malformed tail is dropped


def test_stale_worker_reports_do_not_steer_load() -> None:
    """Reports are up to a probe interval old; this gateway's in-flight count is exact."""
    policy = PrefixAware()
    pool = workers(2)
    pool[0].stats = {"in_flight": 16.0, "kv_cache_usage": 0.9}  # stale: it has drained since
    w = policy.choose(pool, chat("a fresh prompt nobody sent " * 10), {"w0": 0, "w1": 5})
    assert w.worker_id == "w0"


def token_prompt(ids: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(model="m", token_ids=pb.TokenIds(ids=ids))


def engine_keys(ids: list[int]) -> list[int]:
    from prompts.block_keys import block_hashes, block_key

    return [block_key(h) for h in block_hashes(ids, 16, b"m")]


def test_reported_caches_beat_the_learnt_index_and_evictions_count() -> None:
    from gateway.routing.cache_views import CacheView

    pool = workers(3)
    ids = list(range(1, 161))  # 10 blocks of 16 tokens
    policy = PrefixAware()
    views = {w.worker_id: CacheView(16, "m", "") for w in pool}
    policy.views = views
    # The index believes w0 (a decision), but w2 reports holding the prompt: w2 wins.
    policy.routed(pool[0], token_prompt(ids))
    views["w0"].apply([], [], now=0.0)
    views["w2"].apply(engine_keys(ids), [], now=0.0)
    later = token_prompt(ids)
    assert policy.choose(pool, later, {}).worker_id in {"w0", "w2"}  # w0: sent just now
    # w0 reports evicting the blocks after the decision: only w2 still counts.
    import time

    views["w0"].apply([], engine_keys(ids), now=time.monotonic() + 1)
    assert policy.choose(pool, token_prompt(ids), {}).worker_id == "w2"
    # A decision older than the recent window no longer vouches for anything.
    policy.recent_s = 0.0
    views["w2"].apply([], engine_keys(ids)[5:], now=time.monotonic())
    views["w1"].apply(engine_keys(ids), [], now=time.monotonic())
    assert policy.choose(pool, token_prompt(ids), {}).worker_id == "w1"


def test_only_blocks_past_the_reported_ones_are_recorded_as_sent() -> None:
    from gateway.routing.cache_views import CacheView

    pool = workers(2)
    policy = PrefixAware()
    policy.views = views = {w.worker_id: CacheView(16, "m", "") for w in pool}
    shared: list[tuple[str, list[int]]] = []
    policy.share = lambda wid, keys: shared.append((wid, keys))
    ids = list(range(1, 161))  # 10 blocks
    keys = engine_keys(ids)
    views["w1"].apply(keys[:6], [], now=time.monotonic())
    request = token_prompt(ids)
    assert policy.choose(pool, request, {}).worker_id == "w1"
    policy.routed(pool[1], request)
    # The 6 blocks w1 reported are not recorded or told to siblings; the other 4 are.
    assert shared == [("w1", keys[6:])]
    assert policy.index.routed_at(keys[0], "w1") == float("-inf")
    assert policy.index.routed_at(keys[6], "w1") > time.monotonic() - 1
    # So w1 still counts as holding all 10 while it prefills them, and an eviction of a
    # reported block since still breaks its run.
    assert policy._holdings(token_prompt(ids), pool) == {"w0": 0.0, "w1": 1.0}
    views["w1"].apply([], keys[2:3], now=time.monotonic() + 1)
    assert policy._holdings(token_prompt(ids), pool) == {"w0": 0.0, "w1": 0.2}


def test_unreported_workers_are_scored_from_the_index() -> None:
    from gateway.routing.cache_views import CacheView

    pool = workers(2)
    policy = PrefixAware()
    policy.views = {"w0": CacheView(16, "m", "")}  # w1 cannot report (an OpenAI upstream)
    first = chat(SYSTEM, "one")
    policy.routed(pool[1], first)
    assert policy.choose(pool, chat(SYSTEM, "two"), {}).worker_id == "w1"


def test_decisions_made_on_text_still_count_once_the_tokenizer_is_loaded() -> None:
    """A process that routed a conversation before its tokenizer loaded (or a sibling that
    did) keeps it there while the replicas' cache reports are on the way."""
    from gateway.routing.cache_views import CacheView
    from gateway.routing.token_keys import TokenizerStore
    from prompts.tokenizer import Tokenizer
    from worker.engine.demo_model import ensure_demo_model

    pool = workers(2)
    policy = PrefixAware()
    tok = Tokenizer(ensure_demo_model())
    policy.views = {w.worker_id: CacheView(16, "m", tok.source_dir) for w in pool}
    policy.routed(pool[1], chat(SYSTEM, "one"))  # no tokenizer yet: text keys only
    policy.tokenizers = TokenizerStore()
    policy.tokenizers.add("m", tok)
    for n in range(8):
        request = chat(SYSTEM, f"turn {n}")
        assert policy._token_keys(request, policy.views["w0"])  # routed on token keys
        assert policy.choose(pool, request, {"w1": 1}).worker_id == "w1"  # busier, holds it


def test_a_new_prefix_goes_where_the_least_new_content_went() -> None:
    """A prompt no replica holds goes to the replica sent the fewest uncached tokens lately
    (its cache has the most room), as SGLang's router sends it to the smallest tree; its
    load and queued prefill only break near-ties."""
    policy = PrefixAware()
    pool = workers(2)
    first = chat(SYSTEM, "question one")
    policy.routed(policy.choose(pool, first, {"w1": 1}), first)  # to w0, the idler
    policy.prefilled("w0", policy.prefilling["w0"])  # prefilled already, and idle again
    fresh = chat("An unrelated system prompt nobody has sent yet. " * 10, "hello")
    assert policy.choose(pool, fresh, {"w0": 0, "w1": 1}).worker_id == "w1"


def test_prompts_that_share_only_a_first_block_spread_by_new_content() -> None:
    """Two system prompts alike in their first block: the replica holding one gains next to
    nothing from the other, which goes where less new content went."""
    policy = PrefixAware()
    pool = workers(2)
    head = "x" * BLOCK_BYTES
    first = chat(head + SYSTEM, "one")
    policy.routed(policy.choose(pool, first, {"w1": 1}), first)  # to w0, the idler
    policy.prefilled("w0", policy.prefilling["w0"])
    other = chat(head + "A quite different system prompt, for billing. " * 20, "one")
    assert policy.choose(pool, other, {"w0": 0, "w1": 1}).worker_id == "w1"


def test_new_content_is_forgotten_with_a_half_life() -> None:
    import time

    from gateway.routing.policy import FOOTPRINT_HALF_LIFE_S

    policy = PrefixAware()
    pool = workers(2)
    policy.footprint = {"w0": (1000.0, time.monotonic() - FOOTPRINT_HALF_LIFE_S)}
    fps = policy._footprints(pool)
    assert 490 < fps["w0"] < 510 and fps["w1"] == 0.0


def test_loads_travel_with_decisions_and_old_readers_skip_them() -> None:
    sender = b"\x01" * 8
    entry = encode_loads(sender, {"w0": 3, "wörker": 1}, {"w0": 96.5})
    data = encode("w0", [7]) + encode("w1", [8]) + entry
    decisions, loads = decode_all(data)
    assert decisions == [("w0", [7]), ("w1", [8])]
    assert loads == (sender, {"w0": 3, "wörker": 1}, {"w0": 96.5})
    assert decode(data) == decisions
    bad = encode_loads(sender, {"w0": -1})  # not a count: no loads, the decisions stand
    assert decode_all(encode("w0", [7]) + bad) == ([("w0", [7])], None)
    assert decode_all(entry[:-1]) == ([], None)  # torn

    def old_decode(data: bytes) -> list[tuple[str, list[int]]]:
        """What a gateway of the version before loads were shared reads (mid-rollout)."""
        out, view = [], memoryview(data)
        while len(view) >= 3:
            n_id, n_keys = struct.unpack_from("!BH", view)
            end = 3 + n_id + 8 * n_keys
            if end > len(view):
                break
            keys = array("Q")
            keys.frombytes(view[3 + n_id : end])
            out.append((bytes(view[3 : 3 + n_id]).decode(), keys.tolist()))
            view = view[end:]
        return out

    assert old_decode(data) == decisions


def test_remote_loads_sum_senders_and_forget_the_silent() -> None:
    remote = RemoteLoads(ttl_s=0.2)
    remote.update(b"a" * 8, {"w0": 2, "w1": 1})
    remote.update(b"b" * 8, {"w0": 3})
    assert remote.totals() == {"w0": 5, "w1": 1}
    remote.update(b"a" * 8, {})  # its calls ended
    assert remote.totals() == {"w0": 3}
    time.sleep(0.25)
    assert remote.totals() == {}


def test_load_bound_counts_other_gateways_calls() -> None:
    """A replica this gateway sends little to but others load is no longer the idle one."""
    pool = workers(2)
    prompt = chat(SYSTEM, "q")
    policy = PrefixAware()
    w = policy.choose(pool, prompt, {"w0": 0, "w1": 0})
    policy.routed(w, prompt)
    holder, other = w.worker_id, ("w1" if w.worker_id == "w0" else "w0")
    own = {"w0": 0, "w1": 0}
    assert policy.choose(pool, prompt, own).worker_id == holder
    busy = CombinedLoads(own, {holder: 20})  # over 1.5 x 0 + 8
    assert policy.choose(pool, prompt, busy).worker_id == other


def test_new_content_sent_elsewhere_counts_against_cache_room() -> None:
    """A new prefix goes where the least new content went, whichever gateway sent it."""
    pool = workers(2)
    sender, receiver = PrefixAware(), PrefixAware()
    sender.share = lambda worker, keys: None
    prompt = chat(SYSTEM, "q")
    w = sender.choose(pool, prompt, {"w0": 0, "w1": 0})
    sender.routed(w, prompt)
    content = sender.take_content()
    assert content[w.worker_id] > 0 and sender.take_content() == {}
    for worker, tokens in content.items():
        receiver.learn_content(worker, tokens)
    fresh = chat("another system prompt nobody has sent yet " * 20, "q")
    picks = {receiver.choose(pool, fresh, {"w0": 0, "w1": 0}).worker_id for _ in range(4)}
    assert picks == {"w1" if w.worker_id == "w0" else "w0"}  # ties would take turns


def test_single_message_chats_spread_by_their_whole_length() -> None:
    """A chat's new last piece is tokenized after the decision, so a one-message chat had
    no tokens at all to the policy: its prefill and new content counted 0, the first
    prompt's content kept every later one away from its replica, and distinct chats went
    19 to 1 (the README check, 20 chats one after another to two replicas)."""
    from gateway.routing.cache_views import CacheView
    from gateway.routing.token_keys import TokenizerStore
    from prompts.tokenizer import Tokenizer
    from worker.engine.demo_model import ensure_demo_model

    pool = workers(2)
    policy = PrefixAware()
    tok = Tokenizer(ensure_demo_model())
    policy.views = {w.worker_id: CacheView(16, "m", tok.source_dir) for w in pool}
    policy.tokenizers = TokenizerStore()
    policy.tokenizers.add("m", tok)
    sent: collections.Counter[str] = collections.Counter()
    for n in range(20):
        request = pb.GenerateRequest(model="m")
        request.chat.messages.add(role="user", content=f"question {n}: " + "tell me more. " * 60)
        w = policy.choose(pool, request, {})
        prefill = policy.routed(w, request)
        assert prefill > 100  # ~200 tokens, none held anywhere
        policy.prefilled(w.worker_id, prefill)  # answered before the next arrives
        policy.tokenizers.pieces(tok).learn()  # as the event loop does after a decision
        sent[w.worker_id] += 1
    assert min(sent.values()) >= 8, sent


def test_a_weight_is_a_share_of_new_prefixes() -> None:
    """An operator's weight counts as capacity under prefix-aware routing too: with only
    its load divided, prefixes decided everything (weight 10: 0 requests of 60)."""
    from gateway.routing.policy import WeightedLoads

    policy = PrefixAware()
    pool = workers(2)
    sent: collections.Counter[str] = collections.Counter()
    for n in range(80):
        request = chat(f"system prompt number {n}, " * 30, "hello")
        w = policy.choose(pool, request, WeightedLoads({}, {"w1": 3.0}))
        policy.prefilled(w.worker_id, policy.routed(w, request))
        sent[w.worker_id] += 1
    assert 55 <= sent["w1"] <= 65, sent  # 3 to 1
