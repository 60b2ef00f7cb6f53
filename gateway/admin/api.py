"""The admin listener: the fleet as this gateway sees it, and operator actions on it.

Served on its own port (`--admin-port`), never on the public one, and only to a caller
holding the admin token (`--admin-token`): no token, or a wrong one, is 401; a tenant's API
key is 403, so a tenant cannot reach it even by accident. Errors have OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.admin.overrides import STATES, Action, Overrides
from proto.openai_compat import OpenAIError
from serving.openai_http import error_response, json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DASHBOARD = Path(__file__).with_name("dashboard.html")
CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
"""The page loads nothing from elsewhere: its script and style are inline."""


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
        served_models: Callable[[], set[str]] = set,
        changed: Callable[[], None] = lambda: None,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        self._token = token.encode() if token else None
        self.overrides = overrides
        self._view = view
        self._known = known_workers
        self._is_tenant_key = is_tenant_key
        self._served = served_models
        self._changed = changed
        """Called after a change, to tell the gateway's other processes at once."""
        self._metrics = metrics

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/admin/dashboard", self.dashboard)
        app.router.add_get("/admin/metrics", self.metrics)
        app.router.add_get("/admin/workers", self.workers)
        app.router.add_post("/admin/workers/{worker_id}/{action}", self.act)
        app.router.add_get("/admin/audit", self.audit)
        app.router.add_get("/admin/splits", self.splits)
        app.router.add_put("/admin/splits/{model}", self.put_split)
        app.router.add_delete("/admin/splits/{model}", self.delete_split)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/admin/dashboard":  # a static page; its data calls need the token
            return await handler(request)
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

    async def dashboard(self, request: web.Request) -> web.Response:
        """The operators' page: open it as /admin/dashboard#token=<admin token>."""
        return web.Response(
            body=DASHBOARD.read_bytes(),
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Content-Security-Policy": CSP},
        )

    async def metrics(self, request: web.Request) -> web.Response:
        """The gateway's merged metrics, for the dashboard (same text as /metrics)."""
        body = await asyncio.to_thread(self._metrics) if self._metrics else b""
        return web.Response(body=body, content_type="text/plain")

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
        self._changed()
        return json_response({"ok": True, **entry, "state": self.overrides.states.get(worker_id)})

    async def splits(self, request: web.Request) -> web.Response:
        return json_response({m: s.weights for m, s in self.overrides.splits.items()})

    async def put_split(self, request: web.Request) -> web.Response:
        """Canary (`{"weights": {"m-v1": 90, "m-v2": 10}}`), blue-green (one version at 100)."""
        model = request.match_info["model"]
        try:
            body = await request.json()
            weights = body["weights"]
            assert isinstance(weights, dict) and weights
            weights = {str(m): float(w) for m, w in weights.items()}
        except Exception:
            return error_response(
                OpenAIError(
                    400, 'expected {"weights": {"<model version>": <weight>, ...}}', param="weights"
                )
            )
        if any(not (w >= 0) or w == float("inf") for w in weights.values()) or not any(
            w > 0 for w in weights.values()
        ):
            return error_response(
                OpenAIError(400, "weights must be finite, >= 0, and not all 0", param="weights")
            )
        unknown = sorted(set(weights) - self._served())
        if unknown:
            return error_response(
                OpenAIError(400, f"no worker serves {', '.join(unknown)}", param="weights")
            )
        return await self._set(request, model, weights)

    async def delete_split(self, request: web.Request) -> web.Response:
        """Rollback: requests for the model go to the model itself again."""
        return await self._set(request, request.match_info["model"], None)

    async def _set(
        self, request: web.Request, model: str, weights: dict[str, float] | None
    ) -> web.Response:
        who = request.headers.get("X-Operator") or request.remote or "unknown"
        try:
            entry = await self.overrides.set_split(model, weights, who)
        except Exception as e:
            return error_response(OpenAIError(503, f"the change was not saved: {e}"))
        self._changed()
        return json_response({"ok": True, **entry})

    async def audit(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return error_response(OpenAIError(400, "'limit' must be an integer", param="limit"))
        return json_response({"entries": await self.overrides.store.audit(limit)})


__all__ = ["Action", "AdminAPI"]
