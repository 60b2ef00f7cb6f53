"""The gateway's OpenAI HTTP front end: the shared OpenAI routes over the dispatcher,
behind the gateway's admission (tenants, quotas, the bounded queue)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.admission.admission import Admission, Ticket, estimate_tokens
from proto.openai_compat import ParsedRequest
from serving.openai_http import Backend, OpenAIRoutes


class HTTPAdmission:
    """Admits an HTTP request; raises OpenAIError (401/429/503/504) to refuse it."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def __call__(
        self, request: web.Request, body: dict[str, Any], parsed: ParsedRequest, deadline: float
    ) -> Ticket | None:
        req = parsed.request
        which = req.WhichOneof("prompt")
        if which == "chat":
            prompt: str | list[int] = "".join(m.content for m in req.chat.messages)
        elif which == "token_ids":
            prompt = list(req.token_ids.ids)
        else:
            prompt = req.text
        max_tokens = req.sampling.max_tokens if req.sampling.HasField("max_tokens") else 256
        priority = int(req.priority) if body.get("priority") is not None else None
        return await self.admission.admit(
            request.headers.get("Authorization"),
            estimate_tokens(prompt, max_tokens),
            priority,
            deadline,
        )


def gateway_routes(
    backend: Backend, default_timeout_s: float, max_timeout_s: float, admission: Admission
) -> OpenAIRoutes:
    return OpenAIRoutes(backend, default_timeout_s, max_timeout_s, HTTPAdmission(admission))
