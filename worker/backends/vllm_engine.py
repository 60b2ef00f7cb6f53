"""The `vllm` engine: vLLM's async engine behind the interface of our AsyncEngine.

A worker started with `--engine vllm` serves through vLLM on a GPU host while the gateway, the
wire contract and admission stay ours. vLLM is imported inside functions only, so this module
loads, and says clearly what to install, on a machine without vLLM.

Targets vLLM >= 0.6: the V0 `AsyncLLMEngine` and the V1 `AsyncLLM` (exported as
`vllm.AsyncLLMEngine` since V1 became the default). Where those differ (`priority`,
`RequestOutputKind.DELTA`, `num_cached_tokens`, a sync or async `get_tokenizer`), the adapter
inspects what is there instead of pinning a version.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prompts.tokenizer import Tokenizer
from worker.backends.vllm_kv_events import KVEventFollower
from worker.engine.config import EngineConfig
from worker.engine.errors import ConfigError, InvalidRequestError
from worker.engine.outputs import Delta, EngineStats, FinishReason, TokenLogprob, Usage
from worker.engine.request import GenerateRequest, Priority, SamplingParams

log = logging.getLogger(__name__)

INSTALL_HINT = "vLLM is not installed: pip install 'breakwater[vllm]'"
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
}


class VLLMNotInstalledError(ConfigError, ImportError):
    """An ImportError for code that expects one, and a ConfigError so the CLI prints it cleanly."""


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise VLLMNotInstalledError(INSTALL_HINT) from e
    return vllm


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str: ...


class VLLMTokenizer:
    """vLLM's own (Hugging Face) tokenizer behind the small interface our servers use.

    Used when the model is not a local checkpoint with a tokenizer.json (a hub id, or a
    slow-tokenizer model), since then only vLLM knows how to load it.
    """

    def __init__(self, hf: Any) -> None:
        self.hf = hf

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        try:
            text = self.hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # transformers raises ValueError, jinja2 TemplateError, ...
            raise InvalidRequestError(
                f"chat template rejected the messages: {e}", "messages"
            ) from e
        return str(text)


class VLLMEngine:
    """vLLM's AsyncLLMEngine with AsyncEngine's interface: generate(), stats(), tokenizer."""

    def __init__(self, config: EngineConfig) -> None:
        vllm = import_vllm()
        self.config = config
        self._sampling_cls = vllm.SamplingParams
        self._delta_kind = _delta_output_kind()
        self._priority_ok = _accepts(vllm.AsyncLLMEngine.generate, "priority")
        self._salt_ok = _takes_cache_salt(vllm)
        self.counters = VLLMCounters()
        self._rpc_dir = _private_rpc_dir()
        self.kv_events = _kv_event_follower(config)
        endpoint = self.kv_events.endpoint if self.kv_events is not None else None
        try:
            self.engine = _build(vllm, config, self._priority_ok, self.counters, endpoint)
        except BaseException:
            if self.kv_events is not None:
                self.kv_events.close()
            self._remove_rpc_dir()
            raise
        self.block_size = _engine_block_size(self.engine) or config.block_size
        if self.kv_events is not None:
            self.kv_events.block_size = self.block_size
        self._tokenizer: _Tokenizer = _load_tokenizer(config.model, self.engine)
        self.max_model_len: int | None = config.max_model_len or _engine_max_model_len(self.engine)
        # Requests this adapter has handed to vLLM; started ones have produced an output.
        self._live: set[str] = set()
        self._started: set[str] = set()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._cache_queries = 0
        self._cache_hits = 0

    @property
    def model_name(self) -> str:
        return self.config.model_name

    @property
    def tokenizer(self) -> _Tokenizer:
        return self._tokenizer

    def stats(self) -> EngineStats:
        """vLLM's own counters (its scheduler's, through a stat logger) where this vLLM has
        them; otherwise what the adapter sees, counting a request as waiting until its first
        output arrives.

        vLLM's counts are a snapshot of its last step, and an idle engine takes no more steps,
        so they are capped by the requests this adapter (vLLM's only client) has in flight:
        an idle worker reports an empty queue to the router and the autoscaler, whatever its
        last step saw."""
        c = self.counters
        live = len(self._live)
        running = min(c.running, live) if c.seen else len(self._started)
        waiting = min(c.waiting, live - running) if c.seen else live - running
        return EngineStats(
            model=self.model_name,
            num_requests_running=running,
            num_requests_waiting=waiting,
            max_num_seqs=self.config.max_num_seqs,
            kv_cache_usage=c.kv_cache_usage,
            block_size=self.block_size,
            prefix_cache_queries=c.prefix_cache_queries if c.seen else self._cache_queries,
            prefix_cache_hits=c.prefix_cache_hits if c.seen else self._cache_hits,
            num_preemptions=c.preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            num_steps=c.steps,
        )

    # The prefix-cache feed (worker.cache_feed.CacheFeed), from vLLM's KV events.
    def cache_events(self) -> tuple[list[tuple[bool, bytes]], int]:
        return ([], 0) if self.kv_events is None else self.kv_events.cache_events()

    def cached_hashes(self) -> list[bytes]:
        return [] if self.kv_events is None else self.kv_events.cached_hashes()

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Validate now (raising InvalidRequestError) and return the request's delta stream.

        Closing or cancelling the iterator before it finishes aborts the request in vLLM.
        """
        rid = request.request_id
        if rid in self._live:
            raise InvalidRequestError(f"duplicate request id {rid!r}", "request_id")
        request.sampling.validate()
        priority = Priority.parse(request.priority)
        prompt = self._prompt(request)
        if request.cache_salt:  # vLLM salts its block hashes with it (vLLM >= 0.9)
            if not self._salt_ok:  # an older vLLM would share the tenant's cache silently
                raise InvalidRequestError(
                    "this worker's vLLM cannot keep a prompt's cache apart (cache_salt needs "
                    "vLLM 0.9 or later)",
                    "cache_salt",
                )
            prompt["cache_salt"] = request.cache_salt
        params = self.sampling_params(request.sampling)
        kwargs: dict[str, Any] = {"priority": int(priority)} if self._priority_ok else {}
        self._live.add(rid)
        return self._stream(rid, prompt, params, request.sampling, kwargs)

    def sampling_params(self, sp: SamplingParams) -> Any:
        """Ours -> vllm.SamplingParams; the names are vLLM's already, top_k 0 is its -1."""
        kwargs: dict[str, Any] = dict(
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=-1 if sp.top_k in (0, -1) else sp.top_k,
            seed=sp.seed,
            max_tokens=sp.max_tokens,
            stop=list(sp.stop),
            stop_token_ids=list(sp.stop_token_ids),
            ignore_eos=sp.ignore_eos,
            include_stop_str_in_output=sp.include_stop_str_in_output,
            logprobs=sp.logprobs,
            skip_special_tokens=sp.skip_special_tokens,
        )
        if self._delta_kind is not None:
            kwargs["output_kind"] = self._delta_kind
        return self._sampling_cls(**kwargs)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.kv_events is not None:
            self.kv_events.close()
        stop = getattr(self.engine, "shutdown", None) or getattr(
            self.engine, "shutdown_background_loop", None
        )
        if stop is not None:
            try:
                stop()
            except Exception:
                log.exception("vLLM engine shutdown failed")
        self._remove_rpc_dir()

    def _remove_rpc_dir(self) -> None:
        if self._rpc_dir is not None:
            shutil.rmtree(self._rpc_dir, ignore_errors=True)
            if os.environ.get("VLLM_RPC_BASE_PATH") == self._rpc_dir:
                del os.environ["VLLM_RPC_BASE_PATH"]
            self._rpc_dir = None

    # -- internals ---------------------------------------------------------------------------

    def _prompt(self, req: GenerateRequest) -> dict[str, Any]:
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise InvalidRequestError(
                "give exactly one of prompt, prompt_token_ids or messages", "prompt"
            )
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            # vLLM tokenises text off the event loop and checks its length itself.
            return {"prompt": req.prompt}
        if req.messages is not None:
            # Rendered and tokenised here so template errors are a 400 before streaming, and
            # without vLLM adding a second BOS to a template that already has one.
            text = self._tokenizer.apply_chat_template(req.messages, req.add_generation_prompt)
            ids = self._tokenizer.encode(text, add_special_tokens=False)
            param = "messages"
        else:
            ids = list(req.prompt_token_ids or [])
            if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
                raise InvalidRequestError(
                    "prompt token ids must be non-negative integers", "prompt"
                )
            param = "prompt"
        if not ids:
            raise InvalidRequestError("the prompt is empty", param)
        self._check_length(len(ids), req.sampling.max_tokens, param)
        return {"prompt_token_ids": ids}

    def _check_length(self, n: int, max_tokens: int | None, param: str) -> None:
        limit = self.max_model_len
        if limit is None:
            return
        if n >= limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} "
                "tokens, leaving no room for output",
                param,
            )
        if max_tokens is not None and n + max_tokens > limit:
            raise InvalidRequestError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} "
                f"tokens and max_tokens is {max_tokens} ({n + max_tokens} in all)",
                "max_tokens",
            )

    async def _stream(
        self,
        rid: str,
        prompt: dict[str, Any],
        params: Any,
        sp: SamplingParams,
        kwargs: dict[str, Any],
    ) -> AsyncIterator[Delta]:
        outputs = self.engine.generate(prompt, params, rid, **kwargs)
        acc = _Accumulator(rid, sp.logprobs, cumulative=self._delta_kind is None)
        done = False
        try:
            while not done:
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:  # ended without a finished output: aborted elsewhere
                    delta, done = acc.final("abort"), True
                except Exception as e:  # vLLM's own validation (ValueError), a dead engine, ...
                    log.warning("vLLM request %s failed: %s", rid, e)
                    delta, done = acc.final("error", error=str(e) or type(e).__name__), True
                else:
                    delta = acc.feed(out)
                    self._count(rid, acc, delta)
                    if delta.finished:
                        done = True
                        # Let generate() return normally: closed at its last yield, vLLM would
                        # "abort" the id later, possibly when a new request reuses it.
                        with contextlib.suppress(Exception):
                            async for _ in outputs:
                                pass
                yield delta
        finally:
            self._live.discard(rid)
            self._started.discard(rid)
            if not done:
                with contextlib.suppress(Exception):
                    await outputs.aclose()  # vLLM aborts a closed generate() itself ...
                with contextlib.suppress(Exception):
                    await self.engine.abort(rid)  # ... but say so: idempotent, version-proof

    def _count(self, rid: str, acc: _Accumulator, delta: Delta) -> None:
        if rid not in self._started:
            self._started.add(rid)
            self._prompt_tokens_total += acc.prompt_tokens
            self._cache_queries += acc.prompt_tokens
        self._generation_tokens_total += len(delta.token_ids)
        if delta.finished:
            self._cache_hits += acc.cached_tokens


