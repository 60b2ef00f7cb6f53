"""Operator overrides, shared by every gateway process: drained or ejected replicas, replica
weights, upstreams registered or deregistered at run time, traffic splits between model
versions, shadow traffic, tenants' quotas, and API keys made or revoked at run time (their
ids and digests, never the keys).

An operator acts on one gateway's admin listener; every process of every gateway must
follow. With Redis the overrides live in a hash and each change is published, so other
gateways apply it within a poll; without Redis the gateway's processes share a small JSON
file in their common directory. Each change is also appended to an audit log (a Redis list,
or a JSON-lines file beside the overrides) and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

Action = Literal["drain", "undrain", "eject", "readmit"]
STATES: dict[str, str | None] = {
    "drain": "drained",
    "undrain": None,
    "eject": "ejected",
    "readmit": None,
}
"""What each action leaves the replica as. A drain and an eject are kept apart (an entry
each): undrain ends the drain alone, readmit the eject alone."""
log = logging.getLogger("breakwater.admin")


class Store(Protocol):
    async def load(self) -> dict[str, str]: ...
    async def apply(self, field: str, value: str | None, audit: dict[str, Any]) -> None: ...
    async def audit(self, limit: int) -> list[dict[str, Any]]: ...
    async def close(self) -> None: ...


def state_dir_problem(directory: str) -> str | None:
    """What keeps --state-dir from holding the overrides, checked at start: an unwritable
    one started fine, then failed every admin change."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe = Path(directory) / f".breakwater-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        return f"--state-dir {directory}: {e.strerror or e}"
    return None


class FileStore:
    """Overrides in `<dir>/admin-overrides.json` (replaced atomically), audit in
    `<dir>/admin-audit.jsonl`; file work runs in a thread, off the event loop."""

    def __init__(self, directory: str, durable: bool = False) -> None:
        self.durable = durable
        """Kept past this gateway's run (`--state-dir`), not in its temporary directory."""
        if durable:
            Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / "admin-overrides.json"
        self.audit_path = Path(directory) / "admin-audit.jsonl"

    def _read(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    async def load(self) -> dict[str, str]:
        return await asyncio.to_thread(self._read)

    def _write(self, key: str, value: str | None, audit: dict[str, Any]) -> None:
        # One read-change-write at a time, across threads and the gateway's processes:
        # concurrent calls each wrote the file they had read (acknowledged changes lost)
        # through one temporary file per process (one call failed on another's rename).
        with self.path.with_suffix(".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self._read()
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
            tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(current))
            tmp.replace(self.path)
            with self.audit_path.open("a") as f:
                f.write(json.dumps(audit) + "\n")

    async def apply(self, key: str, value: str | None, audit: dict[str, Any]) -> None:
        await asyncio.to_thread(self._write, key, value, audit)

    def _tail(self, limit: int) -> list[dict[str, Any]]:
        try:
            lines = self.audit_path.read_text().splitlines()[-limit:]
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines]

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._tail, limit)

    async def close(self) -> None:
        pass


