"""An OpenAI event stream decoded line by line, without IO.

The decoder is fed lines and hands back typed chunks, so the sync and async streams share
every rule (events, `[DONE]`, error events, truncation, the deadline) and differ only in
how they read a line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from breakwater._retry import Deadline
from breakwater.errors import APIConnectionError, StreamError, error_fields

T = TypeVar("T")


class ChunkDecoder(Generic[T]):
    """Server-sent-event lines to typed chunks: `feed` every line, then `end()`.

    Lines after `[DONE]` carry nothing; a reader stops at `done` (reading the rest only
    briefly, to give the connection back to the pool).
    """

    def __init__(self, parse: Callable[[Any, str], T], request_id: str, deadline: Deadline):
        self.request_id = request_id
        self._parse = parse
        self._deadline = deadline
        self._event = ""
        self._data: list[str] = []
        self._done = False

    @property
    def done(self) -> bool:
        """The stream said `[DONE]`: nothing after it counts."""
        return self._done

    def feed(self, line: str) -> T | None:
        """The chunk of the event this line completes, if any; StreamError on an error event."""
        self._deadline.check(self.request_id)
        if self._done or line.startswith(":"):  # ":" starts a comment / keep-alive
            return None
        if not line:  # a blank line ends an event
            return self._chunk()
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None

    def end(self) -> None:
        """The body is over: a stream that never said `[DONE]` was cut short."""
        if not self._done:
            self._chunk()  # an event left without its blank line
        if not self._done:
            raise APIConnectionError("stream ended before [DONE]", request_id=self.request_id)

    def _chunk(self) -> T | None:
        """The chunk the pending event carries; None if it has no data or is `[DONE]`."""
        event, data = self._event, "\n".join(self._data)
        had_data, self._event, self._data = bool(self._data), "", []
        if not had_data:
            return None
        if data.strip() == "[DONE]":
            self._done = True
            return None
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise StreamError(
                f"malformed stream event: {data[:200]!r}", request_id=self.request_id
            ) from exc
        if event == "error" or (isinstance(obj, dict) and obj.get("error") is not None):
            info = error_fields(obj)
            raise StreamError(
                str(info.get("message") or "error in stream"),
                type=info.get("type"),
                code=info.get("code"),
                param=info.get("param"),
                request_id=self.request_id,
                body=obj,
            )
        return self._parse(obj, self.request_id)
