"""Tenants, their quotas, and API-key authentication; plus the admission config file.

API keys are never stored, only ``HMAC-SHA256(secret, ...)`` hex digests, so a leaked config
or admin store does not leak keys, and the secret alone does not either. The secret comes from
the environment variable ``BREAKWATER_KEY_SECRET`` (preferred: keep it out of files) or else
from ``key_secret`` in the config file; gateways sharing a Redis must share it too.

Keys look like ``bw_<id>.<secret>``: the id (12 base62 characters) is public and names the
key in logs and the audit; the secret (32 random bytes, base64url) is digested alone. A key
is found by its id in one dict lookup, then its digest compared with ``hmac.compare_digest``;
keys can also be made, listed and revoked at run time (admin API, `set_runtime_keys`). Keys
of any other shape are the older kind: ``key_digests`` holds the digest of the whole key, and
every one of them is compared. Make keys for the config with::

    BREAKWATER_KEY_SECRET=... python -m gateway.admission.tenants new-key --tenant acme
    BREAKWATER_KEY_SECRET=... python -m gateway.admission.tenants hash-key KEY  # an old key

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
    tokens_per_second = 400000      # LLM tokens: prompt estimate + max_tokens, settled
                                    # with the usage once the answer ends
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
    isolate_cache = true            # prefix-cache hits only on the tenant's own prompts
                                    # (else `cached_tokens` and a fast first token tell a
                                    # tenant what another sent); default false

    [tenants.acme]
    keys = [{id = "<12 base62>", digest = "<64 hex>"}]  # from new-key; optional expires_at
                                             # (Unix seconds); several keys allow rotation
    key_digests = ["<64 hex>", "<64 hex>"]   # older keys: digests of the whole key
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
import string
import sys
import time
import tomllib
from collections.abc import Container, Mapping, Sequence
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
KEY_PREFIX = "bw_"
KEY_ID_LENGTH = 12
"""62^12, about 71 bits: ids never collide in practice, and are checked anyway."""
KEY_SECRET_BYTES = 32
_ID_ALPHABET = string.ascii_letters + string.digits
_KEY_ID = re.compile(f"[A-Za-z0-9]{{{KEY_ID_LENGTH}}}")
MIN_RATE, MAX_RATE = 1e-6, 1e15
"""Any rate, burst or duration in the config or set at run time, at least and at most: far
past any real one either way, and its arithmetic stays finite (a rate of 5e-324 became 0 in
a process's share, and a wait divided by a tiny rate an infinite Retry-After)."""
MAX_COUNT = 1_000_000
"""max_concurrent, max_in_flight and max_queue at most (a huge integer overflowed dividing
it among processes, and broke every later admin change in them)."""


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
    isolate_cache: bool = False
    """The tenant's prompts share prefix-cache blocks with no other tenant's (its requests
    carry its own `cache_salt`, see TenantDirectory.cache_salt)."""


@dataclass(frozen=True)
class GlobalLimits(Rates):
    max_in_flight: int | None = None
    """None: the sum of the replicas' adaptive limits (see adaptive.py)."""
    max_queue: int | None = None
    """None: queue what will start within its priority's wait budget."""
    max_queue_wait_s: float = 30.0


@dataclass(frozen=True)
class ApiKey:
    """One ``bw_<id>.<secret>`` key as stored: never the secret, only its digest."""

    key_id: str
    tenant: str
    digest: str | None
    """Hex HMAC-SHA256 of the secret part; None once revoked at run time (not needed)."""
    created_at: float | None = None
    expires_at: float | None = None
    """Unix seconds; None: never."""
    revoked: bool = False
    source: str = "config"
    """``config`` (the file) or ``admin`` (made at run time)."""

    def usable(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def view(self, now: float) -> dict[str, Any]:
        """What the admin API shows: no digest, no secret."""
        return {
            "id": self.key_id,
            "tenant": self.tenant,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
            "expired": self.expires_at is not None and now >= self.expires_at,
            "source": self.source,
        }


@dataclass(frozen=True)
class Tenant:
    name: str
    quota: Quota = field(default_factory=Quota)
    key_digests: tuple[str, ...] = ()
    """Older keys: digests of the whole key, each compared on every request."""
    keys: tuple[ApiKey, ...] = ()
    """``bw_<id>.<secret>`` keys from the config file."""


@dataclass(frozen=True)
class AdmissionSettings:
    """Everything admission needs; build by hand or with :func:`load_settings`."""

    tenants: tuple[Tenant, ...] = ()
    defaults: Quota = field(default_factory=Quota)
    global_limits: GlobalLimits = field(default_factory=GlobalLimits)
    key_secret: bytes | None = None
    require_keys: bool = False
    """Keys are required even while none exists (none configured, none made yet, or the
    admin store not read yet): the gateway fails closed instead of open."""
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
        ids = [k.key_id for t in self.tenants for k in t.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("the same key id is listed more than once")
        if (digests or ids) and not self.key_secret:
            raise ValueError(f"key digests are configured but no secret: set {KEY_SECRET_ENV}")
        if not 0 < self.fallback_share <= 1:
            raise ValueError("fallback_share must be in (0, 1]")


# --- digests -------------------------------------------------------------------------------


def hash_key(key: str, secret: bytes | str) -> str:
    """The hex HMAC-SHA256 digest of an API key, as stored in the config."""
    if isinstance(secret, str):
        secret = secret.encode()
    return hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def new_api_key(secret: bytes | str, taken: Container[str] = ()) -> tuple[str, str, str]:
    """A new key ``bw_<id>.<secret>``, its id, and the digest to store (of the secret part):
    the key is known only to whoever is shown it now."""
    while True:
        key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
        if key_id not in taken:
            break
    part = secrets.token_urlsafe(KEY_SECRET_BYTES)
    return f"{KEY_PREFIX}{key_id}.{part}", key_id, hash_key(part, secret)


def split_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a ``bw_<id>.<secret>`` key; None for a key of the older kind."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, dot, part = key[len(KEY_PREFIX) :].partition(".")
    if not dot or not part or not _KEY_ID.fullmatch(key_id):
        return None
    return key_id, part


def _no_key() -> OpenAIError:
    return OpenAIError(
        401,
        "You didn't provide an API key. Provide it in an Authorization header using "
        "Bearer auth (Authorization: Bearer YOUR_KEY).",
        type_="invalid_request_error",
        code="invalid_api_key",
    )


def _bad_key() -> OpenAIError:
    """One answer for an unknown id, a wrong secret, a revoked or an expired key: never the
    key, nor which of these it was."""
    return OpenAIError(
        401, "Incorrect API key provided.", type_="invalid_request_error", code="invalid_api_key"
    )


class TenantDirectory:
    """Resolves an ``Authorization`` header to a tenant.

    A ``bw_<id>.<secret>`` key costs one dict lookup by id and one ``hmac.compare_digest`` of
    its secret's digest, whether the id is known or not (an unknown one is compared against a
    dummy digest); revocation and expiry are judged after the comparison, and every failure
    is the same 401. A key of the older kind, or an id found nowhere, goes through every
    ``key_digests`` entry, and that loop never stops early, so the time taken says nothing
    about which digest, or how much of one, matched. (With older digests configured, an
    unknown id therefore costs that loop as well: ids are public, so this tells nothing.)
    """

    def __init__(self, settings: AdmissionSettings) -> None:
        self._secret = settings.key_secret or b""
        self._digests: list[tuple[bytes, Tenant]] = [
            (bytes.fromhex(d), t) for t in settings.tenants for d in t.key_digests
        ]
        self._default = Tenant(DEFAULT_TENANT, settings.defaults)
        self._tenants: dict[str, Tenant] = {t.name: t for t in settings.tenants} or {
            DEFAULT_TENANT: self._default
        }
        self._config_keys = {k.key_id: k for t in settings.tenants for k in t.keys}
        self._dummy = secrets.token_bytes(32)
        self._keys: dict[str, tuple[bytes | None, ApiKey]] = {}
        self._require = settings.require_keys
        self._closed = self._require
        self._salts: dict[str, str] = {}
        self.set_runtime_keys({})

    def cache_salt(self, tenant: str) -> str:
        """The prefix-cache salt of a tenant that isolates its cache: an HMAC of its name
        under the key secret, so that every gateway sharing the secret salts alike (routing
        and workers' caches agree) and no client can name another tenant's salt as its own
        `cache_salt`."""
        salt = self._salts.get(tenant)
        if salt is None:
            mac = hmac.new(self._secret, b"cache_salt\x00" + _utf8(tenant), hashlib.sha256)
            salt = self._salts[tenant] = "t" + mac.hexdigest()[:40]
        return salt

    @property
    def default(self) -> Tenant | None:
        """Every request's tenant while no key exists at all; None once one does (in the
        config or made at run time): keys are then required, even after the last is revoked
        (revoked keys stay listed), so revoking never opens the gateway."""
        return None if self._closed else self._default

    @property
    def keys_required(self) -> bool:
        return self._closed

    def set_runtime_keys(self, entries: Mapping[str, Any]) -> None:
        """Keys made or revoked at run time (the admin store's id -> entry), over the config
        file's; an entry that does not parse or names no tenant of ours is skipped."""
        keys = {i: (_unhex(k.digest), k) for i, k in self._config_keys.items()}
        for key_id, entry in entries.items():
            record = _runtime_key(key_id, entry, self._config_keys.get(key_id))
            if record is not None and record.tenant in self._tenants:
                keys[key_id] = (_unhex(record.digest), record)
        self._keys = keys
        # once closed, closed for good: run-time keys that vanish (a store emptied by a Redis
        # restart, or unreadable) must not open the gateway any more than revoking them does
        self._closed = self._closed or bool(self._digests or self._config_keys or entries)

    def has_tenant(self, name: str) -> bool:
        return name in self._tenants

    def key(self, key_id: str) -> ApiKey | None:
        found = self._keys.get(key_id)
        return found[1] if found else None

    def keys_of(self, tenant: str) -> list[ApiKey]:
        """The tenant's ``bw_`` keys, revoked and expired ones included, oldest first."""
        keys = [k for _, k in self._keys.values() if k.tenant == tenant]
        return sorted(keys, key=lambda k: (k.created_at or 0.0, k.key_id))

    @property
    def can_make_keys(self) -> bool:
        return bool(self._secret)

    def new_key(self) -> tuple[str, str, str]:
        """A new key, its id and its digest (`new_api_key`) under this gateway's secret."""
        if not self._secret:
            raise ValueError(f"no key secret: set {KEY_SECRET_ENV} (or key_secret in the config)")
        return new_api_key(self._secret, self._keys)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The caller's tenant; raises a 401 ``OpenAIError`` for a missing or bad key."""
        return self.identify(authorization)[0]

    def identify(self, authorization: str | None) -> tuple[Tenant, str | None]:
        """The caller's tenant and the id of the key that proved it (None for a key known
        only by its digest, or when no key is asked for): the request log names the key,
        so an operator can tell which of a tenant's keys to revoke."""
        if not self._closed:
            return self._default, None
        key = bearer_token(authorization)
        if key is None:
            raise _no_key()
        key_id, found = self._by_id(key)
        if found is not None:
            return found, key_id
        if key_id is None and self._digests:
            found = self._by_digest(key)
        if found is None:
            raise _bad_key()
        return found, None

    def _by_id(self, key: str) -> tuple[str | None, Tenant | None]:
        """(the key's id if it is one of ours, its tenant if the key is good)."""
        parts = split_key(key)
        if parts is None:
            return None, None
        key_id, part = parts
        stored, record = self._keys.get(key_id, (None, None))
        presented = hmac.new(self._secret, _utf8(part), hashlib.sha256).digest()
        match = hmac.compare_digest(self._dummy if stored is None else stored, presented)
        if record is None:
            return None, None
        if match and record.usable(time.time()):
            return key_id, self._tenants.get(record.tenant)
        return key_id, None

    def _by_digest(self, key: str) -> Tenant | None:
        presented = hmac.new(self._secret, _utf8(key), hashlib.sha256).digest()
        found: Tenant | None = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found


def _utf8(text: str) -> bytes:
    # aiohttp hands undecodable header bytes over as surrogates: a bad key, not a crash
    return text.encode("utf-8", "surrogateescape")


def _unhex(digest: str | None) -> bytes | None:
    return None if digest is None else bytes.fromhex(digest)


def _time(value: object) -> float | None:
    if value is None:
        return None
    # compared before converting: a huge integer raised OverflowError, not a ValueError
    if isinstance(value, bool) or not isinstance(value, int | float) or not abs(value) <= 1e15:
        raise ValueError(f"expected Unix seconds, got {_short(value)}")
    return float(value)


def _short(value: object) -> str:
    """`value` for an error message, cut short (a huge integer's repr is a wall of digits,
    and past 4300 of them raises)."""
    if isinstance(value, int) and not -(10**40) < value < 10**40:
        return "an integer of over 40 digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _runtime_key(key_id: str, entry: object, base: ApiKey | None) -> ApiKey | None:
    """The key an admin store entry describes, or None if it does not parse."""
    if not _KEY_ID.fullmatch(key_id) or not isinstance(entry, Mapping):
        return None
    revoked = entry.get("revoked") is True
    if base is not None:  # a key from the config file: run time can only revoke it
        return replace(base, revoked=True) if revoked else base
    tenant, digest = entry.get("tenant"), entry.get("digest")
    if not isinstance(tenant, str):
        return None
    if digest is None and not revoked:
        return None
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        return None
    try:
        created, expires = _time(entry.get("created_at")), _time(entry.get("expires_at"))
    except ValueError:
        return None
    return ApiKey(key_id, tenant, digest, created, expires, revoked, "admin")


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
    _only(data, "config", {"key_secret", "require_keys", "global", "redis", "defaults", "tenants"})
    secret_text = env.get(KEY_SECRET_ENV) or data.get("key_secret")
    if secret_text is not None and not isinstance(secret_text, str):
        raise ValueError("key_secret must be a string")
    require_keys = data.get("require_keys", False)
    if not isinstance(require_keys, bool):
        raise ValueError("require_keys must be true or false")
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
        keys = _config_keys(body.get("keys", []), name)
        quota_fields = {k: v for k, v in body.items() if k not in ("key_digests", "keys")}
        quota = _quota(quota_fields, defaults, f"tenants.{name}")
        tenants.append(Tenant(name, quota, digests, keys))
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
        require_keys=require_keys,
        redis_url=url,
        redis_prefix=prefix,
        fallback_share=_num(redis, "fallback_share", "redis") or 1.0,
        redis_socket_timeout_s=_num(redis, "socket_timeout_s", "redis") or REDIS_SOCKET_TIMEOUT_S,
        redis_op_timeout_s=_num(redis, "op_timeout_s", "redis") or REDIS_OP_TIMEOUT_S,
        redis_probe_interval_s=_num(redis, "probe_interval_s", "redis") or REDIS_PROBE_INTERVAL_S,
    )


_RATE_FIELDS = {f.name for f in fields(Rates)}


def _config_keys(raw: object, tenant: str) -> tuple[ApiKey, ...]:
    """A tenant's ``keys = [{id = "...", digest = "..."}, ...]`` (from ``new-key``)."""
    where = f"tenants.{tenant}.keys"
    if not isinstance(raw, list) or not all(isinstance(k, Mapping) for k in raw):
        raise ValueError(f'{where} must be a list of {{id = "...", digest = "..."}} tables')
    keys = []
    for entry in raw:
        _only(entry, where, {"id", "digest", "expires_at"})
        key_id, digest = entry.get("id"), entry.get("digest")
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise ValueError(f"{where}: id {key_id!r} is not {KEY_ID_LENGTH} letters and digits")
        if not isinstance(digest, str) or not _DIGEST.match(digest.strip().lower()):
            raise ValueError(
                f"{where}: the digest of {key_id} is not 64 hex digits (store what "
                "`python -m gateway.admission.tenants new-key` prints, never the key)"
            )
        try:
            expires = _time(entry.get("expires_at"))
        except ValueError as e:
            raise ValueError(f"{where}: expires_at of {key_id}: {e}") from None
        keys.append(ApiKey(key_id, tenant, digest.strip().lower(), expires_at=expires))
    return tuple(keys)


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
    # a range check, not math.isfinite: that raised OverflowError for a huge integer (a 500)
    if isinstance(v, bool) or not isinstance(v, int | float) or not MIN_RATE <= v <= MAX_RATE:
        raise ValueError(
            f"{where}.{name} must be a positive number ({MIN_RATE:g} to {MAX_RATE:g}), "
            f"got {_short(v)}"
        )
    return float(v)


def _int(data: Mapping[str, Any], name: str, where: str, lo: int, default: int = 0) -> int:
    v = data.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= MAX_COUNT:
        raise ValueError(
            f"{where}.{name} must be an integer from {lo} to {MAX_COUNT}, got {_short(v)}"
        )
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
    rates = _rates(data, where, {"max_concurrent", "priority", "isolate_cache"})
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
    if "isolate_cache" in data:
        if not isinstance(data["isolate_cache"], bool):
            raise ValueError(f"{where}.isolate_cache must be true or false")
        changes["isolate_cache"] = data["isolate_cache"]
    return replace(base, **changes)


def _rate_share(r: Rates, processes: int, shared: bool) -> dict[str, float | None]:
    if shared or processes <= 1:  # Redis buckets are cluster-wide: nothing to divide
        return {}
    return {
        f.name: (None if getattr(r, f.name) is None else getattr(r, f.name) / processes)
        for f in fields(Rates)
    }


def split(n: int, processes: int, index: int) -> int:
    """Process `index`'s part of a count, the parts summing to `n`: 5 over 2 processes is
    3 and 2 (each took 3, rounded up, and the gateway admitted 6 at once against 5)."""
    return n // processes + (1 if index % processes < n % processes else 0)


def quota_share(q: Quota, processes: int, shared_rates: bool, index: int = 0) -> Quota:
    """One process's share of a tenant's quota (see `per_process`)."""
    if processes <= 1:
        return q
    n = q.max_concurrent
    # at least 1: a limit below the process count is exceeded, as the README says
    concurrent = None if n is None else max(1, split(n, processes, index))
    return replace(q, max_concurrent=concurrent, **_rate_share(q, processes, shared_rates))


def quota_from_fields(data: object, base: Quota, where: str) -> Quota:
    """`base` with the quota fields in `data` (a tenant's table; null rates: unlimited);
    ValueError names what is wrong. Used by the config file and the admin API alike."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object of quota fields")
    return _quota(data, base, where)


def per_process(settings: AdmissionSettings, processes: int, index: int = 0) -> AdmissionSettings:
    """One of `processes` gateway processes' share of the limits, so that together they
    admit what one process would: concurrency and queue bounds always (they are counted in
    each process), token-bucket rates only when they are local (without Redis they are
    per process; with it they are shared, and only the fallback used while Redis is down
    is local)."""
    if processes <= 1:
        return settings

    def share(n: int | None) -> int | None:
        return None if n is None else max(1, split(n, processes, index))

    def rates(r: Rates) -> dict[str, float | None]:
        return _rate_share(r, processes, bool(settings.redis_url))

    def quota(q: Quota) -> Quota:
        return quota_share(q, processes, bool(settings.redis_url), index)

    g = settings.global_limits
    return replace(
        settings,
        tenants=tuple(replace(t, quota=quota(t.quota)) for t in settings.tenants),
        defaults=quota(settings.defaults),
        global_limits=replace(
            g,
            max_in_flight=share(g.max_in_flight),
            max_queue=None if g.max_queue is None else split(g.max_queue, processes, index),
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
    raise ValueError(f"{where} must be 'interactive' (0) or 'batch' (1), got {_short(value)}")


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
    n = sub.add_parser("new-key", help="print a new bw_<id>.<secret> key and its config line")
    n.add_argument("--tenant", help="the tenant it is for (names its config table)")
    args = p.parse_args(argv)
    if args.cmd == "new-key" and args.tenant is not None and not _NAME.match(args.tenant):
        raise SystemExit(f"tenant name {args.tenant!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    secret = _secret_for_cli(args.config)
    if args.cmd == "hash-key":
        key = sys.stdin.readline().strip() if args.key == "-" else args.key
        if not key:
            raise SystemExit("empty key")
        print(hash_key(key, secret))
    else:
        # printed once: only the digest is kept anywhere, the key cannot be shown again
        key, key_id, digest = new_api_key(secret)
        print(f"key:    {key}\nid:     {key_id}\ndigest: {digest}")
        print("# the key is shown only now; the admission config takes its id and digest:")
        if args.tenant is not None:
            print(f"[tenants.{args.tenant}]")
        print(f'keys = [{{id = "{key_id}", digest = "{digest}"}}]  # or add it to the list')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