class _Accumulator:
    """Turns a request's RequestOutputs, delta or cumulative, into our Deltas."""

    def __init__(self, rid: str, logprobs: int | None, cumulative: bool) -> None:
        self.rid = rid
        self.num_logprobs = logprobs
        self.cumulative = cumulative
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self._text_len = 0
        self._tokens_len = 0

    def feed(self, out: Any) -> Delta:
        if out.prompt_token_ids is not None and not self.prompt_tokens:
            self.prompt_tokens = len(out.prompt_token_ids)
        self.cached_tokens = getattr(out, "num_cached_tokens", None) or self.cached_tokens
        comp = out.outputs[0]
        text, token_ids, logprobs = comp.text, list(comp.token_ids), comp.logprobs
        if self.cumulative:
            text = text[self._text_len :]
            token_ids = token_ids[self._tokens_len :]
            logprobs = logprobs[self._tokens_len :] if logprobs is not None else None
            self._text_len += len(text)
            self._tokens_len += len(token_ids)
        self.completion_tokens += len(token_ids)
        delta = Delta(self.rid, text=text, token_ids=token_ids)
        if self.num_logprobs is not None and logprobs:
            delta.logprobs = [
                _token_logprob(t, lp, self.num_logprobs)
                for t, lp in zip(token_ids, logprobs, strict=False)
            ]
        if out.finished or comp.finish_reason is not None:
            delta.finish_reason = _FINISH.get(str(comp.finish_reason), "stop")
            delta.stop_reason = comp.stop_reason
            delta.usage = self.usage()
        return delta

    def final(self, reason: FinishReason, error: str | None = None) -> Delta:
        return Delta(self.rid, finish_reason=reason, usage=self.usage(), error=error)

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


