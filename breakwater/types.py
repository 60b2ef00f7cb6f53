"""Typed results of the Breakwater client SDK.

Field names follow the OpenAI API so code written against the OpenAI SDK reads the same.
Parsing is lenient on purpose: unknown fields are ignored and missing ones take defaults,
so a newer server (or another OpenAI-compatible one) never breaks an older client.
`request_id` is not part of the JSON body: it is the `X-Request-Id` the call ran under.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import astuple, dataclass, field
from typing import Any

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "ChatLogprobs",
    "ChoiceDelta",
    "ClientStats",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "Model",
    "ModelList",
    "PromptTokensDetails",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]

_Json = Mapping[str, Any]


def _map(value: Any) -> _Json:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


@dataclass(frozen=True)
class PromptTokensDetails:
    cached_tokens: int = 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (`prompt_tokens_details.cached_tokens`)."""

    @property
    def prompt_tokens_details(self) -> PromptTokensDetails:
        """The OpenAI spelling of `cached_tokens`, for code ported from the OpenAI SDK."""
        return PromptTokensDetails(self.cached_tokens)

    @classmethod
    def from_dict(cls, d: Any) -> Usage | None:
        if not isinstance(d, Mapping):
            return None
        return cls(
            prompt_tokens=_int(d.get("prompt_tokens")),
            completion_tokens=_int(d.get("completion_tokens")),
            total_tokens=_int(d.get("total_tokens")),
            cached_tokens=_int(_map(d.get("prompt_tokens_details")).get("cached_tokens")),
        )


@dataclass(frozen=True)
class CompletionLogprobs:
    """Legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any) -> CompletionLogprobs | None:
        if not isinstance(d, Mapping):
            return None
        return cls(
            tokens=_list(d.get("tokens")),
            token_logprobs=_list(d.get("token_logprobs")),
            top_logprobs=_list(d.get("top_logprobs")),
            text_offset=_list(d.get("text_offset")),
        )


@dataclass(frozen=True)
class TopLogprob:
    token: str = ""
    logprob: float = 0.0
    bytes: list[int] | None = None

    @classmethod
    def from_dict(cls, d: Any) -> TopLogprob:
        d = _map(d)
        return cls(d.get("token", ""), d.get("logprob", 0.0), d.get("bytes"))


@dataclass(frozen=True)
class TokenLogprob:
    token: str = ""
    logprob: float = 0.0
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: Any) -> TokenLogprob:
        d = _map(d)
        return cls(
            token=d.get("token", ""),
            logprob=d.get("logprob", 0.0),
            bytes=d.get("bytes"),
            top_logprobs=[TopLogprob.from_dict(t) for t in _list(d.get("top_logprobs"))],
        )


@dataclass(frozen=True)
class ChatLogprobs:
    content: list[TokenLogprob] | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ChatLogprobs | None:
        if not isinstance(d, Mapping):
            return None
        content = d.get("content")
        if not isinstance(content, list):
            return cls(None)
        return cls([TokenLogprob.from_dict(t) for t in content])


@dataclass(frozen=True)
class CompletionChoice:
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None

    @classmethod
    def from_dict(cls, d: Any) -> CompletionChoice:
        d = _map(d)
        return cls(
            index=_int(d.get("index")),
            text=d.get("text") or "",
            finish_reason=d.get("finish_reason"),
            logprobs=CompletionLogprobs.from_dict(d.get("logprobs")),
        )


@dataclass(frozen=True)
class Completion:
    """A `text_completion`; streaming yields the same type, one piece of text per chunk."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    request_id: str | None = None

    @property
    def text(self) -> str:
        """The first choice's text ('' when there is none, e.g. a usage-only chunk)."""
        return self.choices[0].text if self.choices else ""

    @classmethod
    def from_dict(cls, d: Any, request_id: str | None = None) -> Completion:
        d = _map(d)
        return cls(
            id=d.get("id") or "",
            object=d.get("object") or "text_completion",
            created=_int(d.get("created")),
            model=d.get("model") or "",
            choices=[CompletionChoice.from_dict(c) for c in _list(d.get("choices"))],
            usage=Usage.from_dict(d.get("usage")),
            system_fingerprint=d.get("system_fingerprint"),
            request_id=request_id,
        )


CompletionChunk = Completion
"""OpenAI streams `text_completion` objects too, so a completion chunk is a `Completion`."""


