"""A prompt's cache block keys as the workers compute them: tokenize, then chain-hash.

The gateway tokenizes with the model's own tokenizer and chat template (`prompts`, the
code the engine runs), so its keys equal the ones workers report over WatchCache. A
tokenizer is loaded off the event loop on first need (`--tokenizer MODEL=DIR`, else the
directory a worker on this host advertises); until it is ready, or where none can be
loaded, the policy falls back to text blocks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import sys
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prompts.block_keys import block_hashes, block_key, salted
from proto import inference_pb2 as pb

if TYPE_CHECKING:
    from prompts.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TokenizerStore:
    def __init__(self, configured: dict[str, str] | None = None) -> None:
        self.configured = dict(configured or {})
        """model -> tokenizer directory, from --tokenizer."""
        self._loaded: dict[str, Tokenizer] = {}
        self._pieces: dict[int, PieceCache] = {}
        self._learning: set[int] = set()
        self._pending: set[str] = set()
        self._failed: set[str] = set()

    def get(self, model: str, hint: str = "") -> Tokenizer | None:
        """The model's tokenizer if loaded; otherwise start loading it and answer None."""
        path = self.configured.get(model) or hint
        if not path:
            return None
        tok = self._loaded.get(path)
        if tok is None and path not in self._pending and path not in self._failed:
            self._load(path)
        return tok

    def _load(self, path: str) -> None:
        if not (Path(path) / "tokenizer.json").is_file():
            self._failed.add(path)  # a worker on another host: its directory is not here
            return
        self._pending.add(path)

        def load() -> Tokenizer:
            from prompts.tokenizer import Tokenizer

            return Tokenizer(path)

        def done(fut: asyncio.Future[Tokenizer]) -> None:
            self._pending.discard(path)
            if fut.cancelled():
                return
            if (exc := fut.exception()) is not None:
                self._failed.add(path)
                log.warning("cannot load the tokenizer in %s (routing on text): %s", path, exc)
            else:
                self._loaded[path] = fut.result()
                log.info("routing on token blocks with the tokenizer in %s", path)

        asyncio.get_running_loop().run_in_executor(None, load).add_done_callback(done)

    def pieces(self, tokenizer: Tokenizer) -> PieceCache:
        """The piece cache that goes with a loaded tokenizer."""
        cache = self._pieces.get(id(tokenizer))
        if cache is None or cache.tokenizer is not tokenizer:
            cache = self._pieces[id(tokenizer)] = PieceCache(tokenizer)
        return cache

    def learn_later(self, cache: PieceCache) -> None:
        """Tokenize `cache`'s new pieces right after the current request's decision (on
        the event loop, so never concurrently with a decision); without a running loop
        (benchmarks, tests) the caller calls `cache.learn()` itself."""
        if not cache.queued or id(cache) in self._learning:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._learning.add(id(cache))

        def run() -> None:
            self._learning.discard(id(cache))
            cache.learn()

        loop.call_soon(run)

    def add(self, model: str, tokenizer: Tokenizer) -> None:
        """Use an already loaded tokenizer for `model` (benchmarks, embedding)."""
        path = tokenizer.source_dir
        self.configured[model] = path
        self._loaded[path] = tokenizer

    def loaded(self) -> list[str]:
        return sorted(self._loaded)

    async def wait_loaded(self, path: str, timeout: float = 30.0) -> bool:
        """For tests and start-up: True once `path` is loaded (False if it failed)."""
        async with asyncio.timeout(timeout):
            while path in self._pending:
                await asyncio.sleep(0.01)
        return path in self._loaded


_Step = tuple[tuple[int, ...], int | None, bytes]
"""A piece's step along a chain: its whole blocks' keys, the last block's key, the tokens
after that block (uint32 bytes)."""
MAX_SHAPES = 16
"""(block size, extra key) pairs a piece cache walks and a chain memo keeps tables for:
models, and tenants' cache salts. A new one past this drops the smallest (clients choose
salts: one per request must not grow the memo without bound, nor clear every model's)."""
MAX_STEP_BYTES = 64_000_000
"""What a piece cache's steps may hold before they are dropped, counted per entry (a 3 KB
system prompt's step is ~8 KB, a special token's ~0.3 KB)."""


