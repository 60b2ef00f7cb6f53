"""A seeded multi-turn chat workload and the prefix-cache hit rate an ideal replica would get.

Users each hold one of a few dozen shared system prompts and talk for several turns; turn k
sends the whole chat so far (system, earlier user messages and replies, the new message),
as chat clients do. So a turn's prompt is a prefix of the next turn's, and users of one
system prompt share its blocks: what a KV prefix cache, and routing that respects it, gain.

The assistant replies replayed in the history are fixed strings of the workload, not the
text the worker streamed: the workload then does not depend on the run (every policy gets
the same prompts, and the oracle over prompts is an exact upper bound). The previous turn's
prompt is still a prefix of the next one, so its blocks hit all the same; what is given up
is the few blocks of generated tokens the worker also caches, which a verbatim replay could
hit only if re-tokenising the reply gave the same ids.

Token counts come from the tokenizer and chat template the sim worker itself uses, so the
oracle counts what the workers' counters count.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prompts.block_keys import hash_block
from prompts.tokenizer import Tokenizer

BLOCK_SIZE = 16
"""The sim worker's KV block size (EngineConfig.block_size default)."""

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "order ticket refund policy account billing shipping invoice customer support answer "
    "please always never brief polite formal tone markdown table summary example careful"
).split()


Messages = list[dict[str, str]]


@dataclass(frozen=True)
class User:
    """One conversation: which system prompt, the user's messages and the fixed replies."""

    uid: int
    system: int
    questions: tuple[str, ...]
    replies: tuple[str, ...]

    @property
    def turns(self) -> int:
        return len(self.questions)


class ChatWorkload:
    """Deterministic in `seed`: user u is the same whatever else is drawn, so runs of
    different lengths share their first users and every policy sees the same chats."""

    def __init__(
        self,
        seed: int = 0,
        system_prompts: int = 24,
        system_tokens: tuple[int, int] = (300, 600),
        turns: tuple[int, int] = (3, 6),
        question_words: tuple[int, int] = (10, 30),
        reply_words: tuple[int, int] = (8, 14),
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.seed = seed
        self.turn_range = turns
        self.question_words = question_words
        self.reply_words = reply_words
        self.tokenizer = tokenizer or sim_tokenizer()
        self._users: dict[int, User] = {}
        self.system_prompts = [
            self._system_prompt(i, random.Random(f"{seed}-system-{i}").randint(*system_tokens))
            for i in range(system_prompts)
        ]

    def _system_prompt(self, i: int, tokens: int) -> str:
        """About `tokens` tokens of text (the shortest word prefix reaching it)."""
        rng = random.Random(f"{self.seed}-system-text-{i}")
        head = f"You are assistant {i} of the help desk. Follow these rules."
        words = [rng.choice(_WORDS) for _ in range(tokens)]  # >= 1 token each: enough

        def text(n: int) -> str:
            return " ".join([head, *words[:n]])

        n = bisect.bisect_left(range(len(words) + 1), tokens, key=lambda k: self.count(text(k)))
        return text(min(n, len(words)))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def user(self, uid: int) -> User:
        if uid in self._users:
            return self._users[uid]
        rng = random.Random(f"{self.seed}-user-{uid}")
        system = rng.randrange(len(self.system_prompts))
        turns = rng.randint(*self.turn_range)

        def text(prefix: str, n: tuple[int, int]) -> str:
            return prefix + " " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*n)))

        questions = tuple(
            text(f"User {uid} asks, turn {k}:", self.question_words) for k in range(turns)
        )
        replies = tuple(text(f"Reply {k}:", self.reply_words) for k in range(turns))
        self._users[uid] = user = User(uid, system, questions, replies)
        return user

    def think_s(self, uid: int, turn: int, mean_s: float) -> float:
        """Seeded think time before the next turn: 0.5-1.5x the mean."""
        return mean_s * random.Random(f"{self.seed}-think-{uid}-{turn}").uniform(0.5, 1.5)

    def messages(self, uid: int, turn: int, salt: str = "") -> Messages:
        """The request of `turn` (0-based): the chat so far and the new user message. `salt`
        starts the system prompt, so a run can keep to itself on workers an earlier run used
        (its blocks can never match the earlier run's)."""
        u = self.user(uid)
        system = (f"[{salt}] " if salt else "") + self.system_prompts[u.system]
        msgs = [{"role": "system", "content": system}]
        for k in range(turn):
            msgs.append({"role": "user", "content": u.questions[k]})
            msgs.append({"role": "assistant", "content": u.replies[k]})
        msgs.append({"role": "user", "content": u.questions[turn]})
        return msgs

    def prompt_ids(self, messages: Messages) -> list[int]:
        """Token ids exactly as the worker builds them (engine_core.prepare)."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def system_span(self, messages: Messages) -> int:
        """Tokens of the request's prompt that are its system message (template included)."""
        text = self.tokenizer.apply_chat_template(messages[:1], add_generation_prompt=False)
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def system_prompt_tokens(self) -> list[int]:
        return [self.count(s) for s in self.system_prompts]


@functools.cache
def sim_tokenizer() -> Tokenizer:
    """The tokenizer of a sim worker started without --model, found the way the worker finds
    it: the engine's default checkpoint (worker.settings), as the sim executor loads it."""
    import argparse

    from worker.backends.sim import SimExecutor
    from worker.settings import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return SimExecutor(engine_config_from_args(parser.parse_args([]))).tokenizer


@dataclass(frozen=True)
class OracleResult:
    per_request: tuple[int, ...]
    """Hit tokens of each prompt, in the order given."""
    prompt_tokens: int

    @property
    def hit_tokens(self) -> int:
        return sum(self.per_request)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def oracle_hits(prompts: Iterable[Sequence[int]], block_size: int = BLOCK_SIZE) -> OracleResult:
    """Prefix-cache hits of one replica with an infinite cache, prompts taken in order.

    Same rules as the worker's KVCacheManager: hits are whole blocks of a chained block hash,
    at most (n - 1) // block_size of them (one token is always computed), and a request's
    full prompt blocks are cached once it ran.
    """
    cache: set[bytes] = set()
    hits: list[int] = []
    total = 0
    for ids in prompts:
        hashes: list[bytes] = []
        parent: bytes | None = None
        for i in range(len(ids) // block_size):
            parent = hash_block(parent, ids[i * block_size : (i + 1) * block_size], b"")
            hashes.append(parent)
        n = 0
        for h in hashes[: (len(ids) - 1) // block_size]:
            if h not in cache:
                break
            n += 1
        hits.append(n * block_size)
        total += len(ids)
        cache.update(hashes)
    return OracleResult(tuple(hits), total)