def _token_logprob(token_id: int, position: Any, k: int) -> TokenLogprob:
    """vLLM gives {token: Logprob} with the sampled token plus the top k; ours splits them."""
    entries = sorted(((t, float(lp.logprob)) for t, lp in position.items()), key=lambda e: -e[1])
    sampled = position.get(token_id)
    return TokenLogprob(
        token_id, float(sampled.logprob) if sampled is not None else float("nan"), entries[:k]
    )


# -- construction ----------------------------------------------------------------------------


def _takes_cache_salt(vllm: Any) -> bool:
    """Whether this vLLM's prompts take `cache_salt` (TypedDicts: an older vLLM ignores a
    key it does not know, so the salt would be dropped without a word)."""
    try:
        from vllm.inputs import TextPrompt, TokensPrompt
    except ImportError:
        return False
    return all(
        "cache_salt" in getattr(t, "__annotations__", {}) for t in (TextPrompt, TokensPrompt)
    )


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _delta_output_kind() -> Any:
    """RequestOutputKind.DELTA (vLLM >= 0.6) saves re-sending the whole text every token."""
    try:
        module = importlib.import_module("vllm.sampling_params")
    except ImportError:
        return None
    return getattr(getattr(module, "RequestOutputKind", None), "DELTA", None)


@dataclass
class VLLMCounters:
    """The latest of vLLM's scheduler stats, kept by a stat logger vLLM calls every step."""

    seen: bool = False
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    steps: int = 0

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            s = scheduler_stats
            self.running = int(s.num_running_reqs)
            self.waiting = int(s.num_waiting_reqs)
            self.kv_cache_usage = float(s.kv_cache_usage)
            prefix = getattr(s, "prefix_cache_stats", None)
            if prefix is not None:  # tokens queried and hit in this step
                self.prefix_cache_queries += int(prefix.queries)
                self.prefix_cache_hits += int(prefix.hits)
            self.steps += 1
            self.seen = True
        if iteration_stats is not None:
            self.preemptions += int(getattr(iteration_stats, "num_preempted_reqs", 0) or 0)


