"""The gateway computes the engine's token block keys: piecewise tokenization and memoised
hashing must equal the engine's own (prompts/) whole-prompt path exactly."""

from __future__ import annotations

import random

from gateway.routing.token_keys import ChainMemo, PieceCache, token_block_keys
from prompts.block_keys import block_hashes, block_key
from prompts.tokenizer import Tokenizer
from proto import inference_pb2 as pb
from worker.engine.demo_model import ensure_demo_model


def chat_request(messages: list[tuple[str, str]]) -> pb.GenerateRequest:
    r = pb.GenerateRequest(model="m")
    for role, content in messages:
        r.chat.messages.add(role=role, content=content)
    r.chat.add_generation_prompt = True
    return r


def test_piecewise_tokenization_equals_the_engines_once_learnt() -> None:
    tok = Tokenizer(ensure_demo_model())
    pieces = PieceCache(tok, verify=0)
    rng = random.Random(3)
    words = ["hello", "  spaced", "\nnew line", "émigré", "数据", "<tag>", "x" * 40, "🙂", ""]
    for n in range(60):
        msgs = [("system", f"system prompt {n % 5} " * 20)]
        for _ in range(rng.randint(1, 4)):
            msgs.append(("user", " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))))
            msgs.append(("assistant", " ".join(rng.choice(words) for _ in range(5))))
        msgs.append(("user", f"question {n}"))
        req = chat_request(msgs)
        whole = tok.prompt_ids(None, [{"role": r, "content": c} for r, c in msgs])
        got = list(
            pieces.prefix_ids(tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs]))
        )
        assert whole[: len(got)] == got  # a prefix before learning the last new piece
        pieces.learn()
        after = token_block_keys(req, tok, 16, "m", pieces)
        engine = [block_key(h) for h in block_hashes(whole, 16, b"m")]
        assert after == engine
    assert pieces.split is not None  # never had to fall back