class PieceCache:
    """Tokenizes rendered chat prompts piece by piece between their special tokens, and
    keeps the pieces: a system prompt or an earlier turn is tokenized once, then reused.

    Exact because `tokenizers` splits on added tokens before anything else, so the text
    between them is encoded independently; that holds for plain added tokens (no strip,
    single-word or normalization flags), and the first prompts are checked against a
    whole encode anyway, which replaces this for good on any difference.

    On the request path the ids stop at the last piece never seen, normally the new user
    message, which no replica can hold yet (`prefix_ids`); that piece is tokenized after
    the decision (`learn`, scheduled on the event loop), ready for the next turn.

    Measured (routing_bench decision micro-benchmark, 3 KB chats, demo tokenizer at ~1.7
    characters a token), whole decision p50: encoding the whole prompt 1,160 us; every
    piece encoded in the decision 455 us; the last new piece deferred 245 us; with
    ChainMemo and no text keys where all replicas report, 150 us. Block keys walked a piece
    at a time (`prefix_keys`) instead of joining the ids and walking the chain: 38-41 ->
    12-13 us for a 3 KB chat (timeit); whole decision 148-228 -> 126-189 us (four
    alternating pairs, mean 186 -> 150).
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int = 2_000_000, verify: int = 32) -> None:
        self.tokenizer = tokenizer
        added = tokenizer.hf.get_added_tokens_decoder()
        plain = all(
            not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in added.values()
        )
        self.special = {t.content: i for i, t in added.items()}
        names = sorted(self.special, key=len, reverse=True)
        pattern = "(" + "|".join(map(re.escape, names)) + ")"
        self.split = re.compile(pattern) if plain and names else None
        self.pieces: OrderedDict[str, array[int]] = OrderedDict()
        self.tokens = 0
        self.unseen_chars = 0
        """Characters the last `prefix_keys` or `prefix_ids` left out (its new pieces)."""
        self._learnt = [0, 0]
        """Characters and tokens of every piece tokenized: this tokenizer's ratio."""
        self.max_tokens = max_tokens
        self.verify = verify
        self.queued: list[str] = []
        """Rendered prompts with pieces not tokenized yet, for `learn`."""
        self._steps: dict[tuple[int, bytes], dict[tuple[int | None, bytes, str], _Step]] = {}
        """Per (block size, extra key): (the block key before a piece, the tokens after that
        block, the piece) -> the keys of the blocks the piece completes, and the same two
        after it (see prefix_keys)."""
        self._step_bytes = 0
        """What `_steps` holds, roughly (see prefix_keys), against MAX_STEP_BYTES."""
        self._shape_bytes: dict[tuple[int, bytes], int] = {}
        """The same, per shape (block size, extra key)."""

    def prefix_ids(self, text: str) -> Sequence[int]:
        """`text`'s token ids up to its last piece not seen before (all of it once learnt).

        Earlier unknown pieces (a system prompt or turns this gateway has not seen, which
        a replica may hold all the same) are tokenized now; only the last one, normally
        the new user message, waits for `learn`.
        """
        if self.split is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self._ids_of(self._parts(text))

    def _ids_of(self, parts: list[str]) -> array[int]:
        """The ids of known parts, joined."""
        pieces, special = self.pieces, self.special
        ids = array("I")  # extended piece by piece in C, and hashed as it is (ChainMemo)
        for part in parts:
            if not part:
                continue
            sid = special.get(part)
            if sid is not None:
                ids.append(sid)
            else:
                pieces.move_to_end(part)
                ids.extend(pieces[part])
        return ids

    def prefix_keys(
        self, text: str, block_size: int, extra_key: bytes, memo: ChainMemo
    ) -> list[int]:
        """`chain_keys(prefix_ids(text))`, walked a piece at a time: a piece seen before at
        the same place in a chain (the same block before it, the same tokens since) gives
        its blocks' keys in one look-up, where joining the ids and walking the chain took
        a look-up per 8 or 64 blocks and one per block past the last span. Only for a
        tokenizer split into pieces (`split`; else `prefix_ids` encodes whole)."""
        parts = self._parts(text)
        shape = (block_size, extra_key)
        steps = self._steps.get(shape)
        if self._step_bytes > MAX_STEP_BYTES:
            self._steps.clear()
            self._shape_bytes.clear()
            self._step_bytes = 0
            steps = None
        elif steps is None and len(self._steps) >= MAX_SHAPES:
            smallest = min(self._steps, key=lambda s: len(self._steps[s]))
            del self._steps[smallest]
            self._step_bytes -= self._shape_bytes.pop(smallest, 0)
        if steps is None:
            steps = self._steps[shape] = {}
        pieces, special = self.pieces, self.special
        out: list[int] = []
        parent: int | None = None
        tail = b""
        for part in parts:
            if not part:
                continue
            got = steps.get((parent, tail, part))
            sid = special.get(part)
            if sid is None:
                pieces.move_to_end(part)
            if got is None:
                ids = array("I", (sid,)) if sid is not None else pieces[part]
                data = tail + ids.tobytes()
                keys = memo.extend(parent, data, block_size, extra_key)
                if keys is None:  # the memo was cleared since: join and hash from the start
                    return memo.keys(self._ids_of(parts), block_size, extra_key)
                whole = len(keys) * block_size * 4
                got = steps[(parent, tail, part)] = (
                    tuple(keys),
                    keys[-1] if keys else parent,
                    data[whole:],
                )
                # The entry, the key's copy of the part, the tail, ~44 bytes a key.
                size = 250 + sys.getsizeof(part) + len(data) - whole + 44 * len(keys)
                self._step_bytes += size
                self._shape_bytes[shape] = self._shape_bytes.get(shape, 0) + size
            out.extend(got[0])
            parent, tail = got[1], got[2]
        return out

    def _parts(self, text: str) -> list[str]:
        """`text`'s parts up to its last piece never seen (the ones before it are tokenized
        now), the prompt queued for `learn` as `prefix_ids` does."""
        assert self.split is not None
        parts = self.split.split(text)
        pieces, special = self.pieces, self.special
        unknown = [
            i for i, part in enumerate(parts) if part and part not in special and part not in pieces
        ]
        for i in unknown[:-1]:
            self._add(parts[i])
        stop = unknown[-1] if unknown else len(parts)
        self.unseen_chars = sum(len(p) for p in parts[stop:] if p not in special)
        if (unknown or self.verify > 0) and len(self.queued) < 1024:
            self.queued.append(text)
        return parts[:stop]

    @property
    def verified(self) -> bool:
        """Its ids are checked equal to whole encodes (or it encodes whole)."""
        return self.split is None or self.verify <= 0

    def whole_ids(self, text: str) -> Sequence[int] | None:
        """All of `text`'s ids, its new pieces tokenized now, to be forwarded to a worker as
        its prompt: None until the first prompts have checked the pieces against whole
        encodes (ids good enough to route on may not be good enough to generate from)."""
        if self.split is None:
            return self.tokenizer.encode(text, add_special_tokens=False)
        if not self.verified:
            return None
        return self._join(text, learn=True)[0]  # packed for the wire as it is

    def _add(self, part: str) -> array[int]:
        got = self.pieces[part] = array(
            "I", self.tokenizer.hf.encode(part, add_special_tokens=False).ids
        )
        self.tokens += len(got)
        if self._learnt[0] < 1 << 40:
            self._learnt[0] += len(part)
            self._learnt[1] += len(got)
        return got

    def unseen_tokens(self) -> float:
        """About how many tokens the last prefix left out: its characters at this
        tokenizer's own characters per token so far (4 before any piece)."""
        chars, tokens = self._learnt
        return self.unseen_chars * (tokens / chars if chars >= 256 else 0.25)

    def _join(self, text: str, learn: bool = False) -> tuple[array[int], bool]:
        """Ids of the known leading pieces, and whether that is the whole text (with
        `learn`, pieces not known yet are tokenized, so it always is)."""
        assert self.split is not None
        ids = array("I")
        pieces, special = self.pieces, self.special
        for part in self.split.split(text):
            if not part:
                continue
            sid = special.get(part)
            if sid is not None:
                ids.append(sid)
                continue
            got = pieces.get(part)
            if got is None:
                if not learn:
                    return ids, False
                got = self._add(part)
            else:
                pieces.move_to_end(part)
            ids.extend(got)
        return ids, True

    def learn(self) -> None:
        """Tokenize the queued prompts' unknown pieces; check the first ones whole."""
        queued, self.queued = self.queued, []
        pieces = self.pieces
        for text in queued:
            if self.split is None:
                return
            for part in self.split.split(text):
                if part and part not in self.special and part not in pieces:
                    self._add(part)
            while self.tokens > self.max_tokens and len(pieces) > 1:
                self.tokens -= len(pieces.popitem(last=False)[1])
            if self.verify > 0:
                self.verify -= 1
                ids, whole = self._join(text)
                expected = self.tokenizer.encode(text, add_special_tokens=False)
                if not whole or ids.tolist() != expected:
                    log.warning("piecewise tokenization differs for this tokenizer: encoding whole")
                    self.split = None


