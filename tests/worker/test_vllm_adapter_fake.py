"""The `vllm` engine adapter over a FAKE vLLM package: only what real vLLM on CPU cannot show.

tests/vllm runs the adapter against real vLLM (its CPU build): greedy output, streaming,
stop strings, logprobs, chat templates, aborts, stats, KV events, drain. What is left here
needs a vLLM this machine cannot run: CUDA-only options (a byte budget as
gpu_memory_utilization), shapes of older vLLM releases (cumulative outputs, V0's priority
scheduler flag, an async get_tokenizer), a hub model id without a local tokenizer, and
failure paths real vLLM does not produce on demand. These tests put tests/worker/fake_vllm
on sys.path, so `import vllm` finds a fake with vLLM's module layout and signatures.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, TypeVar

import pytest

from worker.backends.vllm_engine import INSTALL_HINT, VLLMEngine, VLLMNotInstalledError
from worker.engine import EngineConfig, GenerateRequest, SamplingParams
from worker.engine.errors import ConfigError, InvalidRequestError
from worker.engine.outputs import Delta

FAKE_DIR = Path(__file__).parent / "fake_vllm"
TEXT = "hello world, hello breakwater. "
T = TypeVar("T")


def _purge_vllm() -> None:
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModuleType]:
    """The fake vLLM package, importable as `vllm` for one test."""
    _purge_vllm()
    # the adapter would make a socket directory of its own, and name it in the environment
    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    import vllm as fake

    assert "fake" in (fake.__doc__ or "").lower()
    yield fake
    _purge_vllm()


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(body(), timeout=30)

    return asyncio.run(main())


async def collect(engine: VLLMEngine, request: GenerateRequest) -> list[Delta]:
    return [d async for d in engine.generate(request)]


def make(model: str = "no-such-dir", **kw: Any) -> VLLMEngine:
    return VLLMEngine(EngineConfig(model=model, **kw))


def req(rid: str, prompt: str = "hi", **sampling: Any) -> GenerateRequest:
    return GenerateRequest(rid, prompt=prompt, sampling=SamplingParams(**sampling))


def test_cumulative_outputs_give_the_same_deltas(
    vllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without RequestOutputKind (older vLLM) the adapter diffs cumulative outputs itself."""
    sampling = dict(max_tokens=12, stop=["wor"], logprobs=2)
    delta_mode = run(lambda: collect(make(), req("a", **sampling)))
    monkeypatch.delattr(vllm.sampling_params, "RequestOutputKind")
    engine = make()
    cumulative = run(lambda: collect(engine, req("a", **sampling)))

    kind = engine.engine.requests["a"]["params"].output_kind
    assert kind.name == "CUMULATIVE"
    assert cumulative == delta_mode
    assert "".join(d.text for d in cumulative) == "hello "


def test_sampling_params_mapping(vllm: ModuleType) -> None:
    engine = make()
    sp = engine.sampling_params(
        SamplingParams(
            temperature=0.5,
            top_p=0.9,
            top_k=0,
            seed=7,
            max_tokens=9,
            stop=["x", "yz"],
            stop_token_ids=[3],
            ignore_eos=True,
            include_stop_str_in_output=True,
            logprobs=4,
            skip_special_tokens=False,
        )
    )
    assert isinstance(sp, vllm.SamplingParams)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.max_tokens) == (0.5, 0.9, -1, 7, 9)
    assert (sp.stop, sp.stop_token_ids, sp.logprobs) == (["x", "yz"], [3], 4)
    assert sp.ignore_eos and sp.include_stop_str_in_output and not sp.skip_special_tokens
    assert engine.sampling_params(SamplingParams(top_k=5)).top_k == 5
    defaults = engine.sampling_params(SamplingParams())
    assert (defaults.max_tokens, defaults.logprobs, defaults.stop) == (None, None, [])


def test_duplicate_request_id_is_refused(vllm: ModuleType) -> None:
    engine = make()

    async def body() -> None:
        stream = engine.generate(req("same", max_tokens=3))
        with pytest.raises(InvalidRequestError, match="duplicate"):
            engine.generate(req("same", max_tokens=3))
        assert len([d async for d in stream]) == 3
        assert len(await collect(engine, req("same", max_tokens=3))) == 3  # free again

    run(body)


