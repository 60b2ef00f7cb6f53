"""The admin listener: the fleet as this gateway sees it, and operator actions on it.

Served on its own port (`--admin-port`), never on the public one, and only to a caller
holding the admin token (`--admin-token`): no token, or a wrong one, is 401; a tenant's API
key is 403, so a tenant cannot reach it even by accident. Errors have OpenAI's JSON shape.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.admin.overrides import STATES, Action, Overrides
from proto.openai_compat import OpenAIError
from serving.openai_http import error_response, json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


class AdminAPI:
    def __init__(
        self,
        token: str | None,
        overrides: Overrides,
        view: Callable[[], dict[str, Any]],
        known_workers: Callable[[], set[str]],
        is_tenant_key: Callable[[str | None], bool],
    ) -> None:
        self._token = token.encode() if token else None
        self.overrides = overrides
        self._view = view
        self._known = known_workers
        self._is_tenant_key = is_tenant_key

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/admin/workers", self.workers)
        app.router.add_post("/admin/workers/{worker_id}/{action}", self.act)
        app.router.add_get("/admin/audit", self.audit)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        presented = _bearer(header)
        if self._token is None:
            return error_response(
                OpenAIError(401, "no admin token is configured on this gateway (--admin-token)")
            )
        if presented is not None and hmac.compare_digest(presented.encode(), self._token):
            return await handler(request)
        if presented is not None and self._is_tenant_key(header):
            return error_response(
                OpenAIError(403, "a tenant's API key cannot use the admin API", "permission_error")
            )
        return error_response(
            OpenAIError(401, "the admin API needs the admin token (Authorization: Bearer ...)")
        )

    async def workers(self, request: web.Request) -> web.Response:
        view = self._view()
        for w in view["workers"]:
            w["admin"] = self.overrides.states.get(w["worker_id"])
        return json_response(view)

    async def act(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        action = request.match_info["action"]
        if action not in STATES:
            return error_response(
                OpenAIError(404, f"unknown action {action!r}; one of {', '.join(STATES)}")
            )
        if worker_id not in self._known() and worker_id not in self.overrides.states:
            return error_response(OpenAIError(404, f"no worker {worker_id!r}", param="worker_id"))
        who = request.headers.get("X-Operator") or request.remote or "unknown"
        try:
            entry = await self.overrides.act(action, worker_id, who)  # type: ignore[arg-type]
        except Exception as e:  # the shared store is unreachable: say so, change nothing
            return error_response(OpenAIError(503, f"the change was not saved: {e}"))
        return json_response({"ok": True, **entry, "state": self.overrides.states.get(worker_id)})

    async def audit(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return error_response(OpenAIError(400, "'limit' must be an integer", param="limit"))
        return json_response({"entries": await self.overrides.store.audit(limit)})


__all__ = ["Action", "AdminAPI"]
