"""A fake of vLLM for Breakwater's adapter tests, NOT vLLM.

vLLM needs a GPU build that cannot run where Breakwater is developed and tested, so
tests/worker/test_vllm_adapter.py puts this directory on sys.path and `import vllm` finds
this package. It keeps the real module layout and the real signatures of only what
worker/backends/vllm_engine.py uses (vLLM's V1 AsyncLLM, exported as AsyncLLMEngine), and
streams deterministic tokens so tests can assert exact output.
"""

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.engine.async_llm_engine import AsyncLLMEngine
from vllm.inputs import TextPrompt, TokensPrompt
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

__version__ = "0.0.0+fake"

__all__ = [
    "AsyncEngineArgs",
    "AsyncLLMEngine",
    "CompletionOutput",
    "RequestOutput",
    "SamplingParams",
    "TextPrompt",
    "TokensPrompt",
]