def test_chat_and_decode_use_vllms_tokenizer_without_a_local_one(vllm: ModuleType) -> None:
    engine = make("some-org/some-model")
    messages = [{"role": "user", "content": "yo"}]
    run(
        lambda: collect(
            engine, GenerateRequest("c", messages=messages, sampling=SamplingParams(max_tokens=2))
        )
    )

    sent = engine.engine.requests["c"]["prompt"]
    assert sent == {"prompt_token_ids": [ord(c) for c in "[user]yo[assistant]"]}
    assert engine.tokenizer.decode([104, 105], skip_special_tokens=False) == "hi"
    run(
        lambda: collect(
            engine,
            GenerateRequest("t", prompt_token_ids=[5, 6], sampling=SamplingParams(max_tokens=1)),
        )
    )
    assert engine.engine.requests["t"]["prompt"] == {"prompt_token_ids": [5, 6]}
    run(lambda: collect(engine, req("p", max_tokens=1)))
    assert engine.engine.requests["p"]["prompt"] == {"prompt": "hi"}


def test_priority_reaches_vllm_with_a_priority_scheduler(vllm: ModuleType) -> None:
    engine = make()
    batch = GenerateRequest(
        "b", prompt="hi", sampling=SamplingParams(max_tokens=1), priority="batch"
    )
    run(lambda: collect(engine, batch))
    run(lambda: collect(engine, req("i", max_tokens=1)))

    assert engine.engine.engine_args.scheduling_policy == "priority"
    assert engine.engine.requests["b"]["priority"] == 1
    assert engine.engine.requests["i"]["priority"] == 0


def test_vllms_own_rejection_ends_the_stream_with_an_error(vllm: ModuleType) -> None:
    """A text prompt is tokenised by vLLM, so its length check arrives as a stream error."""
    engine = make(max_model_len=8)
    deltas = run(lambda: collect(engine, req("long", prompt="a long prompt")))

    assert len(deltas) == 1 and deltas[0].finish_reason == "error"
    assert "maximum model length" in (deltas[0].error or "")
    assert engine.stats().num_requests_waiting == 0


def test_an_idle_engine_reports_no_queue_whatever_its_last_step_saw(vllm: ModuleType) -> None:
    """vLLM's scheduler stats are its last step's; with nothing in flight there is no queue
    (CI once read vllm:num_requests_waiting 1 from an idle real vLLM)."""
    engine = make()
    engine.counters.record(
        SimpleNamespace(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.5), None
    )
    stats = engine.stats()
    assert (stats.num_requests_running, stats.num_requests_waiting) == (0, 0)

    engine._live.update({"a", "b"})  # two requests handed to vLLM, neither answered yet
    stats = engine.stats()
    assert (stats.num_requests_running, stats.num_requests_waiting) == (2, 0)
    engine.counters.record(
        SimpleNamespace(num_running_reqs=1, num_waiting_reqs=1, kv_cache_usage=0.5), None
    )
    stats = engine.stats()
    assert (stats.num_requests_running, stats.num_requests_waiting) == (1, 1)


def test_engine_args_follow_the_config(vllm: ModuleType) -> None:
    engine = make(
        "/models/llama",
        served_model_name="llama",
        max_model_len=4096,
        dtype="bfloat16",
        enable_prefix_caching=False,
        max_num_seqs=32,
        max_num_batched_tokens=1024,
        kv_cache_memory=1 << 30,  # the fake's vLLM has no such arg: dropped, not fatal
    )
    args = engine.engine.engine_args
    assert (args.model, args.served_model_name, args.max_model_len) == (
        "/models/llama",
        "llama",
        4096,
    )
    assert (args.dtype, args.enable_prefix_caching) == ("bfloat16", False)
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (32, 1024)
    assert args.enable_chunked_prefill is True
    assert args.gpu_memory_utilization == 0.9  # no memory_budget: vLLM's default
    assert engine.max_model_len == 4096
    engine.shutdown()
    assert engine.engine.shut_down