def test_keys_walked_piece_by_piece_equal_the_joined_ids_keys(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """prompt_keys' walk by pieces gives chain_keys(prefix_ids) exactly: before and after the
    last piece is learnt, at two block sizes and two models, with the chain memo and the
    steps dropped as the test goes (their bounds set low)."""
    from gateway.routing import token_keys

    tok = Tokenizer(ensure_demo_model())
    pieces = PieceCache(tok, verify=0)
    walked, joined = ChainMemo(max_entries=300), ChainMemo()
    monkeypatch.setattr(token_keys, "MAX_STEP_BYTES", 100_000)
    forgotten = []  # the chain memo cleared under a walk: it joins and hashes instead
    extend = walked.extend
    walked.extend = lambda *a: forgotten.append(1) if (k := extend(*a)) is None else k  # type: ignore[method-assign]
    cleared = 0
    rng = random.Random(11)
    words = ["hello", "  spaced", "\nnew line", "émigré", "数据", "x" * 40, "🙂", ""]
    history: list[tuple[str, str]] = []
    for n in range(80):
        if n % 7 == 0:  # a new conversation
            history = [("system", f"system prompt {n % 3} " * rng.choice((5, 60, 200)))]
        # (numbered: a message repeated in one chat would be known once the first is seen)
        words_of = " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        history.append(("user", f"{n}: {words_of}"))
        req = chat_request(history)
        for _ in range(2):  # before the new piece is learnt, and after
            for size, model in ((16, "m"), (8, "other")):
                held = pieces._step_bytes
                tokens, keys = token_keys.prompt_keys(req, tok, pieces, size, model, walked)
                cleared += pieces._step_bytes < held
                assert tokens.rendered is not None and not tokens.ids
                ids = pieces.prefix_ids(tokens.rendered)
                assert keys == token_keys.chain_keys(ids, size, model, joined)
            pieces.learn()
        history.append(("assistant", " ".join(rng.choice(words) for _ in range(5))))
    assert forgotten and cleared  # both fallbacks were walked through
    whole = tok.prompt_ids(None, [{"role": r, "content": c} for r, c in history[:-1]])
    _, keys = token_keys.prompt_keys(chat_request(history[:-1]), tok, pieces, 16, "m", walked)
    assert keys == [block_key(h) for h in block_hashes(whole, 16, b"m")]


def test_the_self_check_falls_back_on_a_difference() -> None:
    tok = Tokenizer(ensure_demo_model())
    pieces = PieceCache(tok, verify=4)
    text = tok.apply_chat_template([{"role": "user", "content": "hi there"}])
    pieces.prefix_ids(text)
    first = next(iter(p for p in pieces.split.split(text) if p and p not in pieces.special))  # type: ignore[union-attr]
    pieces.learn()
    from array import array

    pieces.pieces[first] = array("I", [7, 7, 7])  # corrupt: as a tokenizer that merges across
    pieces.prefix_ids(text)
    pieces.learn()
    assert pieces.split is None
    assert pieces.prefix_ids(text) == tok.encode(text, add_special_tokens=False)


def test_memoised_chain_equals_the_engines_hashes() -> None:
    memo = ChainMemo(max_entries=50)
    rng = random.Random(5)
    base = [rng.randrange(500) for _ in range(300)]
    for _ in range(20):
        ids = base[: rng.randrange(0, 300)] + [rng.randrange(500) for _ in range(rng.randrange(40))]
        for extra in (b"m", b"other"):
            assert memo.keys(ids, 16, extra) == [block_key(h) for h in block_hashes(ids, 16, extra)]
    # Prompts that share whole spans, parts of spans and none, with a bound so low that
    # the memo is dropped as the test goes.
    memo = ChainMemo(max_entries=400)
    for _ in range(60):
        head = base[: rng.choice((0, 16, 17, 100, 300))]
        ids = head + [rng.randrange(3) for _ in range(rng.randrange(60))]
        assert memo.keys(ids, 16, b"m") == [block_key(h) for h in block_hashes(ids, 16, b"m")]
        assert memo.keys(ids, 8, b"m") == [block_key(h) for h in block_hashes(ids, 8, b"m")]
    # Long prompts walk spans of 64 blocks, then of 8, then blocks: heads that end on each
    # kind of boundary, and past them.
    long = [rng.randrange(500) for _ in range(2600)]
    memo = ChainMemo()
    for _ in range(3):
        for cut in (0, 1024, 1040, 1152, 2048, 2600):
            ids = long[:cut] + [rng.randrange(9) for _ in range(rng.randrange(1200))]
            for size in (16, 8):
                expected = [block_key(h) for h in block_hashes(ids, size, b"m")]
                assert memo.keys(ids, size, b"m") == expected
    # A prompt of two whole spans of 64 is walked by them alone: with the blocks and the
    # spans of 8 forgotten, its keys still come, and no block is hashed or looked up.
    ids = long[: 128 * 16]
    expected = memo.keys(ids, 16, b"m")
    memo._keys[b"m"].clear()
    memo._spans[b"m"][1].clear()
    assert memo.keys(ids, 16, b"m") == expected and not memo._keys[b"m"]
    odd = [-1, 2**40] * 16  # not a tokenizer's ids (a client's token-id prompt): still equal
    assert memo.keys(odd, 16, b"m") == [block_key(h) for h in block_hashes(odd, 16, b"m")]


def test_whole_ids_are_the_engines_once_the_pieces_are_checked() -> None:
    """What the gateway forwards as a prompt's ids: all of them, equal to the engine's own
    tokenizing, and nothing while the first prompts are still checking the pieces."""
    tok = Tokenizer(ensure_demo_model())
    pieces = PieceCache(tok, verify=2)
    for n in range(6):
        msgs = [
            {"role": "system", "content": f"system prompt {n % 2} " * 20},
            {"role": "user", "content": f"question {n}, with émigré 数据 🙂"},
        ]
        text = tok.apply_chat_template(msgs)
        pieces.prefix_ids(text)
        got = pieces.whole_ids(text)
        if n < 2:
            assert got is None  # not checked yet
        else:
            assert got is not None and list(got) == tok.prompt_ids(None, msgs)
        pieces.learn()
    assert pieces.verified and pieces.split is not None


def test_the_fingerprint_follows_what_tokenizing_depends_on(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil

    src = ensure_demo_model()
    same = tmp_path / "same"
    other = tmp_path / "other"
    shutil.copytree(src, same)
    shutil.copytree(src, other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(cfg))
    base = Tokenizer(src).fingerprint
    assert Tokenizer(same).fingerprint == base  # another directory, the same files
    assert Tokenizer(other).fingerprint != base  # another chat template


def test_ids_a_failed_check_condemned_are_not_forwarded_on_a_retry() -> None:
    """A request decided before the piecewise check failed (its pieces were joined then)
    and retried after it gets whole-encoded ids, never the joined ones."""
    from gateway.registry.base import WorkerInfo, WorkerState
    from gateway.routing.cache_views import CacheView
    from gateway.routing.policy import PrefixAware
    from gateway.routing.token_keys import TokenizerStore
    from proto.prompt_ids import prompt_ids_from

    tok = Tokenizer(ensure_demo_model())
    pool = [
        WorkerInfo(worker_id=f"w{i}", address=f"a{i}", state=WorkerState.SERVING) for i in (0, 1)
    ]
    policy = PrefixAware()
    policy.views = {w.worker_id: CacheView(16, "m", "", fingerprint=tok.fingerprint) for w in pool}
    policy.tokenizers = TokenizerStore()
    policy.tokenizers.add("m", tok)
    msgs = [("system", "You are a helpful assistant. " * 10), ("user", "hello there")]
    first = chat_request(msgs)
    policy.prompt_ids(policy.choose(pool, first, {}), first)
    pieces = policy.tokenizers.pieces(tok)
    pieces.learn()  # every piece known; 31 prompts left to check
    from array import array

    part = next(k for k in pieces.pieces if "hello there" in k)
    pieces.pieces[part] = array("I", [*pieces.pieces[part], 5])  # as a tokenizer that merges across
    again = chat_request(msgs)
    picked = policy.choose(pool, again, {})
    assert policy.prompt_ids(picked, again) is None  # not checked yet
    pieces.learn()  # during the retry's backoff: this prompt's check fails
    assert pieces.split is None
    other = next(w for w in pool if w is not picked)
    hint = policy.prompt_ids(other, again)
    assert hint is not None
    truth = tok.prompt_ids(None, [{"role": r, "content": c} for r, c in msgs])
    assert prompt_ids_from(hint.ids) == truth


def test_a_salted_requests_keys_are_the_engines_salted_keys() -> None:
    """A tenant's salt (cache_salt) keys its blocks apart on both sides: the gateway's keys,
    walked by pieces or from whole ids, are what the engine hashes with the salt."""
    from gateway.routing import token_keys
    from prompts.block_keys import salted

    tok = Tokenizer(ensure_demo_model())
    pieces = PieceCache(tok, verify=0)
    msgs = [("system", "a shared system prompt " * 20), ("user", "hello")]
    whole = tok.prompt_ids(None, [{"role": r, "content": c} for r, c in msgs])
    plain = [block_key(h) for h in block_hashes(whole, 16, b"m")]
    for _ in range(2):  # pieces not yet learnt, then learnt
        req = chat_request(msgs)
        req.cache_salt = "tenant-a"
        engine = [block_key(h) for h in block_hashes(whole, 16, salted(b"m", "tenant-a"))]
        _, walked = token_keys.prompt_keys(req, tok, pieces, 16, "m", ChainMemo())
        assert walked and walked == engine[: len(walked)]
        assert not set(walked) & set(plain)
        pieces.learn()
    assert token_block_keys(req, tok, 16, "m", None) == engine


def test_salts_chosen_by_clients_cannot_grow_the_memos_past_their_shapes() -> None:
    """One salt per request keeps at most MAX_SHAPES tables, and drops the smallest: the
    model's own (the largest) stays, and keys stay exact after any drop."""
    from gateway.routing import token_keys

    tok = Tokenizer(ensure_demo_model())
    pieces = PieceCache(tok, verify=0)
    memo = ChainMemo()
    msgs = [("system", "a long shared system prompt " * 30), ("user", "hi")]
    for n in range(3):  # the model's tables hold several prompts
        req = chat_request([*msgs, ("user", f"turn {n}")])
        token_keys.prompt_keys(req, tok, pieces, 16, "m", memo)
        pieces.learn()
    for n in range(3 * token_keys.MAX_SHAPES):
        req = chat_request([("user", f"salted {n}")])
        req.cache_salt = f"salt-{n}"
        _, keys = token_keys.prompt_keys(req, tok, pieces, 16, "m", memo)
        pieces.learn()
    assert len(memo._keys) <= token_keys.MAX_SHAPES
    assert len(pieces._steps) <= token_keys.MAX_SHAPES
    assert b"m" in memo._keys and (16, b"m") in pieces._steps
    req = chat_request([*msgs, ("user", "turn 0")])
    whole = tok.prompt_ids(
        None, [{"role": r, "content": c} for r, c in [*msgs, ("user", "turn 0")]]
    )
    _, keys = token_keys.prompt_keys(req, tok, pieces, 16, "m", memo)
    assert keys == [block_key(h) for h in block_hashes(whole, 16, b"m")][: len(keys)] and keys
