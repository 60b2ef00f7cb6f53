"""The admin listener: the fleet as this gateway sees it, and operator actions on it.

Served on its own port (`--admin-port`), never on the public one, and only to a caller
holding the admin token (`--admin-token`): no token, or a wrong one, is 401; a tenant's API
key is 403, so a tenant cannot reach it even by accident. Errors have OpenAI's JSON shape,
hostile input included: a body is a JSON object of at most 1 MiB (413 past it, 400 when it
is not JSON), and every number is checked for type and range before use (400 naming it).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.admin.overrides import (
    KEY,
    QUOTA,
    SHADOW,
    STATES,
    UPSTREAM,
    WEIGHT,
    Action,
    Overrides,
    json_number,
)
from gateway.admission.admission import Admission
from gateway.admission.tenants import TenantDirectory, quota_from_fields
from gateway.registry.specs import check_address
from gateway.shadow import Shadows
from proto.openai_compat import OpenAIError
from serving.openai_http import (
    error_response,
    expect_continue,
    json_errors,
    json_response,
    too_large,
)
from serving.slow_clients import BODY_TIMEOUT_S

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DASHBOARD = Path(__file__).with_name("dashboard.html")
CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"
"""The page loads nothing from elsewhere: its script and style are inline."""
MAX_BODY_BYTES = 1 << 20
"""An admin call's body at most (aiohttp's own default, now refused as a JSON 413)."""
MAX_WEIGHT = 1000
"""A replica's routing weight, or a model version's in a split, at most."""
MAX_KEY_LIFETIME_S = 10 * 365 * 86400
"""`expires_in_s` at most (ten years): a longer-lived key is better made without expiry."""


def _bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


_ID = re.compile(r"[\x21-\x7e]{1,200}")


def _utf8(text: str) -> bytes:
    # aiohttp hands undecodable header bytes over as surrogates: a wrong token, not a crash
    return text.encode("utf-8", "surrogateescape")


def _not_saved(e: Exception) -> OpenAIError:
    """The store failed (Redis unreachable, --state-dir unwritable): the server's failure,
    retryable, not an error of the operator's request."""
    return OpenAIError(
        503, f"the change was not saved: {e}", "service_unavailable", None, "not_saved"
    )


def _who(request: web.Request) -> str:
    """The operator, for the audit log: their X-Operator header, else their address (bytes
    that are not UTF-8 replaced: a surrogate would make the answer and the audit log, once
    read back, unencodable as JSON)."""
    who = request.headers.get("X-Operator") or request.remote or "unknown"
    return _utf8(who).decode("utf-8", "replace")[:200]


