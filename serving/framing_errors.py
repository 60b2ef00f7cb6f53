"""aiohttp's own error answers (a request it cannot parse, a handler that raised) as
OpenAI-style JSON, like every other error an OpenAI client hears from us.

aiohttp answers a request it cannot frame (a bad request line, an invalid header, a head
past its size limits, a malformed Content-Length) from its `RequestHandler.handle_error`,
in plain text, before any route or middleware runs (`openai_http.json_errors` rewrites
its 404 and 405, which do reach the middleware); an OpenAI SDK then reports the body as
unreadable instead of the reason. aiohttp offers no hook for this, so a set-up runner's
server becomes a `web.Server` subclass (its class swapped in place) whose connections get
a `RequestHandler` subclass: aiohttp's status, logging and connection close are kept, and
only the body changes. Parsing errors are the client's
(4xx, `invalid_request_error`, aiohttp's reason as the message, without the bytes it
quotes); a 500 says nothing more than that, as aiohttp's own does without debug, and a
504 (a handler's TimeoutError) says it timed out, as the gateway's own 504s do.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proto.openai_compat import OpenAIError


def error_body(status: int, message: str | None) -> bytes:
    """The OpenAI error body for one of aiohttp's error answers."""
    if status == 504:  # a handler that raised TimeoutError
        error = OpenAIError(status, "the request timed out", "timeout", None, "deadline_exceeded")
    elif status >= 500:
        error = OpenAIError(status, "internal server error", "server_error")
    else:
        error = OpenAIError(status, f"malformed HTTP request: {_reason(status, message)}")
    return orjson.dumps(error.body())


_ECHO = re.compile(r"(?::|\s)\s*(?:b'|b\"|bytearray\(|'|\").*", re.DOTALL)
"""Where aiohttp's parsers start quoting the client's bytes (b'...', bytearray(b'...'),
'GARBAGE'), on the message's first line; a caret diagram follows on lines of its own."""


_NAMED = re.compile(r"(?:Duplicate '[A-Za-z-]{1,40}' header found|Missing 'Host' header)")
"""aiohttp's reasons that quote a header's name (one of its singleton headers), not the
client's bytes: kept whole (cut at the quote, they said only "Duplicate" or "Missing")."""


def _reason(status: int, message: str | None) -> str:
    """aiohttp's reason without the client's bytes it quotes (never echoed back)."""
    first = (message or "").strip().split("\n", 1)[0]
    if named := _NAMED.match(first):
        return named.group(0)
    reason = _ECHO.sub("", first).strip().rstrip(":").strip()[:200]
    return reason or HTTPStatus(status).phrase


class _JSONErrorHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if output began
        resp = web.Response(
            status=status, body=error_body(status, message), content_type="application/json"
        )
        resp.force_close()
        return resp


class _JSONErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        # As web.Server.__call__, with our handler class (and without its fallback for
        # handler arguments RequestHandler refuses: ours are fixed in code, and tested).
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


def answer_errors_in_json(runner: web.AppRunner) -> None:
    """Make a set-up runner's server answer its own errors in JSON (before its sites start:
    connections opened earlier keep aiohttp's handler)."""
    server = runner.server
    if server is None:
        raise RuntimeError("the runner is not set up")
    if type(server) is web.Server:
        server.__class__ = _JSONErrorServer