class RedisStore:
    """Overrides in the hash `{prefix}admin:overrides`, audit in the list `{prefix}admin:audit`.

    Every write also sets the field `MARKER` in the hash, so the hash outlives its last
    override (an operator who deletes every override leaves the marker behind). A hash
    without the marker was therefore not written by us: Redis restarted without persistence
    (or was flushed, or the key deleted by hand). Its empty data must not be adopted as if an
    operator had cleared everything (revoked keys working again, drained replicas taking
    traffic): the store keeps the last overrides it saw and writes them back, with the
    marker, in one script, so every gateway and later restarts see them again. Gateways
    racing to write back are harmless: the first one's script sets the marker, and the
    others' scripts then find it and change nothing. Fields that were written in the
    meantime (say, an operator's act on a gateway that knew nothing) are kept over the old
    copy's. (A gateway started after the restart knows nothing to write back: the overrides
    survive a Redis restart only while some gateway that read them is running.)
    """

    MARKER = "~store"
    """In no section (sections are prefixes such as `worker:`), so never read as an override."""

    _RESTORE = """
    if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
    local n = 0
    for i = 3, #ARGV, 2 do n = n + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    return n
    """
    """KEYS: the hash. ARGV: the marker and its value, then the known fields and values.
    Without the marker: the known fields not set since, then the marker; returns how many
    fields were put back, or -1 if the marker was there (nothing to do)."""

    _APPLY = """
    local n = -1
    if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
        n = 0
        for i = 7, #ARGV, 2 do n = n + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
    end
    redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
    if ARGV[4] == '1' then
        redis.call('HSET', KEYS[1], ARGV[3], ARGV[5])
    else
        redis.call('HDEL', KEYS[1], ARGV[3])
    end
    redis.call('RPUSH', KEYS[2], ARGV[6])
    redis.call('LTRIM', KEYS[2], -10000, -1)
    return n
    """
    """KEYS: the hash, the audit list. ARGV: the marker and its value, the field, '1' to set
    it (or '0' to delete it), its value, the audit record, then the known fields and values
    (written back first if the marker is missing, as in _RESTORE)."""

    def __init__(self, url: str, prefix: str = "breakwater:") -> None:
        from serving.redis_client import make_client

        self._client = make_client(url, 1.0)
        self.key = f"{prefix}admin:overrides"
        self.audit_key = f"{prefix}admin:audit"
        self._restore = self._client.register_script(self._RESTORE)
        self._apply = self._client.register_script(self._APPLY)
        self._known: dict[str, str] = {}
        """The overrides last read or written here: what goes back into an emptied Redis."""

    async def load(self) -> dict[str, str]:
        data, marked = await self._read()
        if not marked and self._known:  # emptied under us: put back what we last knew
            restored = int(await self._restore(keys=[self.key], args=self._args(self._known)))
            if restored >= 0:  # -1: another gateway (or process) wrote them back first
                self._lost(restored)
            data, _ = await self._read()
        # unmarked data with nothing known here (a new deployment, or overrides written
        # before the marker existed) is taken as it is, and marked by the next write
        self._known = data
        return dict(data)

    async def _read(self) -> tuple[dict[str, str], bool]:
        """The overrides in the hash, and whether it has the marker."""
        raw = {_s(k): _s(v) for k, v in (await self._client.hgetall(self.key)).items()}
        return raw, raw.pop(self.MARKER, None) is not None

    def _args(self, known: Mapping[str, str]) -> list[str]:
        return [self.MARKER, "1", *(x for item in known.items() for x in item)]

    def _lost(self, restored: int) -> None:
        log.warning(
            "admin overrides: Redis lost them (restarted or flushed): wrote back the last "
            "%d known here (%d entries put back)",
            len(self._known),
            restored,
        )

    async def apply(self, field: str, value: str | None, audit: dict[str, Any]) -> None:
        op = "0" if value is None else "1"
        args = [*self._args({}), field, op, value or "", json.dumps(audit)]
        known = self._args(self._known)[2:]
        restored = int(await self._apply(keys=[self.key, self.audit_key], args=args + known))
        if restored >= 0 and self._known:  # (with nothing known: the very first write)
            self._lost(restored)
        if value is None:
            self._known.pop(field, None)
        else:
            self._known[field] = value

    async def audit(self, limit: int) -> list[dict[str, Any]]:
        return [json.loads(_s(x)) for x in await self._client.lrange(self.audit_key, -limit, -1)]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.aclose()


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


WORKER = "worker:"
"""A drain (and, as earlier versions stored it, an eject)."""
EJECT = "eject:"
SPLIT = "split:"
WEIGHT = "weight:"
UPSTREAM = "upstream:"
SHADOW = "shadow:"
QUOTA = "quota:"
KEY = "key:"