@dataclass(slots=True)
class PromptTokens:
    """A prompt's token ids as routing computed them: all of them, or where they came from
    pieces (`rendered` set), possibly only up to the chat's last new piece, which
    `PieceCache.whole_ids(rendered)` adds."""

    ids: Sequence[int]
    """Empty where the block keys were walked piece by piece (`prompt_keys`): `rendered`
    is set then, and `PieceCache.whole_ids(rendered)` gives them."""
    rendered: str | None = None
    """The rendered chat, where the ids came from pieces."""


def prompt_tokens(
    request: pb.GenerateRequest, tokenizer: Tokenizer | None, pieces: PieceCache | None = None
) -> PromptTokens:
    """The prompt's token ids exactly as the worker's engine will compute them (a tokenizer
    is needed unless the prompt is token ids already)."""
    which = request.WhichOneof("prompt")
    if which == "token_ids":
        return PromptTokens(list(request.token_ids.ids))
    if tokenizer is None:
        raise ValueError("a text prompt needs the model's tokenizer")
    if which == "chat":
        if pieces is None:
            chat = request.chat
            return PromptTokens(
                tokenizer.prompt_ids(None, _messages(request), chat.add_generation_prompt)
            )
        text = _rendered(request, tokenizer)
        return PromptTokens(pieces.prefix_ids(text), text)
    return PromptTokens(tokenizer.prompt_ids(request.text))


