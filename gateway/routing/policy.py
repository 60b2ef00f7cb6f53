"""Routing policies behind one interface: round-robin, least-outstanding, prefix-aware.

`Router` puts them together as a gateway runs them: a policy per model (a default and
overrides), and optional sticky sessions in front.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Protocol

from gateway.registry.base import WorkerInfo
from gateway.routing.cache_views import CacheView
from gateway.routing.prefix_index import BLOCK_BYTES, PrefixIndex, block_keys, prompt_bytes
from gateway.routing.token_keys import (
    PieceCache,
    PromptTokens,
    TokenizerStore,
    prompt_keys,
)
from prompts.block_keys import salted
from proto import inference_pb2 as pb
from proto.prompt_ids import prompt_ids_bytes

if TYPE_CHECKING:
    from prompts.tokenizer import Tokenizer

DECISIONS = {
    "held": "to a replica that holds the most of the prompt (of those within the load bound)",
    "new_prefix": "no replica holds min_share of the prompt: to the one with the most room",
    "queued_prefill": "past a replica that holds more, whose queued prefill costs more",
    "load_bound": "past a replica that holds more but is over the load bound",
    "only": "one replica could take it",
}
"""Why prefix-aware chose a replica: PrefixAware.decisions counts each reason."""
FOOTPRINT_HALF_LIFE_S = 60.0
"""How fast what a replica was sent stops counting against its cache room: its LRU turns
over in about (KV tokens) / (uncached tokens sent per second), 30 s in routing_bench's
fleet and longer on real GPUs."""
MAX_FOOTPRINTS = 4096
"""Replicas whose new content is kept (what other processes tell is bounded too)."""
TEXT_BLOCK_TOKENS = BLOCK_BYTES // 4
"""Tokens in a text block, about (English averages ~4 bytes a token)."""


class RoutingPolicy(Protocol):
    name: str

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, float],
    ) -> WorkerInfo:
        """Pick one of a non-empty list of ready workers."""
        ...

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> float:
        """The request was sent to `worker` (called once per attempt, after `choose`).

        Returns the prompt tokens the policy expects the replica to prefill for it (0 where
        it does not track them), to be handed back to `prefilled` once that is done.
        """
        ...

    def prefilled(self, worker_id: str, tokens: float) -> None:
        """The replica's first output for a routed request came, or the attempt ended."""
        ...


class WeightedLoads(Mapping[str, float]):
    """Calls in flight per replica divided by its operator-set weight, so every policy that
    balances load gives a weight-2 replica twice the traffic of a weight-1 one."""

    __slots__ = ("outstanding", "weights")

    def __init__(self, outstanding: Mapping[str, float], weights: Mapping[str, float]) -> None:
        self.outstanding = outstanding
        self.weights = weights
        """worker id -> weight > 0 (absent: 1)."""

    def __getitem__(self, worker_id: str) -> float:
        return self.outstanding.get(worker_id, 0) / self.weights.get(worker_id, 1.0)

    def get(self, worker_id: str, default: float = 0) -> float:  # type: ignore[override]
        return self[worker_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outstanding)

    def __len__(self) -> int:
        return len(self.outstanding)


class CombinedLoads(Mapping[str, float]):
    """This process's calls in flight per replica plus those the fleet's other gateway
    processes last reported (decision_share.RemoteLoads), so a load bound holds for the
    whole fleet's calls, not one process's share of them."""

    __slots__ = ("others", "own")

    def __init__(self, own: Mapping[str, float], others: Mapping[str, float]) -> None:
        self.own = own
        self.others = others

    def __getitem__(self, worker_id: str) -> float:
        return self.own.get(worker_id, 0) + self.others.get(worker_id, 0)

    def get(self, worker_id: str, default: float = 0) -> float:  # type: ignore[override]
        return self[worker_id]

    def __iter__(self) -> Iterator[str]:
        return iter({*self.own, *self.others})

    def __len__(self) -> int:
        return len({*self.own, *self.others})