def _loads(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:  # a hand-edited or foreign entry: ignored, never fatal
        return None


def _section(raw: dict[str, str], prefix: str) -> dict[str, Any]:
    return {
        k[len(prefix) :]: v
        for k, value in raw.items()
        if k.startswith(prefix) and (v := _loads(value)) is not None
    }


def json_number(
    value: object, low: float = -sys.float_info.max, high: float = sys.float_info.max
) -> bool:
    """A JSON number (not a bool) in [low, high], by default any that converts to a finite
    float: compared before any float conversion, so a huge integer is out of range rather
    than an OverflowError (from a request body, or the store read with Python's json), and
    NaN is never in it."""
    return not isinstance(value, bool) and isinstance(value, int | float) and low <= value <= high


class Split:
    """Smooth weighted round-robin (nginx's) over a model's versions: the shares hold to
    within one request at any point, where a random draw would wander by sqrt(n)."""

    def __init__(self, weights: Mapping[str, Any]) -> None:
        # a stored entry is taken as it is found: only finite positive numbers count
        self.weights = {m: float(w) for m, w in weights.items() if json_number(w) and w > 0}
        top = max(self.weights.values(), default=1.0)
        # steps scaled so that their sum is finite: an infinite total made the counters
        # inf - inf = NaN, and the shares 999 to 1 instead of half and half
        total = sum(self.weights.values())
        scale = 1.0 if total <= sys.float_info.max else 1.0 / top
        self._steps = {m: w * scale for m, w in self.weights.items()}
        self.total = sum(self._steps.values())
        self._current = dict.fromkeys(self.weights, 0.0)

    def pick(self) -> str:
        current = self._current
        for model, weight in self._steps.items():
            current[model] += weight
        best = max(current, key=current.__getitem__)
        current[best] -= self.total
        return best


class Overrides:
    """This process's copy of the overrides, refreshed from the store every `poll_s` (and
    at once on `refresh_soon`, which process 0 signals to its siblings after a change)."""

    def __init__(self, store: Store, poll_s: float = 0.5) -> None:
        self.store = store
        self.poll_s = poll_s
        self.states: dict[str, str] = {}
        """worker id -> drained | ejected."""
        self.splits: dict[str, Split] = {}
        """model alias -> its versions' split."""
        self.weights: dict[str, float] = {}
        """worker id -> routing weight (1 when absent; 0 takes no new requests)."""
        self.upstreams: dict[str, dict[str, Any]] = {}
        """worker id -> {"address", "kind"} registered at run time, or {"removed": True}."""
        self.shadows: dict[str, dict[str, Any]] = {}
        """model -> {"target": version, "percent": share mirrored}."""
        self.quotas: dict[str, dict[str, Any]] = {}
        """tenant -> quota fields set at run time (over the config file's)."""
        self.keys: dict[str, dict[str, Any]] = {}
        """API key id -> {"tenant", "digest", "created_at", "expires_at", "revoked"}."""
        self.listeners: list[Callable[[], None]] = []
        """Called after the overrides changed (a refresh that found news, or a local act)."""
        self._raw: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.store.close()

    async def refresh(self) -> None:
        try:
            raw = await self.store.load()
        except Exception as e:  # keep the last known overrides through a store outage
            log.debug("admin overrides not refreshed: %s", e)
            return
        if raw != self._raw:
            self._apply(raw)

    def _apply(self, raw: dict[str, str]) -> None:
        self._raw = raw
        states = {k[len(EJECT) :]: v for k, v in raw.items() if k.startswith(EJECT)}
        for k, v in raw.items():  # a drain shows over an eject: undrain leaves the eject
            if k.startswith(WORKER):
                states[k[len(WORKER) :]] = v
        self.states = states
        splits: dict[str, Split] = {}
        for model, weights in _section(raw, SPLIT).items():
            if not isinstance(weights, dict):  # a hand-edited or foreign entry: ignored
                continue
            old = self.splits.get(model)
            # an unchanged split keeps its round-robin position
            split = old if old and old.weights == weights else Split(weights)
            if split.weights:  # one with no usable weight would have nothing to pick
                splits[model] = split
        self.splits = splits
        self.weights = {k: float(v) for k, v in _section(raw, WEIGHT).items() if json_number(v)}
        self.upstreams = _section(raw, UPSTREAM)
        self.shadows = _section(raw, SHADOW)
        self.quotas = _section(raw, QUOTA)
        self.keys = _section(raw, KEY)
        self._notify()

    def _notify(self) -> None:
        for listener in self.listeners:
            try:
                listener()
            except Exception:  # one consumer's bug must not stop the others' updates
                log.exception("applying admin overrides failed")

    def refresh_soon(self) -> None:
        asyncio.get_running_loop().create_task(self.refresh())

    def resolve(self, model: str) -> str:
        """The model version this request goes to (the model itself without a split)."""
        split = self.splits.get(model)
        return split.pick() if split is not None else model

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    def blocked(self, worker_id: str) -> bool:
        """True while an operator keeps new requests away from the replica."""
        return worker_id in self.states or self.weights.get(worker_id, 1.0) <= 0

    async def act(self, action: Action, worker_id: str, who: str) -> dict[str, Any]:
        audit = {"action": action, "worker": worker_id, "by": who}
        if action in ("drain", "undrain"):
            if action == "undrain" and self._raw.get(WORKER + worker_id) == STATES["eject"]:
                return audit  # an eject stored the earlier way: readmit ends it, not this
            return await self._save(WORKER + worker_id, STATES[action], audit)
        if action == "readmit" and self._raw.get(WORKER + worker_id) == STATES["eject"]:
            await self._save(WORKER + worker_id, None, audit)  # stored the earlier way
        return await self._save(EJECT + worker_id, STATES[action], audit)

    async def set_split(
        self, model: str, weights: dict[str, float] | None, who: str
    ) -> dict[str, Any]:
        """Route `model` to its versions by weight (None: no split, the model itself)."""
        audit = {"action": "split", "model": model, "weights": weights, "by": who}
        return await self._save(SPLIT + model, json.dumps(weights) if weights else None, audit)

    async def put(
        self, prefix: str, name: str, value: Any, audit: dict[str, Any]
    ) -> dict[str, Any]:
        """Set (or with None, remove) one JSON entry of a section (WEIGHT, UPSTREAM, SHADOW,
        QUOTA, KEY)."""
        return await self._save(prefix + name, None if value is None else json.dumps(value), audit)

    async def _save(self, key: str, encoded: str | None, audit: dict[str, Any]) -> dict[str, Any]:
        """Store one entry with its audit record, then apply it to this process at once
        (the others follow on their next refresh, or at once when told)."""
        audit = {"at": time.time(), **audit}
        await self.store.apply(key, encoded, audit)
        raw = dict(self._raw)
        if encoded is None:
            raw.pop(key, None)
        else:
            raw[key] = encoded
        self._apply(raw)
        log.info("admin: %s", " ".join(f"{k}={v}" for k, v in audit.items() if k != "at"))
        return audit
