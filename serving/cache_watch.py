"""GET /cache/watch: a worker's prefix-cache stream over its OpenAI port, as JSON lines.

The same updates as gRPC WatchCache, for gateways that front a worker as a plain OpenAI
upstream. One JSON object a line (`application/x-ndjson`): first a snapshot, `{"snapshot":
true, "stored": [keys], "block_size", "model_id", "tokenizer", "tokenizer_fingerprint"}`,
then each batch of changes, `{"stored": [...], "removed": [...]}` (a key in one list only, as
it stands after the batch); an empty line every HEARTBEAT_S while the cache is still, so a
reader can tell a quiet cache from a peer that is gone. Keys are the engine's block keys
(unsigned 64-bit integers). Shared by the worker that writes it and the gateway that reads
it.
"""

from __future__ import annotations

from typing import Any

import orjson

from proto import inference_pb2 as pb

PATH = "/cache/watch"
MEDIA_TYPE = "application/x-ndjson"
HEARTBEAT_S = 5.0
"""Both wires beat: WatchCache with an empty CacheUpdate, this one with an empty line."""
SILENCE_S = 3 * HEARTBEAT_S
"""A reader that hears nothing for this long takes the worker for lost."""
HEARTBEAT = b"\n"


def is_heartbeat(update: pb.CacheUpdate) -> bool:
    """An update with nothing in it: sent only to say the worker is there."""
    return not (update.snapshot or update.stored or update.removed)


def encode(update: pb.CacheUpdate) -> bytes:
    if is_heartbeat(update):
        return HEARTBEAT
    line: dict[str, Any] = {"stored": list(update.stored)}
    if update.snapshot:
        line |= {
            "snapshot": True,
            "block_size": update.block_size,
            "model_id": update.model_id,
            "tokenizer": update.tokenizer,
            "tokenizer_fingerprint": update.tokenizer_fingerprint,
        }
    else:
        line["removed"] = list(update.removed)
    return orjson.dumps(line) + b"\n"


def decode(line: bytes) -> pb.CacheUpdate:
    """One non-empty line; ValueError (or TypeError, KeyError) for a malformed one."""
    d = orjson.loads(line)
    if not isinstance(d, dict):
        raise ValueError(f"a cache stream line is a JSON object, not {type(d).__name__}")
    if d.get("snapshot"):
        return pb.CacheUpdate(
            snapshot=True,
            stored=d["stored"],
            block_size=d["block_size"],
            model_id=d["model_id"],
            tokenizer=d.get("tokenizer", ""),
            tokenizer_fingerprint=d.get("tokenizer_fingerprint", ""),
        )
    return pb.CacheUpdate(stored=d["stored"], removed=d["removed"])