MAX_POOLS = 1024
"""Candidate sets whose turn a policy keeps (a fleet has a few: one per model, and those
left after a retry or a health change); past it, turns start over."""


class RoundRobin:
    """In turn, each candidate set on its own; with weights (see WeightedLoads), nginx's
    smooth weighted round-robin, which interleaves (a, a, b -> a b a) where plain
    weighting would send bursts.

    One turn for all sets starved a replica: with a shadow taking every third turn on a
    pool of three, one index never came up (5 of 176 requests)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turns: dict[tuple[str, ...], int] = {}
        self._current: dict[tuple[str, ...], dict[str, float]] = {}

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, float],
    ) -> WorkerInfo:
        ordered = sorted(candidates, key=lambda w: w.worker_id)
        pool = tuple(w.worker_id for w in ordered)
        if isinstance(outstanding, WeightedLoads):
            weights = outstanding.weights
            current = self._current.get(pool)
            if current is None:
                if len(self._current) >= MAX_POOLS:
                    self._current.clear()
                current = self._current[pool] = {}
            total = 0.0
            for w in ordered:
                weight = weights.get(w.worker_id, 1.0)
                current[w.worker_id] = current.get(w.worker_id, 0.0) + weight
                total += weight
            best = max(ordered, key=lambda w: (current[w.worker_id], w.worker_id))
            current[best.worker_id] -= total
            return best
        turn = self._turns.get(pool, 0)
        if turn == 0 and len(self._turns) >= MAX_POOLS:
            self._turns.clear()
        self._turns[pool] = turn + 1
        return ordered[turn % len(ordered)]

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> float:
        return 0.0

    def prefilled(self, worker_id: str, tokens: float) -> None:
        pass


class LeastOutstanding:
    """Fewest requests in flight from this gateway (per unit of weight), then the worker's
    own reported queue; ties in turn (round-robin's, weighted), so idle replicas share a
    light load by their weights. A tie-break on hashed ids gave one replica long runs
    (one of three got ~100 of 106 requests at one in flight, weights aside)."""

    name = "least-outstanding"

    def __init__(self) -> None:
        self._ties = RoundRobin()

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, float],
    ) -> WorkerInfo:
        keys = [
            (outstanding.get(w.worker_id, 0), w.stats.get("queue_depth", 0)) for w in candidates
        ]
        least = min(keys)
        ties = [w for w, k in zip(candidates, keys, strict=True) if k == least]
        if len(ties) == 1:
            return ties[0]
        return self._ties.choose(ties, request, outstanding)

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> float:
        return 0.0

    def prefilled(self, worker_id: str, tokens: float) -> None:
        pass


class PrefixAware:
    """The replica that will give the prompt its first token soonest, within a load bound.

    Among replicas whose load is within `rel` x the least loaded + `abs` requests, the one
    with the fewest prompt tokens to prefill before this request's first token wins: the
    part of the prompt it lacks, plus the prompts already sent to it and not yet prefilled
    (`prefilling`, handed back at each attempt's first output or end), the least loaded
    breaking ties. With nothing queued this is "the most of the prompt held" (as SGLang's
    and llm-d's prefix scorers); the queue term is Dynamo's KV router's (overlap weight x
    new prefill blocks + active blocks), in tokens. A missed token weighs `miss_weight`
    (it is prefilled now, its step delays the replica's whole batch, and a second copy
    takes cache room). routing_bench, one run each (hit rate, TTFT p50 / p99 ms, load
    imbalance), before placement by room (below): no queue term 0.824, 175 / 625, 1.19;
    weight 1: 0.816, 166 / 381, 1.10; 1.5: 0.828, 170 / 366, 1.12; 2: 0.832, 166 / 390,
    1.30 (past the 1.25 held to). With it: 2: 0.828, 171 / 393, 1.22; 3: 0.829, 170 / 381,
    1.31. A weighted sum
    (llm-d's prefix 3, queue 2, KV usage 2, used here before) moved 4-6% of a chat's
    follow-up turns and spread a system prompt over 1.2-1.65 replicas in peer_bench's chat
    run, where SGLang's and vLLM's cache-aware routers moved none: a holder busy with the
    conversations it keeps scored below an idle replica that holds nothing. SGLang's
    router switches to least-loaded only once the pool is already imbalanced (defaults
    abs 64, rel 1.5), and its users report collapse onto one worker under a popular prefix
    before that trips; bounding every decision keeps a hot prefix from piling up at all.
    The bound's default, + 8 calls, was measured (routing_bench, 4 sim workers, this
    scoring): + 4 gave hit rate 0.96x the oracle's and load imbalance 1.15; + 8, 0.98x and
    1.21; + 16, 0.99x but 1.36, over the 1.25 this project holds to.
    A request no replica holds `min_share` of (SGLang's cache threshold, 0.3: a chat
    template's head, common to every prompt, is no reason to go anywhere) goes where the
    least new content went lately (`footprint`: uncached prompt tokens sent there,
    half-life 60 s), the replica whose cache has the most room, as SGLang's router picks
    its smallest tree; queued prefill and load break the ties left. Conversations stay
    where their system prompt landed, so where prefixes land decides whose cache
    overflows: placed by load alone, one replica got more system prompts than it could
    hold with its conversations, and their histories were evicted. peer_bench's chat
    workload (`--targets breakwater --rate 8.68 --duration 60`, one machine), hit rate by
    run: by load, weight 1.5: 0.8239, 0.8286 (one with 0.0036 of prompt tokens missed in
    histories); weight 3: 0.8105 (0.0149). By room: 1.5: 0.8252, 0.8251, 0.8239; 2:
    0.8286, 0.8285, 0.8290; 3: 0.8310, 0.8284, 0.8293, 0.8276, but load imbalance 1.31 in
    routing_bench. With the 0.3 threshold and weight 2: 0.8296, 0.8284. Then six runs
    each, alternating with the policy before (by load, 1.5), on one machine: by room
    0.8279-0.8305 (mean 0.8295), load imbalance 1.03-1.07; by load 0.8045-0.8293 (mean
    0.8228), 1.10-1.28; TTFT p50 166 ms both. With the capacity probe first (caches full),
    six runs each alternating, weight 3 against 2: 0.8141-0.8282 (mean 0.8242, 0.27% of
    follow-up turns moved, imbalance 1.08-1.17) against 0.7946-0.8236 (mean 0.8139, 0.99%
    moved, 1.07-1.28); routing_bench at 3: 0.98x oracle, TTFT p50 2.01x round-robin's,
    imbalance 1.07.

    Two sources say what a replica holds. Where the replica reports its cache (`views`,
    from WatchCache) and the model's tokenizer is at hand, the prompt is cut into the
    engine's own token blocks and matched against what the replica holds now, evictions
    included, plus what was sent to it in the last `recent_s` (not cached yet while it
    prefills). Elsewhere (OpenAI upstreams) the index learnt from the routing decisions
    themselves stands in, with text blocks and LRU ageing.
    """

    name = "prefix-aware"

    def __init__(
        self,
        index: PrefixIndex | None = None,
        rel: float = 1.5,
        abs_: float = 8.0,
        recent_s: float = 10.0,
        miss_weight: float = 3.0,
        min_share: float = 0.3,
    ) -> None:
        self.index = index or PrefixIndex()
        self.miss_weight = miss_weight
        self.min_share = min_share
        """A prompt no replica holds this share of is placed as one nobody holds."""
        self.rel = rel
        self.abs = abs_
        self.recent_s = recent_s
        self.views: Mapping[str, CacheView] = {}
        """Replicas' reported caches by worker id (see cache_views.CacheWatcher)."""
        self.tokenizers: TokenizerStore | None = None
        self._memo: tuple[pb.GenerateRequest | None, list[int]] = (None, [])
        self._token_memo: tuple[pb.GenerateRequest | None, tuple[int, str], list[int] | None] = (
            None,
            (0, ""),
            None,
        )
        self._prompt: tuple[
            pb.GenerateRequest | None, PromptTokens | None, Tokenizer | None, PieceCache | None
        ] = (None, None, None, None)
        """The last decision's prompt tokens, for `prompt_ids`."""
        self._unseen = 0.0
        """About how many tokens `_token_memo`'s keys leave out (a chat's new last piece)."""
        self._tiebreak = itertools.count()
        self._last: tuple[pb.GenerateRequest | None, dict[str, float], float] = (None, {}, 0.0)
        self._reported_run: dict[str, int] = {}
        """Leading token blocks each replica reported holding, as the last decision found."""
        self.prefilling: Counter[str] = Counter()
        """Prompt tokens sent to each replica that it has not prefilled yet (estimated:
        the part of each prompt it did not hold), until the first output or the end."""
        self.stats: Counter[str] = Counter()
        """Prompt blocks routed, and how many of them the chosen replica held (hit rate)."""
        self.decisions: Counter[str] = Counter()
        """Decisions by why the replica was chosen (see DECISIONS): where prompts leave
        the replica that holds the most of them, and whether load or queued prefill made
        them."""
        self.share: Callable[[str, list[int]], None] | None = None
        """Tells sibling processes or other gateways of each decision (see decision_share)."""
        self.footprint: dict[str, tuple[float, float]] = {}
        """Uncached prompt tokens sent to each replica (new cache content), decayed with a
        half-life of FOOTPRINT_HALF_LIFE_S: (tokens, as of this monotonic time); other
        gateway processes' too, when they tell (learn_content)."""
        self._new_content: Counter[str] = Counter()
        """What this process added to `footprint` since the share last took it."""

    def _footprint(self, worker_id: str, now: float) -> float:
        tokens, at = self.footprint.get(worker_id, (0.0, now))
        return tokens * 0.5 ** ((now - at) / FOOTPRINT_HALF_LIFE_S)

    def _footprints(self, eligible: Sequence[WorkerInfo]) -> dict[str, float]:
        now = time.monotonic()
        return {w.worker_id: self._footprint(w.worker_id, now) for w in eligible}

    def _keys(self, request: pb.GenerateRequest) -> list[int]:
        """Block keys, computed once per request even when it is retried.

        Keyed by the object itself, held: an id() alone is reused by the next request
        allocated where a finished one was, which then got the finished one's keys.
        """
        if self._memo[0] is not request:
            # one model's cache is not another's, nor one salt's (a tenant's) another's
            seed = zlib.crc32(salted(request.model.encode(), request.cache_salt))
            self._memo = (request, block_keys(prompt_bytes(request), seed=seed))
        return self._memo[1]

    def _token_keys(self, request: pb.GenerateRequest, view: CacheView) -> list[int] | None:
        """The engine's block keys for this prompt, or None without a tokenizer."""
        shape = (view.block_size, view.model_id)
        memo = self._token_memo
        if memo[0] is request and memo[1] == shape:
            return memo[2]
        keys = None
        self._unseen = 0.0
        tok = self.tokenizers.get(request.model, view.tokenizer) if self.tokenizers else None
        if tok is not None or request.WhichOneof("prompt") == "token_ids":
            try:
                pieces = self.tokenizers.pieces(tok) if tok and self.tokenizers else None
                tokens, keys = prompt_keys(request, tok, pieces, view.block_size, view.model_id)
                if tokens.rendered is not None and pieces is not None:
                    self._unseen = pieces.unseen_tokens()  # the new last piece, left out
                if tok is not None:
                    self._prompt = (request, tokens, tok, pieces)
                if pieces is not None and pieces.queued and self.tokenizers:
                    self.tokenizers.learn_later(pieces)
            except ValueError:  # a chat template refusing the messages: the worker will say
                keys = None
        self._token_memo = (request, shape, keys)
        return keys

    def prompt_ids(self, worker: WorkerInfo, request: pb.GenerateRequest) -> pb.PromptIds | None:
        """The prompt's token ids for `worker` to take instead of tokenizing it again, when
        this decision tokenized it with the tokenizer the worker reports (its fingerprint).

        Costs the tokenizing the decision put off (the chat's new last piece, which `learn`
        would do after it anyway) and an 8 KB copy for a 2k-token prompt; saves the worker
        rendering and tokenizing the whole prompt (~850 us for a 3 KB chat here).
        """
        req, tokens, tok, pieces = self._prompt
        if req is not request or tokens is None or tok is None:
            return None
        view = self.views.get(worker.worker_id)
        if view is None or not view.fingerprint or view.fingerprint != tok.fingerprint:
            return None
        if request.WhichOneof("prompt") == "token_ids":
            return None
        if tokens.rendered is not None and pieces is not None:
            # Ids joined from pieces are made again from them here, complete and only once
            # the pieces are checked: a check that failed since the decision (the pieces
            # then give way to whole encodes) must not let its ids through on a retry.
            ids = pieces.whole_ids(tokens.rendered)
            if ids is None:
                return None
            tokens = PromptTokens(ids)
            self._prompt = (request, tokens, tok, pieces)  # a retry forwards the same
        return pb.PromptIds(ids=prompt_ids_bytes(tokens.ids), tokenizer=tok.fingerprint)

    def _holdings(
        self, request: pb.GenerateRequest, eligible: Sequence[WorkerInfo]
    ) -> dict[str, float]:
        """The share of the prompt's blocks each eligible replica holds (0..1)."""
        views = self.views
        reported = [w.worker_id for w in eligible if w.worker_id in views]
        guessed = {w.worker_id for w in eligible if w.worker_id not in views}
        share: dict[str, float] = {}
        tkeys = self._token_keys(request, views[reported[0]]) if reported else None
        if tkeys is None:
            guessed.update(reported)
        elif tkeys:
            first = views[reported[0]]
            fresh_after = time.monotonic() - self.recent_s
            for wid in reported:
                view = views[wid]
                if (view.block_size, view.model_id) != (first.block_size, first.model_id):
                    guessed.add(wid)
                    continue
                share[wid] = self._leading(tkeys, wid, view, fresh_after) / len(tkeys)
            if not any(share.values()):
                # No replica reports a block of it, nor was sent it on token keys: the
                # text index may still know, from decisions made before the tokenizer was
                # loaded here or in a sibling process, while their caches' reports are on
                # the way (two processes split one conversation that way).
                guessed.update(reported)
        if guessed:
            keys = self._keys(request)
            if keys:
                for wid, n in self.index.match(keys, guessed).items():
                    share[wid] = n / len(keys)
        return share

    def _leading(self, keys: list[int], wid: str, view: CacheView, fresh_after: float) -> int:
        """Leading blocks the replica holds, or will once it prefills a request sent to it
        recently (unless it has reported evicting the block since). How many of them it
        reported holding is kept in `_reported_run`, for `routed`."""
        held, evicted, routed_at = view.held, view.evicted, self.index.routed_at
        run = 0
        for key in keys:
            if key not in held:
                break
            run += 1
        self._reported_run[wid] = run
        n = run
        for key in keys[run:]:
            if key not in held:
                sent = routed_at(key, wid)
                if sent <= fresh_after or sent <= evicted.get(key, 0.0):
                    break
            n += 1
        return n

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, float],
    ) -> WorkerInfo:
        self._reported_run.clear()  # a retry's routed() must not use an earlier attempt's
        if len(candidates) == 1:
            self.decisions["only"] += 1
            return candidates[0]
        # This gateway's own in-flight count: exact now, where the workers' reports are up to
        # a probe interval old (routing on those piled requests onto a worker that had
        # looked idle, and its batch overflowed: the overload scenario caught it).
        loads = {w.worker_id: outstanding.get(w.worker_id, 0) for w in candidates}
        bound = min(loads.values()) * self.rel + self.abs
        eligible = [w for w in candidates if loads[w.worker_id] <= bound]
        held = self._holdings(request, eligible)
        tokens = self._prompt_tokens(request)
        self._last = (request, held, tokens)
        weights = outstanding.weights if isinstance(outstanding, WeightedLoads) else None
        pick = self._pick(eligible, held, tokens, loads, weights)
        skipped = (  # over the load bound: rare, so the list is built only then
            [w.worker_id for w in candidates if loads[w.worker_id] > bound]
            if len(eligible) < len(candidates)
            else []
        )
        self._count(pick.worker_id, held, skipped, request)
        return pick

    def _count(
        self, wid: str, held: dict[str, float], skipped: list[str], request: pb.GenerateRequest
    ) -> None:
        """Count the decision by its reason (DECISIONS)."""
        best = max(held.values(), default=0.0)
        mine = held.get(wid, 0.0)
        if skipped:  # rare but for overload: only then are other replicas' shares needed
            theirs = max(self._known_share(request, w) for w in skipped)
            if theirs >= self.min_share and theirs > mine:
                self.decisions["load_bound"] += 1
                return
        if best < self.min_share:
            self.decisions["new_prefix"] += 1
        elif mine >= best:
            self.decisions["held"] += 1
        else:
            self.decisions["queued_prefill"] += 1

    def _known_share(self, request: pb.GenerateRequest, wid: str) -> float:
        """The share of the prompt a replica holds, from the keys this decision already
        computed (no tokenizing or hashing, and no memo changed: routed() uses them; the
        skipped replica's `_reported_run` is set, which routed() never reads for it)."""
        tmemo, memo, view = self._token_memo, self._memo, self.views.get(wid)
        tkeys = tmemo[2] if tmemo[0] is request else None
        if tkeys and view is not None and (view.block_size, view.model_id) == tmemo[1]:
            fresh_after = time.monotonic() - self.recent_s
            return self._leading(tkeys, wid, view, fresh_after) / len(tkeys)
        if memo[0] is request and memo[1]:
            return self.index.match(memo[1], {wid}).get(wid, 0) / len(memo[1])
        return 0.0

    def _pick(
        self,
        eligible: Sequence[WorkerInfo],
        held: dict[str, float],
        tokens: float,
        loads: dict[str, float],
        weights: Mapping[str, float] | None = None,
    ) -> WorkerInfo:
        turn = next(self._tiebreak)
        pending, miss = self.prefilling, self.miss_weight
        unit = max(16.0, tokens / 16)  # costs within 1/16 of the prompt count as equal
        whole = max(16.0, tokens)  # new content within one such prompt counts as equal
        room = self._footprints(eligible)
        if weights:
            # An operator's weight is a replica's capacity: a weight-2 replica takes twice
            # the new prefixes (its room counts double) and prefills twice as fast; its
            # load is already divided (WeightedLoads). Weighted loads alone changed nothing
            # while prefixes decided (weight 10: 0 requests of 60).
            pending = {w.worker_id: pending.get(w.worker_id, 0.0) for w in eligible}
            for wid in pending:
                share = weights.get(wid, 1.0)
                room[wid] /= share
                pending[wid] /= share
        if max(held.values(), default=0.0) < self.min_share:  # most room, least prefill
            return min(
                eligible,
                key=lambda w: (
                    round(room[w.worker_id] / whole),
                    round(pending.get(w.worker_id, 0.0) / unit),
                    loads[w.worker_id],
                    w.stats.get("queue_depth", 0),
                    (hash(w.worker_id) + turn) % 997,
                ),
            )

        def cost(w: WorkerInfo) -> tuple[int, int, float, int]:
            # Prompt tokens the replica must prefill before this request's first token:
            # what is already queued there, plus the part of this prompt it lacks.
            wid = w.worker_id
            c = pending.get(wid, 0.0) + (1.0 - held.get(wid, 0.0)) * tokens * miss
            return round(c / unit), round(room[wid] / whole), loads[wid], (hash(wid) + turn) % 997

        return min(eligible, key=cost)

    def _prompt_tokens(self, request: pb.GenerateRequest) -> float:
        """The prompt's length in tokens, from its block keys (token blocks where the
        replicas report their caches, else text blocks of about 16 tokens)."""
        memo = self._token_memo
        if memo[0] is request and memo[2] is not None:
            # Plus the chat's new last piece, tokenized only after the decision: without
            # it a one-message chat counted no tokens (no prefill, no new content), and
            # distinct chats went 19 to 1 to the replica the first one had not gone to.
            return float(len(memo[2]) * memo[1][0]) + self._unseen
        return float(len(self._keys(request)) * TEXT_BLOCK_TOKENS)

    def learn_content(self, worker_id: str, tokens: float) -> None:
        """Another process or gateway sent `worker_id` this many uncached prompt tokens."""
        if worker_id not in self.footprint and len(self.footprint) >= MAX_FOOTPRINTS:
            return  # ids from a message, not all of them ours to keep
        now = time.monotonic()
        self.footprint[worker_id] = (self._footprint(worker_id, now) + tokens, now)

    def take_content(self) -> dict[str, float]:
        """The new content this process sent each replica since the last call (for the
        share, which tells the others)."""
        taken = {w: round(t, 1) for w, t in self._new_content.items()}
        self._new_content.clear()
        return taken

    def learn(self, worker_id: str, keys: list[int]) -> None:
        """Another process or gateway sent a request with these block keys to `worker_id`."""
        self.index.insert(keys, worker_id)

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> float:
        memo = self._token_memo
        tkeys = memo[2] if memo[0] is request else None
        blocks = len(tkeys) if tkeys else len(self._keys(request))
        self.stats["routed"] += blocks
        prefill = 0.0
        if self._last[0] is request:
            share = self._last[1].get(worker.worker_id, 0.0)
            self.stats["held"] += round(share * blocks)
            prefill = (1.0 - share) * self._last[2]
            if prefill:
                self.prefilling[worker.worker_id] += prefill
                now = time.monotonic()
                sent = self._footprint(worker.worker_id, now) + prefill
                self.footprint[worker.worker_id] = (sent, now)
                if self.share is not None:
                    self._new_content[worker.worker_id] += prefill
        # Text keys only serve replicas scored from the index; where every replica
        # reported its cache for this request they would be unused work (~30 us).
        keys = [] if tkeys and worker.worker_id in self.views else self._keys(request)
        if tkeys:
            # Token keys serve only `_leading`, which asks when a block was sent only past
            # the replica's reported run: the run's blocks are left out (a follow-up turn
            # sends a dozen keys where it sent a hundred, to the index and to the siblings;
            # a block evicted since is evicted after its sending either way).
            run = self._reported_run.get(worker.worker_id, 0) if self._last[0] is request else 0
            keys = keys + tkeys[run:]  # both kinds: the index keeps them apart by value
        if keys:
            self.index.insert(keys, worker.worker_id)
            if self.share is not None:
                self.share(worker.worker_id, keys)
        return prefill

    def prefilled(self, worker_id: str, tokens: float) -> None:
        left = self.prefilling[worker_id] - tokens
        if left > 0.5:
            self.prefilling[worker_id] = left
        else:
            self.prefilling.pop(worker_id, None)


POLICIES: dict[str, type[RoutingPolicy]] = {
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "prefix-aware": PrefixAware,
}


def make_policy(name: str, **options: float) -> RoutingPolicy:
    """A policy by name; `options` tune prefix-aware (rel, abs_, miss_weight, min_share)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose from {sorted(POLICIES)}"
        ) from None
    return cls(**options) if cls is PrefixAware else cls()


def sticky_choice(
    key: str,
    candidates: Sequence[WorkerInfo],
    outstanding: Mapping[str, float],
    rel: float = 1.5,
    abs_: float = 8.0,
) -> WorkerInfo:
    """The replica a session key belongs to: rendezvous hashing with a load bound.

    Every gateway (and process) computes the same owner from the key alone, so stickiness
    needs no shared table, and a replica that leaves moves only its own sessions. The owner
    is skipped while it is busier than `rel` x the least loaded + `abs_` (as prefix-aware
    bounds its choice), so one heavy session cannot pile onto one replica; the session
    moves back once the owner has room.
    """
    loads = [outstanding.get(w.worker_id, 0) for w in candidates]
    bound = min(loads) * rel + abs_
    kb = key.encode()
    # blake2b, not CRC-32: CRC is linear, so its rank of replicas barely depends on the key
    # (measured: 80/70/30/20 sessions of 200 over 4 replicas); ~1 us per candidate.
    ranked = sorted(
        zip(candidates, loads, strict=True),
        key=lambda wl: blake2b(kb + b"\x00" + wl[0].worker_id.encode(), digest_size=8).digest(),
        reverse=True,
    )
    return next(w for w, load in ranked if load <= bound)


class Router:
    """The gateway's routing: a policy per model, and sticky sessions in front when asked.

    Policies are shared between the models that name the same one (one prefix index for
    all models; its keys are seeded with the model, so they never mix).
    """

    def __init__(
        self,
        default: str = "prefix-aware",
        per_model: Mapping[str, str] | None = None,
        sticky: bool = False,
        balance_rel: float = 1.5,
        balance_abs: float = 8.0,
        cache_threshold: float = 0.3,
        miss_weight: float = 3.0,
    ) -> None:
        names = {default, *(per_model or {}).values()}
        tuning = {
            "rel": balance_rel,
            "abs_": balance_abs,
            "min_share": cache_threshold,
            "miss_weight": miss_weight,
        }
        self.policies: dict[str, RoutingPolicy] = {
            n: make_policy(n, **tuning) for n in sorted(names)
        }
        self.default = self.policies[default]
        self.per_model = {m: self.policies[n] for m, n in (per_model or {}).items()}
        self.sticky = sticky
        self.balance_rel = balance_rel
        self.balance_abs = balance_abs
        self.name = default

    def policy_for(self, model: str) -> RoutingPolicy:
        return self.per_model.get(model, self.default)

    def prefix_aware(self) -> PrefixAware | None:
        p = self.policies.get(PrefixAware.name)
        return p if isinstance(p, PrefixAware) else None

    def choose(
        self,
        candidates: Sequence[WorkerInfo],
        request: pb.GenerateRequest,
        outstanding: Mapping[str, float],
    ) -> WorkerInfo:
        if self.sticky and request.session_key and len(candidates) > 1:
            return sticky_choice(
                request.session_key, candidates, outstanding, self.balance_rel, self.balance_abs
            )
        return self.policy_for(request.model).choose(candidates, request, outstanding)

    def routed(self, worker: WorkerInfo, request: pb.GenerateRequest) -> float:
        return self.policy_for(request.model).routed(worker, request)

    def prompt_ids(self, worker: WorkerInfo, request: pb.GenerateRequest) -> pb.PromptIds | None:
        """Token ids for `worker` to take as the prompt's (prefix-aware's; None elsewhere)."""
        policy = self.policy_for(request.model)
        return policy.prompt_ids(worker, request) if isinstance(policy, PrefixAware) else None

    def prefilled(self, worker_id: str, tokens: float) -> None:
        if tokens and (pa := self.prefix_aware()) is not None:
            pa.prefilled(worker_id, tokens)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "default": self.default.name,
            "per_model": {m: p.name for m, p in sorted(self.per_model.items())},
            "sticky_sessions": self.sticky,
        }
        pa = self.prefix_aware()
        if pa is not None:
            out["tokenizers"] = pa.tokenizers.loaded() if pa.tokenizers else []
            out["prefilling"] = {w: round(t) for w, t in sorted(pa.prefilling.items())}
            out["decisions"] = dict(sorted(pa.decisions.items()))
        return out
