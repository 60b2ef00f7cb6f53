"""Tenants, their quotas, and API-key authentication; plus the admission config file.

API keys are never stored: the config holds ``HMAC-SHA256(secret, key)`` hex digests, so a
leaked config does not leak keys, and the secret alone does not either. The secret comes from
the environment variable ``BREAKWATER_KEY_SECRET`` (preferred: keep it out of files) or else
from ``key_secret`` in the config file. Make a digest for the config with::

    BREAKWATER_KEY_SECRET=... python -m gateway.admission.tenants hash-key KEY   # or - for stdin
    BREAKWATER_KEY_SECRET=... python -m gateway.admission.tenants new-key        # random key

Config file (TOML, or JSON with the same shape; every section and field is optional)::

    key_secret = "..."              # BREAKWATER_KEY_SECRET wins over this

    [global]                        # the whole gateway (cluster-wide with Redis)
    max_in_flight = 256             # admitted requests at once; absent: from the fleet
                                    # (each replica's batch slots, adapted to its TTFT)
    max_queue = 1024                # waiting for a slot, beyond that 503 at once; absent:
                                    # what will start within its wait budget (adaptive.py)
    max_queue_wait_s = 30           # longest wait in the queue before 503
    requests_per_second = 500       # rates are unlimited when absent
    request_burst = 1000            # defaults to one second's worth (at least 1)
    tokens_per_second = 400000      # LLM tokens: prompt estimate + max_tokens
    token_burst = 800000

    [redis]                         # cluster-wide buckets (optional)
    url = "redis://host:6379/0"     # Admission(redis_url=...) wins over this
    prefix = "breakwater:admission:"
    fallback_share = 1.0            # share of each bucket a gateway uses alone while Redis is
                                    # down; 1/N for N gateways keeps the cluster-wide total
    socket_timeout_s = 0.05         # fail fast: a slow Redis means local buckets, not waiting
    op_timeout_s = 0.1              # one whole call
    probe_interval_s = 0.25         # after a failure, probe this often (doubling, up to 8x)

    [defaults]                      # any tenant's quota fields it does not set itself; also
    requests_per_second = 10        # the quota of the single "default" tenant used when no
    request_burst = 20              # keys are configured at all
    tokens_per_second = 20000
    token_burst = 40000
    max_concurrent = 16             # admitted or queued requests of the tenant at once
    priority = "interactive"        # or "batch" (0 / 1); requests may ask for another

    [tenants.acme]
    key_digests = ["<64 hex>", "<64 hex>"]   # several keys allow rotation
    requests_per_second = 50
    priority = "batch"
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proto.openai_compat import OpenAIError

KEY_SECRET_ENV = "BREAKWATER_KEY_SECRET"
DEFAULT_TENANT = "default"
PRIORITY_INTERACTIVE = 0
PRIORITY_BATCH = 1
PRIORITIES = {"interactive": PRIORITY_INTERACTIVE, "batch": PRIORITY_BATCH}
DEFAULT_REDIS_PREFIX = "breakwater:admission:"
REDIS_SOCKET_TIMEOUT_S = 0.05
"""Per connect and per reply; Redis on the same network answers in well under 1 ms."""
REDIS_OP_TIMEOUT_S = 0.1
"""One whole call (connect, EVALSHA, a script re-load after a Redis restart)."""
REDIS_PROBE_INTERVAL_S = 0.25
"""First probe this long after a failure, doubling up to 8x while Redis stays down."""

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Rates:
    """Token-bucket rates; ``None`` means unlimited. Bursts default to one second's worth."""

    requests_per_second: float | None = None
    request_burst: float | None = None
    tokens_per_second: float | None = None
    token_burst: float | None = None

    def __post_init__(self) -> None:
        for f in fields(Rates):
            v = getattr(self, f.name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{f.name} must be a positive number, got {v!r}")

    def request_bucket(self) -> tuple[float, float] | None:
        return _bucket(self.requests_per_second, self.request_burst)

    def token_bucket(self) -> tuple[float, float] | None:
        return _bucket(self.tokens_per_second, self.token_burst)


def _bucket(rate: float | None, burst: float | None) -> tuple[float, float] | None:
    if rate is None:
        return None
    return rate, burst if burst is not None else max(1.0, rate)


@dataclass(frozen=True)
class Quota(Rates):
    max_concurrent: int | None = None
    priority: int = PRIORITY_INTERACTIVE


@dataclass(frozen=True)
class GlobalLimits(Rates):
    max_in_flight: int | None = None
    """None: the sum of the replicas' adaptive limits (see adaptive.py)."""
    max_queue: int | None = None
    """None: queue what will start within its priority's wait budget."""
    max_queue_wait_s: float = 30.0


@dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota = field(default_factory=Quota)
    key_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class AdmissionSettings:
    """Everything admission needs; build by hand or with :func:`load_settings`."""

    tenants: tuple[Tenant, ...] = ()
    defaults: Quota = field(default_factory=Quota)
    global_limits: GlobalLimits = field(default_factory=GlobalLimits)
    key_secret: bytes | None = None
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    fallback_share: float = 1.0
    redis_socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S
    redis_op_timeout_s: float = REDIS_OP_TIMEOUT_S
    redis_probe_interval_s: float = REDIS_PROBE_INTERVAL_S

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tenant names")
        digests = [d for t in self.tenants for d in t.key_digests]
        if len(set(digests)) != len(digests):
            raise ValueError("the same key digest is listed for more than one tenant")
        if digests and not self.key_secret:
            raise ValueError(f"key digests are configured but no secret: set {KEY_SECRET_ENV}")
        if not 0 < self.fallback_share <= 1:
            raise ValueError("fallback_share must be in (0, 1]")


# --- digests -------------------------------------------------------------------------------


def hash_key(key: str, secret: bytes | str) -> str:
    """The hex HMAC-SHA256 digest of an API key, as stored in the config."""
    if isinstance(secret, str):
        secret = secret.encode()
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


class TenantDirectory:
    """Resolves an ``Authorization`` header to a tenant.

    Every configured digest is compared with ``hmac.compare_digest`` and the loop never stops
    early, so the time taken says nothing about which digest, or how much of one, matched.
    """

    def __init__(self, settings: AdmissionSettings) -> None:
        self._secret = settings.key_secret or b""
        self._digests: list[tuple[bytes, Tenant]] = [
            (bytes.fromhex(d), t) for t in settings.tenants for d in t.key_digests
        ]
        self.default: Tenant | None = (
            None if self._digests else Tenant(DEFAULT_TENANT, settings.defaults)
        )

    @property
    def keys_required(self) -> bool:
        return self.default is None

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant; raises a 401 ``OpenAIError`` for a missing or bad key."""
        if self.default is not None:
            return self.default
        key = bearer_token(authorization)
        if key is None:
            raise OpenAIError(
                401,
                "You didn't provide an API key. Provide it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY).",
                type_="invalid_request_error",
                code="invalid_api_key",
            )
        presented = hmac.new(self._secret, key.encode(), hashlib.sha256).digest()
        found: Tenant | None = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(digest, presented):
                found = tenant
        if found is None:
            raise OpenAIError(
                401,
                "Incorrect API key provided.",
                type_="invalid_request_error",
                code="invalid_api_key",
            )
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The key of ``Bearer <key>`` (scheme case-insensitive), else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


# --- config file ---------------------------------------------------------------------------


def load_settings(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> AdmissionSettings:
    """Read a TOML (or ``.json``) config; ``None`` gives defaults. Raises ``ValueError``."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        raw = p.read_bytes()
        try:
            data = json.loads(raw) if p.suffix.lower() == ".json" else tomllib.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p}: the config must be a table/object")
    return settings_from_dict(data, env)