def _stat_logger(counters: VLLMCounters) -> Any:
    """A StatLoggerBase subclass (a factory, as vLLM wants) feeding `counters`; None where
    this vLLM has no stat-logger interface (V0)."""
    try:
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError:
        return None

    class BreakwaterStats(StatLoggerBase):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            *args: Any,
            **kwargs: Any,
        ) -> None:
            counters.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return BreakwaterStats


def _kv_event_follower(config: EngineConfig) -> KVEventFollower | None:
    """A subscriber to vLLM's KV events (its prefix cache, as our block hashes), where this
    vLLM publishes them."""
    if not config.enable_prefix_caching:
        return None
    try:
        importlib.import_module("vllm.distributed.kv_events")
        importlib.import_module("vllm.config").KVEventsConfig  # noqa: B018
    except (ImportError, AttributeError):
        return None
    return KVEventFollower(config.model_name.encode())


_IPC_PATH_MAX = 107
"""sizeof(sockaddr_un.sun_path) - 1 on Linux: the longest ipc socket path ZMQ takes."""


def _private_rpc_dir() -> str | None:
    """A directory of our own for vLLM's ZMQ ipc sockets, removed at shutdown: vLLM puts
    them in VLLM_RPC_BASE_PATH (default: the temp directory) and leaves several behind at
    every stop, clean or not. None when the caller chose the place (the variable is set)."""
    if os.environ.get("VLLM_RPC_BASE_PATH"):
        return None
    path = tempfile.mkdtemp(prefix="bw-vllm-")
    if len(path) + len("/") + 36 > _IPC_PATH_MAX and os.path.isdir("/tmp"):
        # a socket path (the directory, a uuid4) must fit sockaddr_un: a long TMPDIR, which
        # vLLM's own default would trip on too, gives way to /tmp
        os.rmdir(path)
        path = tempfile.mkdtemp(prefix="bw-vllm-", dir="/tmp")
    os.environ["VLLM_RPC_BASE_PATH"] = path  # read by vLLM, and by its engine process
    return path