def _dicts(value: Any) -> list[dict[str, Any]] | None:
    """A list of JSON objects as given (None if absent or not a list)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ChatCompletionMessage:
    """`tool_calls` (OpenAI's objects, as JSON), `refusal` and vLLM's `reasoning_content`
    are kept as an upstream sent them: the gateway relays `tools` to OpenAI-compatible
    upstreams, and an answer of tool calls read as `content=None` lost the calls."""

    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ChatCompletionMessage:
        d = _map(d)
        return cls(
            role=d.get("role") or "assistant",
            content=d.get("content"),
            tool_calls=_dicts(d.get("tool_calls")),
            refusal=_str(d.get("refusal")),
            reasoning_content=_str(d.get("reasoning_content")),
        )


@dataclass(frozen=True)
class ChatChoice:
    index: int = 0
    message: ChatCompletionMessage = field(default_factory=ChatCompletionMessage)
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ChatChoice:
        d = _map(d)
        return cls(
            index=_int(d.get("index")),
            message=ChatCompletionMessage.from_dict(d.get("message")),
            finish_reason=d.get("finish_reason"),
            logprobs=ChatLogprobs.from_dict(d.get("logprobs")),
        )


@dataclass(frozen=True)
class ChatCompletion:
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[ChatChoice] = field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    request_id: str | None = None

    @property
    def content(self) -> str:
        """The first choice's message content ('' when absent)."""
        return (self.choices[0].message.content or "") if self.choices else ""

    @classmethod
    def from_dict(cls, d: Any, request_id: str | None = None) -> ChatCompletion:
        d = _map(d)
        return cls(
            id=d.get("id") or "",
            object=d.get("object") or "chat.completion",
            created=_int(d.get("created")),
            model=d.get("model") or "",
            choices=[ChatChoice.from_dict(c) for c in _list(d.get("choices"))],
            usage=Usage.from_dict(d.get("usage")),
            system_fingerprint=d.get("system_fingerprint"),
            request_id=request_id,
        )


@dataclass(frozen=True)
class ChoiceDelta:
    """As `ChatCompletionMessage`: a streamed tool call comes in pieces (`index`, then its
    `function.arguments` a fragment at a time), kept as sent."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    refusal: str | None = None
    reasoning_content: str | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ChoiceDelta:
        d = _map(d)
        return cls(
            role=d.get("role"),
            content=d.get("content"),
            tool_calls=_dicts(d.get("tool_calls")),
            refusal=_str(d.get("refusal")),
            reasoning_content=_str(d.get("reasoning_content")),
        )


@dataclass(frozen=True)
class ChatChunkChoice:
    index: int = 0
    delta: ChoiceDelta = field(default_factory=ChoiceDelta)
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None

    @classmethod
    def from_dict(cls, d: Any) -> ChatChunkChoice:
        d = _map(d)
        return cls(
            index=_int(d.get("index")),
            delta=ChoiceDelta.from_dict(d.get("delta")),
            finish_reason=d.get("finish_reason"),
            logprobs=ChatLogprobs.from_dict(d.get("logprobs")),
        )


@dataclass(frozen=True)
class ChatCompletionChunk:
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChatChunkChoice] = field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None
    request_id: str | None = None

    @property
    def content(self) -> str:
        """The first choice's delta content ('' when absent, e.g. a usage-only chunk)."""
        return (self.choices[0].delta.content or "") if self.choices else ""

    @classmethod
    def from_dict(cls, d: Any, request_id: str | None = None) -> ChatCompletionChunk:
        d = _map(d)
        return cls(
            id=d.get("id") or "",
            object=d.get("object") or "chat.completion.chunk",
            created=_int(d.get("created")),
            model=d.get("model") or "",
            choices=[ChatChunkChoice.from_dict(c) for c in _list(d.get("choices"))],
            usage=Usage.from_dict(d.get("usage")),
            system_fingerprint=d.get("system_fingerprint"),
            request_id=request_id,
        )


@dataclass(frozen=True)
class Model:
    id: str = ""
    object: str = "model"
    created: int = 0
    owned_by: str = ""

    @classmethod
    def from_dict(cls, d: Any) -> Model:
        d = _map(d)
        return cls(
            id=d.get("id") or "",
            object=d.get("object") or "model",
            created=_int(d.get("created")),
            owned_by=d.get("owned_by") or "",
        )


@dataclass(frozen=True)
class ModelList:
    """`GET /v1/models`; iterate it directly or read `.data`."""

    data: list[Model] = field(default_factory=list)
    object: str = "list"
    request_id: str | None = None

    def __iter__(self) -> Iterator[Model]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def from_dict(cls, d: Any, request_id: str | None = None) -> ModelList:
        d = _map(d)
        return cls(
            data=[Model.from_dict(m) for m in _list(d.get("data"))],
            object=d.get("object") or "list",
            request_id=request_id,
        )


@dataclass(frozen=True)
class ClientStats:
    """A client's retry accounting since it was made (`Client.stats()`). Add them up
    across clients, `sum(stats, ClientStats())`, for a fleet's retry amplification."""

    calls: int = 0
    """Logical calls, including those rejected locally."""
    attempts: int = 0
    """Attempts sent upstream (first attempts and retries)."""
    retries: int = 0
    """Attempts beyond a call's first."""
    throttled: int = 0
    """Attempts (first or retry) rejected locally by adaptive throttling."""
    budget_exhausted: int = 0
    """Retries refused because the retry budget was spent."""

    @property
    def retry_amplification(self) -> float:
        """Upstream attempts per logical call (0.0 before any call)."""
        return self.attempts / self.calls if self.calls else 0.0

    def __add__(self, other: ClientStats) -> ClientStats:
        return ClientStats(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))