def settings_from_dict(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> AdmissionSettings:
    env = os.environ if env is None else env
    _only(data, "config", {"key_secret", "global", "redis", "defaults", "tenants"})
    secret_text = env.get(KEY_SECRET_ENV) or data.get("key_secret")
    if secret_text is not None and not isinstance(secret_text, str):
        raise ValueError("key_secret must be a string")
    redis = _table(data, "redis")
    _only(
        redis,
        "redis",
        {"url", "prefix", "fallback_share", "socket_timeout_s", "op_timeout_s", "probe_interval_s"},
    )
    defaults = _quota(_table(data, "defaults"), Quota(), "defaults")
    tenants_table = _table(data, "tenants")
    tenants = []
    for name, body in tenants_table.items():
        if not _NAME.match(name):
            raise ValueError(f"tenant name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        if not isinstance(body, Mapping):
            raise ValueError(f"tenants.{name} must be a table")
        raw = body.get("key_digests", [])
        if not isinstance(raw, list) or not all(isinstance(d, str) for d in raw):
            raise ValueError(f"tenants.{name}.key_digests must be a list of strings")
        digests = tuple(d.strip().lower() for d in raw)
        for d in digests:
            if not _DIGEST.match(d):
                raise ValueError(
                    f"tenants.{name}.key_digests: {d[:12]!r}... is not a 64-hex-digit digest "
                    "(store digests from `python -m gateway.admission.tenants hash-key`, "
                    "not keys)"
                )
        quota_fields = {k: v for k, v in body.items() if k != "key_digests"}
        tenants.append(Tenant(name, _quota(quota_fields, defaults, f"tenants.{name}"), digests))
    glob = _table(data, "global")
    limits = GlobalLimits(
        **_rates(glob, "global", {"max_in_flight", "max_queue", "max_queue_wait_s"}),
        max_in_flight=_opt_int(glob, "max_in_flight", "global", 1),
        max_queue=_opt_int(glob, "max_queue", "global", 0),
        max_queue_wait_s=_num(glob, "max_queue_wait_s", "global") or GlobalLimits.max_queue_wait_s,
    )
    url = redis.get("url")
    prefix = redis.get("prefix", DEFAULT_REDIS_PREFIX)
    if (url is not None and not isinstance(url, str)) or not isinstance(prefix, str):
        raise ValueError("redis.url and redis.prefix must be strings")
    return AdmissionSettings(
        tenants=tuple(tenants),
        defaults=defaults,
        global_limits=limits,
        key_secret=secret_text.encode() if secret_text else None,
        redis_url=url,
        redis_prefix=prefix,
        fallback_share=_num(redis, "fallback_share", "redis") or 1.0,
        redis_socket_timeout_s=_num(redis, "socket_timeout_s", "redis") or REDIS_SOCKET_TIMEOUT_S,
        redis_op_timeout_s=_num(redis, "op_timeout_s", "redis") or REDIS_OP_TIMEOUT_S,
        redis_probe_interval_s=_num(redis, "probe_interval_s", "redis") or REDIS_PROBE_INTERVAL_S,
    )


_RATE_FIELDS = {f.name for f in fields(Rates)}


def _table(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    v = data.get(name, {})
    if not isinstance(v, Mapping):
        raise ValueError(f"[{name}] must be a table")
    return v


def _only(data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(allowed)}")


def _num(data: Mapping[str, Any], name: str, where: str) -> float | None:
    v = data.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where}.{name} must be a positive number, got {v!r}")
    return float(v)


def _int(data: Mapping[str, Any], name: str, where: str, lo: int, default: int = 0) -> int:
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{where}.{name} must be an integer >= {lo}, got {v!r}")
    return v


def _opt_int(data: Mapping[str, Any], name: str, where: str, lo: int) -> int | None:
    return None if data.get(name) is None else _int(data, name, where, lo)


def _rates(data: Mapping[str, Any], where: str, extra: set[str]) -> dict[str, float | None]:
    _only(data, where, _RATE_FIELDS | extra)
    out = {name: _num(data, name, where) for name in _RATE_FIELDS if name in data}
    for rate, burst in (
        ("requests_per_second", "request_burst"),
        ("tokens_per_second", "token_burst"),
    ):
        if burst in data and rate not in data:
            raise ValueError(f"{where}.{burst} is set without {where}.{rate}")
    return out


def _quota(data: Mapping[str, Any], base: Quota, where: str) -> Quota:
    rates = _rates(data, where, {"max_concurrent", "priority"})
    # A tenant that sets a rate without its burst gets the default burst for that rate,
    # not the [defaults] burst (which was sized for another rate).
    if "requests_per_second" in rates and "request_burst" not in rates:
        rates["request_burst"] = None
    if "tokens_per_second" in rates and "token_burst" not in rates:
        rates["token_burst"] = None
    changes: dict[str, Any] = dict(rates)
    if "max_concurrent" in data:
        changes["max_concurrent"] = _int(data, "max_concurrent", where, 1)
    if "priority" in data:
        changes["priority"] = parse_priority(data["priority"], f"{where}.priority")
    return replace(base, **changes)


def _rate_share(r: Rates, processes: int, shared: bool) -> dict[str, float | None]:
    if shared or processes <= 1:  # Redis buckets are cluster-wide: nothing to divide
        return {}
    return {
        f.name: (None if getattr(r, f.name) is None else getattr(r, f.name) / processes)
        for f in fields(Rates)
    }


def quota_share(q: Quota, processes: int, shared_rates: bool) -> Quota:
    """One process's share of a tenant's quota (see `per_process`)."""
    if processes <= 1:
        return q
    n = q.max_concurrent
    concurrent = None if n is None else max(1, math.ceil(n / processes))
    return replace(q, max_concurrent=concurrent, **_rate_share(q, processes, shared_rates))


def quota_from_fields(data: object, base: Quota, where: str) -> Quota:
    """`base` with the quota fields in `data` (a tenant's table; null rates: unlimited);
    ValueError names what is wrong. Used by the config file and the admin API alike."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object of quota fields")
    return _quota(data, base, where)


def per_process(settings: AdmissionSettings, processes: int) -> AdmissionSettings:
    """One of `processes` gateway processes' share of the limits, so that together they
    admit what one process would: concurrency and queue bounds always (they are counted in
    each process), token-bucket rates only when they are local (without Redis they are
    per process; with it they are shared, and only the fallback used while Redis is down
    is local)."""
    if processes <= 1:
        return settings

    def share(n: int | None) -> int | None:
        return None if n is None else max(1, math.ceil(n / processes))

    def rates(r: Rates) -> dict[str, float | None]:
        return _rate_share(r, processes, bool(settings.redis_url))

    def quota(q: Quota) -> Quota:
        return quota_share(q, processes, bool(settings.redis_url))

    g = settings.global_limits
    return replace(
        settings,
        tenants=tuple(replace(t, quota=quota(t.quota)) for t in settings.tenants),
        defaults=quota(settings.defaults),
        global_limits=replace(
            g,
            max_in_flight=share(g.max_in_flight),
            max_queue=None if g.max_queue is None else math.ceil(g.max_queue / processes),
            **rates(g),
        ),
        fallback_share=settings.fallback_share / processes
        if settings.redis_url
        else settings.fallback_share,
    )


def parse_priority(value: object, where: str = "priority") -> int:
    if isinstance(value, str) and value in PRIORITIES:
        return PRIORITIES[value]
    if value in (PRIORITY_INTERACTIVE, PRIORITY_BATCH) and not isinstance(value, bool):
        return int(value)  # type: ignore[call-overload]
    raise ValueError(f"{where} must be 'interactive' (0) or 'batch' (1), got {value!r}")


# --- CLI -----------------------------------------------------------------------------------


def _secret_for_cli(config: str | None) -> bytes:
    secret = os.environ.get(KEY_SECRET_ENV)
    if not secret and config:
        try:
            loaded = load_settings(config).key_secret
        except (OSError, ValueError) as e:
            raise SystemExit(f"{config}: {e}") from None
        secret = loaded.decode() if loaded else None
    if not secret:
        raise SystemExit(f"no secret: set {KEY_SECRET_ENV} (or pass --config with key_secret)")
    return secret.encode()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gateway.admission.tenants",
        description=f"API key digests for the admission config (secret from {KEY_SECRET_ENV}).",
    )
    p.add_argument("--config", help="read key_secret from this config if the env var is unset")
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hash-key", help="print the digest of KEY, for key_digests")
    h.add_argument("key", nargs="?", default="-", help="the API key, or - to read stdin")
    sub.add_parser("new-key", help="print a new random key and its digest")
    args = p.parse_args(argv)
    secret = _secret_for_cli(args.config)
    if args.cmd == "hash-key":
        key = sys.stdin.readline().strip() if args.key == "-" else args.key
        if not key:
            raise SystemExit("empty key")
        print(hash_key(key, secret))
    else:
        key = "bw-" + secrets.token_urlsafe(32)
        print(f"key:    {key}\ndigest: {hash_key(key, secret)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
