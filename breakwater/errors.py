"""Exceptions raised by the Breakwater client SDK.

Every failure is an `APIError` carrying what a caller needs to decide what to do next: the
HTTP status, the OpenAI error `type`/`code`/`param`, the `request_id` to quote in a bug
report and `retry_after` (seconds) when the server asked us to back off.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientThrottledError",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "StreamError",
    "UnprocessableEntityError",
]


class APIError(Exception):
    """Base of every SDK error. `status` is None when no HTTP status applies."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after
        self.body = body
        self.should_retry = should_retry
        """The server's word on retrying (`x-should-retry`); None when it said nothing."""

    def __str__(self) -> str:
        head = f"{self.status} " if self.status is not None else ""
        kind = f"{self.type}: " if self.type else ""
        rid = f" (request_id={self.request_id})" if self.request_id else ""
        return f"{head}{kind}{self.message}{rid}"


class BadRequestError(APIError):
    """400: the request is malformed; retrying it unchanged cannot help."""


class AuthenticationError(APIError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: unknown model or route."""


class ConflictError(APIError):
    """409."""


class UnprocessableEntityError(APIError):
    """422."""


class RateLimitError(APIError):
    """429: the gateway is shedding load; `retry_after` says when to come back."""


class ClientThrottledError(RateLimitError):
    """Rejected by the client itself, without touching the network: the gateway has been
    refusing most requests lately (adaptive throttling). `status` is None; back off as for a
    429."""


class InternalServerError(APIError):
    """5xx other than 503."""


class ServiceUnavailableError(APIError):
    """503: no healthy capacity right now; `retry_after` says when to come back."""


class APIConnectionError(APIError):
    """No complete HTTP answer: refused, reset, or the connection dropped mid-body."""


class APITimeoutError(APIConnectionError):
    """The call's deadline (`timeout`) ran out."""


class StreamError(APIError):
    """The server sent an error event after the stream had started (never retried)."""


STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class(status: int) -> type[APIError]:
    """The exception class for an HTTP status (500s fall back to InternalServerError)."""
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    return InternalServerError if status >= 500 else APIError


def error_fields(body: Any) -> dict[str, Any]:
    """The OpenAI error object in a JSON body (`{"error": {...}}` or `{"error": "..."}`)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return err
    return {"message": err} if isinstance(err, str) else {}