def _build(
    vllm: Any,
    config: EngineConfig,
    priority: bool,
    counters: VLLMCounters | None = None,
    kv_endpoint: str | None = None,
) -> Any:
    args: dict[str, Any] = dict(
        model=config.model,
        served_model_name=config.served_model_name,
        max_model_len=config.max_model_len,
        dtype=_dtype(config),
        seed=config.seed,
        enable_prefix_caching=config.enable_prefix_caching,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        # Our token budget is a chunked-prefill budget; V0 refuses a budget below
        # max_model_len without it (V1 always chunks).
        enable_chunked_prefill=True,
        enforce_eager=config.enforce_eager,
        # Stats reach our stat logger only when vLLM collects them.
        disable_log_stats=False,
    )
    if kv_endpoint is not None:
        from vllm.config import KVEventsConfig

        args["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", endpoint=kv_endpoint
        )
    if priority:
        # V0 rejects a non-zero priority unless the scheduler orders by it.
        args["scheduling_policy"] = "priority"
    utilization = _gpu_memory_utilization(config)
    if utilization is not None:
        args["gpu_memory_utilization"] = utilization
    if config.kv_cache_memory is not None:
        args["kv_cache_memory_bytes"] = config.kv_cache_memory
    accepted = inspect.signature(vllm.AsyncEngineArgs).parameters
    dropped = sorted(k for k in args if k not in accepted)
    if dropped:
        log.info("this vLLM has no engine args %s; left at its defaults", ", ".join(dropped))
    engine_args = vllm.AsyncEngineArgs(**{k: v for k, v in args.items() if k in accepted})
    logger = _stat_logger(counters) if counters is not None else None
    if logger is not None and _accepts(vllm.AsyncLLMEngine.from_engine_args, "stat_loggers"):
        return vllm.AsyncLLMEngine.from_engine_args(engine_args, stat_loggers=[logger])
    return vllm.AsyncLLMEngine.from_engine_args(engine_args)


def _engine_block_size(engine: Any) -> int | None:
    cache_config = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    value = getattr(cache_config, "block_size", None)
    return value if isinstance(value, int) else None


def _dtype(config: EngineConfig) -> str:
    """Ours means fp32 on CPU by `auto`; vLLM's `auto` would run a float32 checkpoint in
    bfloat16 on CPU (and no longer match transformers token for token)."""
    if config.dtype != "auto" or config.device.startswith("cuda"):
        return config.dtype
    if config.device == "cpu":
        return "float32"
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def _gpu_memory_utilization(config: EngineConfig) -> float | None:
    """vLLM takes a fraction of the GPU; our budget is in bytes, so divide by the GPU's size."""
    if config.memory_budget is None:
        return None
    import torch

    if not torch.cuda.is_available():
        log.warning("memory_budget ignored: vLLM sizes itself by GPU memory and there is no GPU")
        return None
    index = int(config.device.split(":")[1]) if config.device.startswith("cuda:") else 0
    total = torch.cuda.get_device_properties(index).total_memory
    return round(min(1.0, max(0.01, config.memory_budget / total)), 4)


def _engine_max_model_len(engine: Any) -> int | None:
    for holder in (engine, getattr(engine, "engine", None)):  # V1 AsyncLLM, V0 AsyncLLMEngine
        model_config = getattr(holder, "model_config", None)
        value = getattr(model_config, "max_model_len", None)
        if isinstance(value, int):
            return value
    return None


def _load_tokenizer(model: str, engine: Any) -> _Tokenizer:
    """Ours for a local checkpoint (same text as the torch engine), else vLLM's."""
    if (Path(model) / "tokenizer.json").is_file():
        return Tokenizer(model)
    return VLLMTokenizer(_resolve(engine.get_tokenizer()))


def _resolve(value: Any) -> Any:
    """get_tokenizer() is async in some vLLM versions; we may be inside a loop or not."""
    if not inspect.isawaitable(value):
        return value

    async def wait() -> Any:
        return await value

    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(wait()))
        except BaseException as e:
            error.append(e)

    thread = threading.Thread(target=run, name="vllm-get-tokenizer")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