def test_memory_budget_becomes_a_gpu_fraction(
    vllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM sizes itself by a fraction of the GPU; our budget is bytes of the chosen device."""
    seen: list[int] = []

    def properties(index: int) -> SimpleNamespace:
        seen.append(index)
        return SimpleNamespace(total_memory=80 << 30)

    cuda = SimpleNamespace(is_available=lambda: True, get_device_properties=properties)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))  # no GPU here
    engine = make(memory_budget=40 << 30, device="cuda:1")
    assert engine.engine.engine_args.gpu_memory_utilization == 0.5
    assert seen == [1]


def test_an_async_get_tokenizer_is_awaited(
    vllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some vLLM versions have `async def get_tokenizer`; the adapter is built in or out of a
    running loop (the worker builds it in a thread)."""
    fake_tokenizer = vllm.engine.async_llm_engine.FakeTokenizer()

    async def get_tokenizer(self: Any) -> Any:
        return fake_tokenizer

    monkeypatch.setattr(vllm.AsyncLLMEngine, "get_tokenizer", get_tokenizer)
    assert make().tokenizer.hf is fake_tokenizer  # type: ignore[attr-defined]

    async def inside_a_loop() -> Any:
        return make().tokenizer

    assert run(inside_a_loop).hf is fake_tokenizer


def test_build_engine_picks_the_adapter(vllm: ModuleType) -> None:
    from worker.engine_factory import build_engine
    from worker.settings import WorkerSettings

    engine = build_engine(WorkerSettings(engine="vllm", engine_config=EngineConfig(model="m")))
    assert isinstance(engine, VLLMEngine)
    assert isinstance(engine.engine, vllm.AsyncLLMEngine)
    assert engine.stats().model == "m"


def test_missing_vllm_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _purge_vllm()
    assert str(FAKE_DIR) not in sys.path
    if importlib.util.find_spec("vllm") is not None:  # a real vLLM: hide it for this test
        monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(VLLMNotInstalledError) as e:
        make()
    assert str(e.value) == INSTALL_HINT == "vLLM is not installed: pip install 'breakwater[vllm]'"
    assert isinstance(e.value, ImportError) and isinstance(e.value, ConfigError)


def test_vllm_gets_a_private_socket_directory_that_fits_a_socket_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's ipc sockets go to a directory of the worker's own (removed at shutdown); under
    a temp directory too long for a socket path it falls back to /tmp; a directory the
    caller chose (VLLM_RPC_BASE_PATH) is left as it is."""
    from worker.backends.vllm_engine import _IPC_PATH_MAX, _private_rpc_dir

    monkeypatch.delenv("VLLM_RPC_BASE_PATH", raising=False)
    with tempfile.TemporaryDirectory(prefix="bwt-") as short:
        monkeypatch.setattr(tempfile, "tempdir", short)
        path = _private_rpc_dir()
        assert path is not None and Path(path).parent == Path(short)
        assert os.environ["VLLM_RPC_BASE_PATH"] == path

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    monkeypatch.delenv("VLLM_RPC_BASE_PATH")
    path = _private_rpc_dir()
    assert path is not None and Path(path).parent == Path("/tmp")
    assert len(path) + 37 <= _IPC_PATH_MAX
    os.rmdir(path)

    monkeypatch.setenv("VLLM_RPC_BASE_PATH", str(tmp_path))
    assert _private_rpc_dir() is None


def test_a_cache_salt_reaches_vllm_or_is_refused_where_vllm_would_drop_it(
    vllm: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A salted request on a vLLM whose prompts have no `cache_salt` (before 0.9: the key
    is ignored, the tenant's cache shared) is a 400 naming the field, never served."""
    old = make()
    salted = GenerateRequest("s", prompt="hi", sampling=SamplingParams(max_tokens=2))
    salted.cache_salt = "tenant"
    with pytest.raises(InvalidRequestError, match="cache_salt") as e:
        old.generate(salted)
    assert e.value.param == "cache_salt"
    for shape in (vllm.inputs.TextPrompt, vllm.inputs.TokensPrompt):
        monkeypatch.setitem(shape.__annotations__, "cache_salt", str)
    engine = make()
    run(lambda: collect(engine, salted))
    assert engine.engine.requests["s"]["prompt"] == {"prompt": "hi", "cache_salt": "tenant"}