def _messages(request: pb.GenerateRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in request.chat.messages]


def _rendered(request: pb.GenerateRequest, tokenizer: Tokenizer) -> str:
    """A chat request rendered by the model's chat template."""
    return tokenizer.apply_chat_template(_messages(request), request.chat.add_generation_prompt)


def prompt_token_ids(
    request: pb.GenerateRequest, tokenizer: Tokenizer | None, pieces: PieceCache | None = None
) -> Sequence[int]:
    return prompt_tokens(request, tokenizer, pieces).ids


class ChainMemo:
    """Block keys of token ids, each block's remembered by (its parent's key, its tokens).

    Equal to `prompts.block_keys` (sha256(parent + tokens as int64 + extra key), first 8
    bytes), but a conversation's next turn, or another user's request with the same
    system prompt, finds its leading blocks in a dict instead of hashing them again.
    Looked up by the parent's 8-byte key and the block's tokens as uint32 bytes; measured
    on a 108-block prompt already seen (timeit): 50 us, against ~100 us keyed by the
    parent's whole digest and int64 tokens (49 us of that was `array("q", ids)` alone, 14
    for "I"). Kept flat, of bytes and ints, which the garbage collector does not track: a
    trie of dict nodes was as fast but made a full collection take 80 ms at 400k blocks,
    a stall of the event loop. A block's whole digest, needed only to hash the next block
    on a miss, is kept beside. Bounded: cleared past `max_entries`, and tables for at most
    MAX_SHAPES extra keys (a new one drops the smallest: salts are chosen by clients).

    The walk goes a span of 64 blocks at a time while such spans are known, then of 8, then
    block by block: a system prompt's ~100 blocks cost ~10 look-ups (timeit, the 108-block
    prompt above: 42 us block by block, 13 us by spans of 8; a 101-block prompt, 22 -> 18
    us with spans of 64 too, in one run). Spans of each length are bounded apart, at
    `max_entries` blocks' worth: ~35 MB of spans of 8 (0.7 KB each) and ~30 MB of spans of 64
    (4.7 KB each; prompts that share less than 64 blocks each add one), at 16-token blocks.
    """

    SPANS = (64, 8)
    """Span lengths in blocks, longest first; each divides the one before, so a walk
    stopped at a longer span's boundary goes on at a shorter one's."""

    def __init__(self, max_entries: int = 400_000) -> None:
        self.max_entries = max_entries
        self._keys: dict[bytes, dict[bytes, int]] = {}
        self._digests: dict[bytes, dict[int, bytes]] = {}
        self._spans: dict[bytes, list[dict[bytes, array[int]]]] = {}
        """Per extra key, per span length (SPANS): (parent's key + a span's tokens) -> the
        span's keys (uint64)."""

    def keys(self, ids: Sequence[int], block_size: int, extra_key: bytes) -> list[int]:
        try:
            if not (isinstance(ids, array) and ids.typecode == "I"):
                ids = array("I", ids)
        except OverflowError:  # not token ids a tokenizer makes: hash them, keep nothing
            return [block_key(h) for h in block_hashes(ids, block_size, extra_key)]
        memo, digests, spans = self._tables(extra_key)
        step = block_size * 4
        spans_bytes = [step * n for n in self.SPANS]
        data = ids.tobytes()
        whole = len(data) - len(data) % step
        out: list[int] = []
        parent = b"\x00" * 8  # the last key walked, as bytes
        start = 0
        reached = []  # blocks walked at each span length, longest first
        for span, kept in zip(spans_bytes, spans, strict=True):
            while start + span <= whole:
                got = kept.get(parent + data[start : start + span])
                if got is None:
                    break
                out.extend(got)
                parent = got[-1].to_bytes(8, "big")
                start += span
            reached.append(len(out))
        rest = _chain(memo, digests, out[-1] if out else None, data[start:whole], step, extra_key)
        assert rest is not None  # the spans' digests are kept with them
        out.extend(rest)
        # Whole spans of each length not walked at that length are remembered.
        for n, known, kept in zip(self.SPANS, reached, spans, strict=True):
            for i in range(known, len(out) - n + 1, n):
                head = out[i - 1].to_bytes(8, "big") if i else b"\x00" * 8
                kept[head + data[i * step : (i + n) * step]] = array("Q", out[i : i + n])
        return out

    def _tables(
        self, extra_key: bytes
    ) -> tuple[dict[bytes, int], dict[int, bytes], list[dict[bytes, array[int]]]]:
        """The extra key's block memo, digests and spans, cleared first when past bounds."""
        memo = self._keys.get(extra_key)
        if memo is None and len(self._keys) >= MAX_SHAPES:
            smallest = min(self._keys, key=lambda k: len(self._keys[k]))
            for table in (self._keys, self._digests, self._spans):
                del table[smallest]
        spans = self._spans.get(extra_key)
        too_many_spans = spans is not None and any(
            len(kept) > self.max_entries // n for kept, n in zip(spans, self.SPANS, strict=True)
        )
        if memo is None or len(memo) > self.max_entries or too_many_spans:
            # The spans go with the digests: walking on from a span's last key needs its.
            memo = self._keys[extra_key] = {}
            self._digests[extra_key] = {}
            self._spans[extra_key] = [{} for _ in self.SPANS]
        return memo, self._digests[extra_key], self._spans[extra_key]

    def extend(
        self, parent: int | None, data: bytes, block_size: int, extra_key: bytes
    ) -> list[int] | None:
        """Keys of the whole blocks of `data` (uint32 token ids) chained on from the block
        keyed `parent` (None: from the prompt's start); None if that block's digest is no
        longer remembered (the memo was cleared since)."""
        memo, digests, _ = self._tables(extra_key)
        return _chain(memo, digests, parent, data, block_size * 4, extra_key)


