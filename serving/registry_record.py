"""The registry record: one worker as a gateway sees it, and where it lives in Redis.

Workers publish it and gateways read it, so both sides share this one definition.

Layout under a prefix (default ``breakwater:``):

- ``{prefix}worker:{worker_id}``: the worker's ``WorkerInfo`` JSON, written with a TTL on
  every heartbeat. A worker that dies without withdrawing (SIGKILL, lost node) simply
  stops refreshing it, and Redis expires it: liveness needs no clocks shared between hosts.
- ``{prefix}workers``: a set of worker ids, so gateways can list the fleet without SCAN.
  Ids whose key has expired are removed lazily by the gateways that notice.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

UpstreamKind = Literal["grpc", "openai-http"]

DEFAULT_PREFIX = "breakwater:"
DEFAULT_TTL = 3.0
"""Seconds a heartbeat stays valid: three missed 1 s heartbeats mark a worker gone."""


class WorkerState(enum.StrEnum):
    STARTING = "STARTING"
    SERVING = "SERVING"
    DRAINING = "DRAINING"
    NOT_SERVING = "NOT_SERVING"


@dataclass
class WorkerInfo:
    """One worker as the gateway sees it; also the JSON a worker publishes to Redis."""

    worker_id: str
    address: str
    """host:port for gRPC workers; a base URL (http://host:port) for OpenAI HTTP servers."""
    kind: UpstreamKind = "grpc"
    models: list[str] = field(default_factory=list)
    version: str = ""
    """The worker's software version, as it reports it (empty: not known)."""
    state: WorkerState = WorkerState.STARTING
    stats: dict[str, float] = field(default_factory=dict)
    """queue_depth, running, kv_cache_usage, prefix_cache_hit_rate, ... (worker's Stats)."""
    updated_at: float = field(default_factory=time.time)
    """Wall-clock time of the last heartbeat or health check."""
    openai_url: str = ""
    """A gRPC worker's own OpenAI-compatible server (empty: none). A gateway relays OpenAI
    HTTP requests there as they came, and the worker's SSE bytes back, instead of turning
    each request into gRPC and every streamed delta back into JSON."""

    @property
    def ready(self) -> bool:
        return self.state == WorkerState.SERVING

    def serves(self, model: str | None) -> bool:
        return model is None or not self.models or model in self.models

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerInfo:
        d: dict[str, Any] = json.loads(data)
        if not isinstance(d, dict):
            raise TypeError("a worker record must be a JSON object")
        d["state"] = WorkerState(d.get("state", "STARTING"))
        known = {f.name for f in fields(cls)}
        info = cls(**{k: v for k, v in d.items() if k in known})  # newer workers' extras
        info._check()
        return info

    def _check(self) -> None:
        """Raise TypeError for a record whose fields have the wrong types: the request path
        reads them without checking (a null or string `stats` crashed it there)."""
        strings = (self.worker_id, self.address, self.kind, self.version, self.openai_url)
        if not all(isinstance(x, str) for x in strings):
            raise TypeError("worker_id, address, kind, version and openai_url must be strings")
        if not isinstance(self.models, list) or not all(isinstance(m, str) for m in self.models):
            raise TypeError("models must be a list of strings")
        if not isinstance(self.stats, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
            for k, v in self.stats.items()
        ):
            raise TypeError("stats must be an object of numbers")
        if isinstance(self.updated_at, bool) or not isinstance(self.updated_at, int | float):
            raise TypeError("updated_at must be a number")


def openai_url(grpc_address: str, http_port: int, tls: bool) -> str:
    """The base URL of the HTTP port a worker serves beside its gRPC `host:port`."""
    host = grpc_address.rsplit(":", 1)[0]
    return f"{'https' if tls else 'http'}://{host}:{http_port}"


class RegistryKeys:
    """The Redis key names under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.index = f"{prefix}workers"
        self.epoch = f"{prefix}epoch"
        """A random value gateways set when absent: when it changes, Redis lost its data."""
        self._worker = f"{prefix}worker:"

    def worker(self, worker_id: str) -> str:
        return self._worker + worker_id