async def _read_body(request: web.Request) -> bytes:
    """The body, refused with a JSON 413 past MAX_BODY_BYTES before more is held (read
    from the stream: `request.json()` bounds it with aiohttp's plain-text 413)."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise too_large(MAX_BODY_BYTES)
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for part in request.content.iter_chunked(64 * 1024):
                size += len(part)
                if size > MAX_BODY_BYTES:
                    raise too_large(MAX_BODY_BYTES)
                parts.append(part)
    except TimeoutError:
        raise OpenAIError(
            408,
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
            code="request_timeout",
        ) from None
    return b"".join(parts)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    """The body's JSON object, None for other JSON or none; raises OpenAIError (400) for a
    body that is not JSON. orjson refuses what the standard parser crashed on, or let through
    to fail later: nesting past 1024 (a RecursionError), numbers beyond a double, lone
    surrogates (which no JSON answer can carry back)."""
    raw = await _read_body(request)
    if not raw:  # the handler's own 400 says what it expected
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise OpenAIError(400, f"the request body is not valid JSON: {e}") from None
    return body if isinstance(body, dict) else None


@web.middleware
async def _refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A handler's OpenAIError (a body too large or not JSON) as its JSON answer."""
    try:
        return await handler(request)
    except OpenAIError as e:
        return error_response(e)


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
        *,
        admission: Admission | None = None,
        shadows: Shadows | None = None,
        fleet_workers: Callable[[], set[str]] = set,
    ) -> None:
        self._token = _utf8(token) if token else None
        self._fleet = fleet_workers
        """Ids the configuration or the registry (Redis) lists, removed ones included."""
        self.overrides = overrides
        self._view = view
        self._known = known_workers
        self._is_tenant_key = is_tenant_key
        self._served = served_models
        self._changed = changed
        """Called after a change, to tell the gateway's other processes at once."""
        self._metrics = metrics
        self._admission = admission
        self._shadows = shadows

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors, self._auth, _refusals])
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/admin/dashboard", self.dashboard),
            ("GET", "/admin/metrics", self.metrics),
            ("GET", "/admin/workers", self.workers),
            ("POST", "/admin/workers/{worker_id}/{action}", self.act),
            ("GET", "/admin/audit", self.audit),
            ("GET", "/admin/splits", self.splits),
            ("PUT", "/admin/splits/{model}", self.put_split),
            ("DELETE", "/admin/splits/{model}", self.delete_split),
            ("GET", "/admin/upstreams", self.upstreams),
            ("POST", "/admin/upstreams", self.register),
            ("DELETE", "/admin/upstreams/{worker_id:.+}", self.deregister),
            ("GET", "/admin/shadows", self.shadows),
            ("PUT", "/admin/shadows/{model}", self.put_shadow),
            ("DELETE", "/admin/shadows/{model}", self.delete_shadow),
            ("GET", "/admin/tenants", self.tenants),
            ("PUT", "/admin/tenants/{tenant}/quota", self.put_quota),
            ("DELETE", "/admin/tenants/{tenant}/quota", self.delete_quota),
            ("GET", "/admin/tenants/{tenant}/keys", self.list_keys),
            ("POST", "/admin/tenants/{tenant}/keys", self.create_key),
            ("DELETE", "/admin/tenants/{tenant}/keys/{key_id}", self.revoke_key),
        ]
        for method, path, handler in routes:
            # a GET also answers HEAD, as add_get does; an Expect is answered in JSON
            app.router.add_route(method, path, handler, expect_handler=expect_continue)
            if method == "GET":
                app.router.add_route("HEAD", path, handler, expect_handler=expect_continue)
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
        if presented is not None and hmac.compare_digest(_utf8(presented), self._token):
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
            w["weight"] = self.overrides.weights.get(w["worker_id"], 1.0)
            entry = self.overrides.upstreams.get(w["worker_id"])
            w["registered"] = "admin" if entry and "address" in entry else "config"
        return json_response(view)

    async def act(self, request: web.Request) -> web.Response:
        worker_id = request.match_info["worker_id"]
        action = request.match_info["action"]
        if action not in STATES and action != "weight":
            return error_response(
                OpenAIError(404, f"unknown action {action!r}; one of {', '.join(STATES)}, weight")
            )
        # a replica away for now may still hold an override: it can be cleared meanwhile
        held = worker_id in self.overrides.states or worker_id in self.overrides.weights
        if worker_id not in self._known() and not held:
            return error_response(OpenAIError(404, f"no worker {worker_id!r}", param="worker_id"))
        if action == "weight":
            return await self._weight(request, worker_id)
        who = _who(request)
        try:
            entry = await self.overrides.act(action, worker_id, who)  # type: ignore[arg-type]
        except Exception as e:  # the shared store is unreachable: say so, change nothing
            return error_response(_not_saved(e))
        self._changed()
        return json_response({"ok": True, **entry, "state": self.overrides.states.get(worker_id)})

    async def _weight(self, request: web.Request, worker_id: str) -> web.Response:
        """`{"weight": w}`: the replica's share of new requests relative to the others (1 by
        default, 0 for none, like a drain; up to 1000)."""
        body = await _json_object(request)
        weight = body.get("weight") if body is not None else None
        if not json_number(weight, 0, MAX_WEIGHT):
            return error_response(
                OpenAIError(
                    400, f'expected {{"weight": <number from 0 to {MAX_WEIGHT}>}}', param="weight"
                )
            )
        audit = {"action": "weight", "worker": worker_id, "weight": weight, "by": _who(request)}
        value = None if weight == 1 else float(weight)
        return await self._put(WEIGHT, worker_id, value, audit, weight=float(weight))

    async def _put(
        self, prefix: str, name: str, value: Any, audit: dict[str, Any], **extra: Any
    ) -> web.Response:
        try:
            entry = await self.overrides.put(prefix, name, value, audit)
        except Exception as e:  # the shared store is unreachable: say so, change nothing
            return error_response(_not_saved(e))
        self._changed()
        return json_response({"ok": True, **entry, **extra})

    # -- upstreams registered at run time ---------------------------------------------------

    async def upstreams(self, request: web.Request) -> web.Response:
        return json_response({"upstreams": self.overrides.upstreams})

    async def register(self, request: web.Request) -> web.Response:
        """`{"address": "host:port" | "grpc://..." | "http(s)://...", "worker_id": optional}`:
        a replica the gateway routes to from now on, health-checked like `--worker` ones."""
        body = await _json_object(request)
        if body is None:
            return error_response(
                OpenAIError(400, 'expected {"address": "...", "worker_id": "..."}', param="address")
            )
        try:
            address = check_address(body.get("address"))
        except ValueError as e:
            return error_response(OpenAIError(400, str(e), param="address"))
        worker_id = body.get("worker_id", address)
        if not isinstance(worker_id, str) or not _ID.fullmatch(worker_id):
            return error_response(
                OpenAIError(
                    400, "'worker_id' must be 1-200 printable characters", param="worker_id"
                )
            )
        current = self.overrides.upstreams.get(worker_id)
        if worker_id in self._known() and not (current and "address" in current):
            return error_response(
                OpenAIError(
                    409,
                    f"worker {worker_id!r} is already in the pool (from the configuration "
                    "or the registry); deregister it first or choose another worker_id",
                    "conflict_error",
                    param="worker_id",
                )
            )
        entry = {"address": address}
        audit = {"action": "register", "worker": worker_id, "address": address}
        audit["by"] = _who(request)
        return await self._put(UPSTREAM, worker_id, entry, audit, worker_id=worker_id)

    async def deregister(self, request: web.Request) -> web.Response:
        """The replica leaves routing at once (calls already on it finish: drain first to
        let them); a configured one stays out until registered again."""
        worker_id = request.match_info["worker_id"]
        current = self.overrides.upstreams.get(worker_id)
        if worker_id not in self._known() and not current:
            return error_response(OpenAIError(404, f"no worker {worker_id!r}", param="worker_id"))
        admin_added = bool(current and "address" in current)
        # One the fleet lists too (registered over it) stays out: deleting the entry
        # brought the fleet's own replica of that id back into routing.
        value = None if admin_added and worker_id not in self._fleet() else {"removed": True}
        audit = {"action": "deregister", "worker": worker_id, "by": _who(request)}
        return await self._put(UPSTREAM, worker_id, value, audit, worker_id=worker_id)

    # -- shadow traffic ---------------------------------------------------------------------

    async def shadows(self, request: web.Request) -> web.Response:
        """The shadows set, and how this process's mirrors compared."""
        view = self._shadows.view() if self._shadows else {"shadows": self.overrides.shadows}
        return json_response(view)

    async def put_shadow(self, request: web.Request) -> web.Response:
        """`{"target": "<version>", "percent": p}`: mirror p% of the model's requests to the
        version, compare the answers, never return the shadow's."""
        model = request.match_info["model"]
        body = await _json_object(request)
        target = body.get("target") if body else None
        percent = body.get("percent") if body else None
        if not isinstance(target, str) or target not in self._served():
            return error_response(
                OpenAIError(400, "'target' must be a model version a worker serves", param="target")
            )
        if target == model:
            return error_response(
                OpenAIError(400, "'target' must differ from the model it shadows", param="target")
            )
        if not json_number(percent, 0, 100) or percent == 0:
            return error_response(
                OpenAIError(400, "'percent' must be a number in (0, 100]", param="percent")
            )
        entry = {"target": target, "percent": float(percent)}
        audit = {"action": "shadow", "model": model, **entry, "by": _who(request)}
        return await self._put(SHADOW, model, entry, audit)

    async def delete_shadow(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.overrides.shadows:
            return error_response(OpenAIError(404, f"no shadow for {model!r}", param="model"))
        audit = {"action": "unshadow", "model": model, "by": _who(request)}
        return await self._put(SHADOW, model, None, audit)

    # -- tenants' quotas --------------------------------------------------------------------

    async def tenants(self, request: web.Request) -> web.Response:
        """Each tenant's quota for the whole gateway (config, or set here), and whether an
        operator set it."""
        if self._admission is None:
            return json_response({"tenants": {}})
        quotas = self._admission.tenant_quotas()
        return json_response(
            {
                "tenants": {
                    name: {
                        "quota": {k: v for k, v in asdict(q).items() if v is not None},
                        "set_by_admin": name in self.overrides.quotas,
                        "active": self._admission.active(name),
                    }
                    for name, q in quotas.items()
                }
            }
        )

    async def put_quota(self, request: web.Request) -> web.Response:
        """Quota fields as in the config file's `[tenants.<name>]` (rates, bursts,
        max_concurrent, priority, isolate_cache; null: unlimited), over the configured
        quota; the whole gateway's figures (each process takes its share)."""
        tenant = request.match_info["tenant"]
        if self._admission is None or tenant not in self._admission.tenant_quotas():
            return error_response(OpenAIError(404, f"no tenant {tenant!r}", param="tenant"))
        body = await _json_object(request)
        base = next(
            (t.quota for t in self._admission.configured.tenants if t.name == tenant),
            self._admission.configured.defaults,
        )
        try:
            quota_from_fields(body, base, "quota")
        except ValueError as e:
            return error_response(OpenAIError(400, str(e), param="quota"))
        assert body is not None
        audit = {"action": "quota", "tenant": tenant, "quota": body, "by": _who(request)}
        return await self._put(QUOTA, tenant, body, audit)

    async def delete_quota(self, request: web.Request) -> web.Response:
        """Back to the configured quota."""
        tenant = request.match_info["tenant"]
        if tenant not in self.overrides.quotas:
            return error_response(
                OpenAIError(404, f"no quota set at run time for {tenant!r}", param="tenant")
            )
        audit = {"action": "unquota", "tenant": tenant, "by": _who(request)}
        return await self._put(QUOTA, tenant, None, audit)

    # -- tenants' API keys -------------------------------------------------------------------

    def _directory(self, request: web.Request) -> TenantDirectory | web.Response:
        """The tenants' keys, or a 404 when the URL names no tenant of this gateway."""
        tenant = request.match_info["tenant"]
        if self._admission is None or not self._admission.tenants.has_tenant(tenant):
            return error_response(OpenAIError(404, f"no tenant {tenant!r}", param="tenant"))
        return self._admission.tenants

    async def list_keys(self, request: web.Request) -> web.Response:
        """The tenant's keys: ids, when made, when they expire, whether revoked; never a
        secret or a digest."""
        directory = self._directory(request)
        if isinstance(directory, web.Response):
            return directory
        now = time.time()
        keys = directory.keys_of(request.match_info["tenant"])
        return json_response({"keys": [k.view(now) for k in keys]})

    async def create_key(self, request: web.Request) -> web.Response:
        """A new key for the tenant, `{"expires_in_s": N}` optional: the answer is the only
        place the key is ever shown (only its digest is stored). Rotation: make the new key,
        move clients to it, then revoke the old one; both work in between."""
        directory = self._directory(request)
        if isinstance(directory, web.Response):
            return directory
        tenant = request.match_info["tenant"]
        body = await _json_object(request) if request.can_read_body else {}
        if body is None or set(body) - {"expires_in_s"}:
            return error_response(OpenAIError(400, 'expected {} or {"expires_in_s": <seconds>}'))
        expires_in = body.get("expires_in_s")
        if expires_in is not None and (
            not json_number(expires_in, 0, MAX_KEY_LIFETIME_S) or expires_in == 0
        ):
            return error_response(
                OpenAIError(
                    400,
                    f"'expires_in_s' must be a positive number of seconds, at most "
                    f"{MAX_KEY_LIFETIME_S} (ten years; omit it for a key that never expires)",
                    param="expires_in_s",
                )
            )
        if not directory.can_make_keys:
            return error_response(
                OpenAIError(
                    409,
                    "this gateway has no key secret to digest keys with: set "
                    "BREAKWATER_KEY_SECRET (the same on every gateway) or key_secret in the "
                    "admission config",
                    "conflict_error",
                )
            )
        key, key_id, digest = directory.new_key()
        now = time.time()
        expires_at = None if expires_in is None else now + float(expires_in)
        entry = {
            "tenant": tenant,
            "digest": digest,
            "created_at": now,
            "expires_at": expires_at,
            "revoked": False,
        }
        audit = {"action": "key_create", "tenant": tenant, "key_id": key_id}
        audit |= {"expires_at": expires_at, "by": _who(request)}
        response = await self._put(KEY, key_id, entry, audit, key=key)
        response.headers["Cache-Control"] = "no-store"  # it carries the key
        return response

    async def revoke_key(self, request: web.Request) -> web.Response:
        """The key stops working at once in every process (and every gateway on the same
        Redis, within a poll); it stays listed as revoked, so the tenant never goes keyless."""
        directory = self._directory(request)
        if isinstance(directory, web.Response):
            return directory
        tenant, key_id = request.match_info["tenant"], request.match_info["key_id"]
        found = directory.key(key_id)
        if found is None or found.tenant != tenant:
            return error_response(
                OpenAIError(404, f"no key {key_id!r} of tenant {tenant!r}", param="key_id")
            )
        if found.revoked:
            return json_response({"ok": True, "key_id": key_id, "revoked": True})
        entry = {
            "tenant": tenant,
            "created_at": found.created_at,
            "expires_at": found.expires_at,
            "revoked": True,
            "revoked_at": time.time(),
        }
        audit = {"action": "key_revoke", "tenant": tenant, "key_id": key_id, "by": _who(request)}
        if getattr(self.overrides.store, "durable", True):
            return await self._put(KEY, key_id, entry, audit, revoked=True)
        # Kept in this run's temporary directory only: a key from the admission config
        # would work again after a restart, silently. Say so where the operator looks.
        warning = (
            "revoked until this gateway stops: without --redis-url or --state-dir nothing "
            "it changes outlives it; remove the key from the admission config too"
        )
        return await self._put(
            KEY, key_id, entry, audit, revoked=True, durable=False, warning=warning
        )

    async def splits(self, request: web.Request) -> web.Response:
        return json_response({m: s.weights for m, s in self.overrides.splits.items()})

    async def put_split(self, request: web.Request) -> web.Response:
        """Canary (`{"weights": {"m-v1": 90, "m-v2": 10}}`), blue-green (one version at 100)."""
        model = request.match_info["model"]
        body = await _json_object(request)
        raw = body.get("weights") if body is not None else None
        if not isinstance(raw, dict) or not raw:
            return error_response(
                OpenAIError(
                    400, 'expected {"weights": {"<model version>": <weight>, ...}}', param="weights"
                )
            )
        # numbers only (not true, not "1e3"), each bounded so that their sum stays finite:
        # an infinite total made the round-robin go 999 to 1 instead of half and half
        bad = next((m for m, w in raw.items() if not json_number(w, 0, MAX_WEIGHT)), None)
        if bad is not None:
            return error_response(
                OpenAIError(
                    400,
                    f"the weight of {bad[:100]!r} must be a number from 0 to {MAX_WEIGHT}",
                    param="weights",
                )
            )
        if not any(w > 0 for w in raw.values()):
            return error_response(OpenAIError(400, "every weight is 0", param="weights"))
        weights = {m: float(w) for m, w in raw.items()}
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
        who = _who(request)
        try:
            entry = await self.overrides.set_split(model, weights, who)
        except Exception as e:
            return error_response(_not_saved(e))
        self._changed()
        return json_response({"ok": True, **entry})

    async def audit(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return error_response(OpenAIError(400, "'limit' must be an integer", param="limit"))
        return json_response({"entries": await self.overrides.store.audit(limit)})


__all__ = ["Action", "AdminAPI"]