def _chain(
    memo: dict[bytes, int],
    digests: dict[int, bytes],
    parent: int | None,
    data: bytes,
    step: int,
    extra_key: bytes,
) -> list[int] | None:
    """Keys of `data`'s whole blocks (`step` bytes each) chained on from `parent`, looked
    up block by block in `memo` or hashed and remembered; None if a block must be hashed
    and `parent`'s digest is gone."""
    head = parent.to_bytes(8, "big") if parent is not None else b"\x00" * 8
    out: list[int] = []
    append, get = out.append, memo.get
    for end in range(step, len(data) - len(data) % step + 1, step):
        link = head + data[end - step : end]
        key = get(link)
        if key is None:
            prev = digests.get(parent) if parent is not None else b"\x00" * 32
            if prev is None:
                return None
            tokens = array("q", array("I", data[end - step : end])).tobytes()
            digest = hashlib.sha256(prev + tokens + extra_key).digest()
            key = memo[link] = int.from_bytes(digest[:8], "big")
            digests[key] = digest
        append(key)
        parent, head = key, key.to_bytes(8, "big")
    return out


_DEFAULT_MEMO = ChainMemo()


def token_block_keys(
    request: pb.GenerateRequest,
    tokenizer: Tokenizer | None,
    block_size: int,
    model_id: str,
    pieces: PieceCache | None = None,
    memo: ChainMemo = _DEFAULT_MEMO,
) -> list[int]:
    ids = prompt_token_ids(request, tokenizer, pieces)
    return memo.keys(ids, block_size, salted(model_id.encode(), request.cache_salt))


