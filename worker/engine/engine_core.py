"""The synchronous engine: admit requests, schedule a step, run it, process outputs.

Everything here runs on one thread (the async engine's step thread); it holds no locks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prompts.errors import PromptError
from worker.engine.config import EngineConfig
from worker.engine.errors import InvalidRequestError
from worker.engine.executor import Executor, TorchExecutor
from worker.engine.kv_cache_manager import KVCacheManager
from worker.engine.output_processor import OutputProcessor
from worker.engine.outputs import Delta, EngineStats, Usage
from worker.engine.request import GenerateRequest, Priority, Request
from worker.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class _Live:
    request: Request
    output: OutputProcessor


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.executor: Executor = executor if executor is not None else TorchExecutor(config)
        self.tokenizer = self.executor.tokenizer
        self.eos_token_ids = self.executor.eos_token_ids
        self.max_model_len = max_len = self.executor.max_model_len
        self.kv = KVCacheManager(
            self.executor.num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            extra_key=config.model_name.encode(),
        )
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_batched_tokens,
            config.max_num_seqs,
            max_len,
            config.long_prefill_token_threshold,
        )
        self.live: dict[str, _Live] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prompts_pretokenized = 0
        self.num_steps = 0
        self.kv_peak_slots = 0
        self.kv_peak_tokens = 0

    # -- admission ---------------------------------------------------------------------------

    def prepare(self, req: GenerateRequest) -> Request:
        """Validate and tokenise; raises InvalidRequestError with the offending field."""
        sp = req.sampling
        sp.validate()
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise InvalidRequestError(
                "give exactly one of prompt, prompt_token_ids or messages", "prompt"
            )
        vocab = self.executor.vocab_size
        if req.pretokenized is not None and req.prompt_token_ids is None:
            ids = req.pretokenized
            if ids and max(ids) >= vocab:  # not this model's tokenizer after all
                raise InvalidRequestError(
                    f"the router's prompt token ids must be integers in [0, {vocab})", "prompt"
                )
            self.prompts_pretokenized += 1
        elif req.messages is not None or req.prompt is not None:
            try:
                ids = self.tokenizer.prompt_ids(req.prompt, req.messages, req.add_generation_prompt)
            except PromptError as e:
                raise InvalidRequestError(e.message, e.param) from e
        else:
            ids = list(req.prompt_token_ids or [])
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
                raise InvalidRequestError(
                    f"prompt token ids must be integers in [0, {vocab})", "prompt"
                )
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {len(ids)} tokens, leaving no room for output",
                "prompt" if req.messages is None else "messages",
            )
        room = self.max_model_len - len(ids)
        if sp.max_tokens is not None and sp.max_tokens > room:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                f"has {len(ids)} tokens and max_tokens is {sp.max_tokens} "
                f"({len(ids) + sp.max_tokens} in all)",
                "max_tokens",
            )
        max_tokens = sp.max_tokens if sp.max_tokens is not None else room
        if not self.kv.can_ever_fit(len(ids) + max_tokens):
            raise InvalidRequestError(
                f"the request needs {len(ids) + max_tokens} tokens of KV cache, more than this "
                f"worker holds ({self.kv.num_usable_blocks * self.config.block_size})",
                # the prompt's fault where it alone cannot fit, else the output asked for
                "prompt" if not self.kv.can_ever_fit(len(ids) + 1) else "max_tokens",
            )
        return Request(
            req.request_id,
            ids,
            sp,
            Priority.parse(req.priority),
            max_tokens,
            self.eos_token_ids,
            req.cache_salt,
        )

    def add(self, request: Request) -> None:
        if request.request_id in self.live:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}", "request_id")
        self.live[request.request_id] = _Live(request, OutputProcessor(request, self.tokenizer))
        self.scheduler.add(request)
        self.prompt_tokens_total += request.num_prompt_tokens

    def abort(self, request_id: str, reason: str | None = None) -> Delta | None:
        live = self.live.pop(request_id, None)
        if live is None:
            return None
        self.scheduler.finish(live.request)
        self.executor.forget(request_id)
        return Delta(
            request_id,
            finish_reason="error" if reason else "abort",
            usage=self._usage(live.request),
            error=reason,
        )

    # -- stepping ----------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self, out: list[Delta] | None = None) -> list[Delta]:
        """Run one step, appending its deltas to `out` (made here if not given) and returning it.

        Deltas go into the caller's list as they are made, so those already made still reach
        their streams if the step later raises (a request that finished has left `live`, and
        the caller's abort-all would miss it). One request's failure while its output is
        processed (a detokenizer error, say) fails that request alone. If scheduling or the
        forward raises, the hashes registered for this step's blocks are taken back first:
        those blocks were never computed; the caller then aborts the live requests.
        """
        deltas: list[Delta] = [] if out is None else out
        try:
            batch = self.scheduler.schedule()
            for request, message in batch.failed:
                live = self.live.pop(request.request_id)
                self.executor.forget(request.request_id)  # its seeded generator, if any
                deltas.append(
                    Delta(
                        request.request_id,
                        finish_reason="error",
                        error=message,
                        usage=self._usage(live.request),
                    )
                )
            if not batch:
                self.kv.commit_cached_blocks()
                return deltas
            sampling_requests, result = self.executor.execute(batch, self.kv)
        except BaseException:
            self.kv.uncache_uncommitted_blocks()
            raise
        self.kv.commit_cached_blocks()
        self.scheduler.on_step_done(batch)
        self.num_steps += 1
        self._track_kv_peak()
        for request, token_id, logprob in zip(
            sampling_requests, result.token_ids, result.logprobs, strict=True
        ):
            try:
                request.append_output_token(token_id)
                self.generation_tokens_total += 1
                delta = self.live[request.request_id].output.process(token_id, logprob)
                if delta.finished:
                    del self.live[request.request_id]
                    self.scheduler.finish(request)
                    self.executor.forget(request.request_id)
                    delta.usage = self._usage(request)
            except Exception as e:
                delta = self._fail(request, e)
            deltas.append(delta)
        return deltas

    def _fail(self, request: Request, exc: Exception) -> Delta:
        """End one request whose output processing raised, leaving the rest of the batch be."""
        log.exception("request %s failed; aborting it alone", request.request_id)
        reason = f"engine error: {exc}"
        delta = None
        try:
            delta = self.abort(request.request_id, reason=reason)
        except Exception:  # its stream must still end, below
            log.exception("aborting request %s failed", request.request_id)
        if delta is None:  # it had already left `live` when it failed
            delta = Delta(
                request.request_id,
                finish_reason="error",
                error=reason,
                usage=self._usage(request),
            )
        return delta

    def _track_kv_peak(self) -> None:
        slots = self.kv.num_tokens_held()
        if slots > self.kv_peak_slots:
            self.kv_peak_slots = slots
            self.kv_peak_tokens = sum(r.num_computed_tokens for r in self.scheduler.running)

    def _usage(self, request: Request) -> Usage:
        return Usage(
            prompt_tokens=request.num_prompt_tokens,
            completion_tokens=request.num_output_tokens,
            cached_prompt_tokens=max(request.num_cached_tokens, 0),
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            model=self.config.model_name,
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            max_num_seqs=self.config.max_num_seqs,
            kv_cache_usage=self.kv.usage,
            num_blocks_total=self.kv.num_usable_blocks,
            num_blocks_free=self.kv.pool.num_free_blocks,
            block_size=self.config.block_size,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            prompts_pretokenized=self.prompts_pretokenized,
            num_steps=self.num_steps,
            kv_peak_slots=self.kv_peak_slots,
            kv_peak_tokens=self.kv_peak_tokens,
        )
