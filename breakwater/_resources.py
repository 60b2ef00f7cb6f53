"""The API's resources, written once for both clients.

A resource builds its `Call` and hands it to the client's `_call`, which returns the result
(`Client`) or a coroutine of it (`AsyncClient`); the clients' type arguments (`One`: what a
call returns, `Many`: what a streamed call returns) give each face its return types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar, overload

from breakwater._http import Call
from breakwater.types import ChatCompletion, ChatCompletionChunk, Completion, ModelList

One = TypeVar("One")
Many = TypeVar("Many")

Prompt = str | list[str] | list[int] | list[list[int]]
Messages = Iterable[Mapping[str, Any]]


class _Client(Protocol):
    def _call(self, call: Call[Any]) -> Any: ...


class _Resource:
    def __init__(self, client: _Client) -> None:
        self._client = client


class Completions(_Resource, Generic[One, Many]):
    """`POST /v1/completions`."""

    @overload
    def create(
        self, *, model: str, prompt: Prompt, stream: Literal[False] = ..., **params: Any
    ) -> One: ...
    @overload
    def create(
        self, *, model: str, prompt: Prompt, stream: Literal[True], **params: Any
    ) -> Many: ...
    def create(
        self, *, model: str, prompt: Prompt, stream: bool = False, **params: Any
    ) -> One | Many:
        """`params`: `timeout` (this call's deadline, instead of the client's),
        `extra_headers`, `extra_query` (URL query parameters), `extra_body` (fields merged
        into the JSON body over all others, as in the openai SDK: `{"ignore_eos": True}`),
        and the OpenAI body fields (max_tokens, temperature, stop, ...)."""
        parse = Completion.from_dict
        return self._client._call(
            Call.post("/v1/completions", parse, model, stream, params, prompt=prompt)
        )


class ChatCompletions(_Resource, Generic[One, Many]):
    """`POST /v1/chat/completions`."""

    @overload
    def create(
        self, *, model: str, messages: Messages, stream: Literal[False] = ..., **params: Any
    ) -> One: ...
    @overload
    def create(
        self, *, model: str, messages: Messages, stream: Literal[True], **params: Any
    ) -> Many: ...
    def create(
        self, *, model: str, messages: Messages, stream: bool = False, **params: Any
    ) -> One | Many:
        """As `Completions.create`."""
        parse = ChatCompletionChunk.from_dict if stream else ChatCompletion.from_dict
        messages = [dict(m) for m in messages]
        return self._client._call(
            Call.post("/v1/chat/completions", parse, model, stream, params, messages=messages)
        )


class Chat(Generic[One, Many]):
    def __init__(self, client: _Client) -> None:
        self.completions: ChatCompletions[One, Many] = ChatCompletions(client)


class Models(_Resource, Generic[One]):
    """`GET /v1/models`."""

    def list(self, *, timeout: float | None = None) -> One:
        return self._client._call(Call("GET", "/v1/models", ModelList.from_dict, timeout=timeout))