def chain_keys(
    ids: Sequence[int], block_size: int, model_id: str, memo: ChainMemo = _DEFAULT_MEMO
) -> list[int]:
    """Token ids' block keys, as the engine with this block size and model id hashes them."""
    return memo.keys(ids, block_size, model_id.encode())


def prompt_keys(
    request: pb.GenerateRequest,
    tokenizer: Tokenizer | None,
    pieces: PieceCache | None,
    block_size: int,
    model_id: str,
    memo: ChainMemo = _DEFAULT_MEMO,
) -> tuple[PromptTokens, list[int]]:
    """The prompt's tokens and the engine's block keys for them (see `prompt_tokens`); a
    chat's keys walked piece by piece where the tokenizer splits into pieces. A salted
    request's blocks are keyed as the engine keys them (prompts.block_keys.salted)."""
    extra_key = salted(model_id.encode(), request.cache_salt)
    if (
        pieces is not None
        and pieces.split is not None
        and tokenizer is not None
        and request.WhichOneof("prompt") == "chat"
    ):
        text = _rendered(request, tokenizer)
        return PromptTokens((), text), pieces.prefix_keys(text, block_size, extra_key, memo)
    tokens = prompt_tokens(request, tokenizer, pieces)
    return tokens, memo.keys(tokens.ids, block_size, extra_key)
