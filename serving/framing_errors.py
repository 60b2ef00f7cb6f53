"""aiohttp's own error answers (a request it cannot parse, a handler that raised) as
OpenAI-style JSON, like every other error an OpenAI client hears from us.

aiohttp answers a request it cannot frame (a bad request line, an invalid header, a head
past its size limits, a malformed Content-Length) from its `RequestHandler.handle_error`,
in plain text, before any route or middleware runs (`openai_http.json_errors` rewrites
its 404 and 405, which do reach the middleware); an OpenAI SDK then reports the body as
unreadable instead of the reason. aiohttp offers no hook for this, so the
server's handler class is replaced by a subclass that keeps aiohttp's status, message,
logging and connection close and changes only the body. Parsing errors are the client's
(4xx, `invalid_request_error`, aiohttp's reason as the message); a 500 says nothing more
than that, as aiohttp's own does without debug.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proto.openai_compat import OpenAIError


def error_body(status: int, message: str | None) -> bytes:
    """The OpenAI error body for one of aiohttp's error answers."""
    if status >= 500:
        error = OpenAIError(status, "internal server error", "server_error")
    else:
        # aiohttp's parser adds the offending bytes, on lines of their own or after ": b'":
        # the reason is enough, and the client's bytes are not echoed.
        first = (message or "").strip().split("\n", 1)[0].split(": b'", 1)[0]
        first = first.strip().rstrip(":")
        reason = first or HTTPStatus(status).phrase
        error = OpenAIError(status, f"malformed HTTP request: {reason}")
    return orjson.dumps(error.body())


class _JSONErrorHandler(RequestHandler):
    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)  # logs; may raise
        if status < 500 and not message and isinstance(plain, web.Response) and plain.text:
            message = plain.text
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
