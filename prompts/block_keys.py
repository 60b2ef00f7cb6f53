"""Prefix-cache block hashes, and the 8-byte keys workers report and routers predict.

A block's hash is a chained SHA-256 of (parent block's hash, the block's token ids, an
extra key such as the model id): chaining makes one hash name the whole prefix up to the
block's end, so equal hashes mean equal prefixes. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence


def salted(extra_key: bytes, cache_salt: str) -> bytes:
    """The extra key of a salted request's blocks: a salt in every block's hash keeps its
    prefix apart from the same tokens under any other salt (or none), so one tenant's hits
    (`cached_tokens`, a faster first token) cannot tell it what another sent."""
    if not cache_salt:
        return extra_key
    return extra_key + b"\x00salt\x00" + cache_salt.encode()


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra_key: bytes) -> bytes:
    h = hashlib.sha256(parent or b"\x00" * 32)
    h.update(array("q", token_ids).tobytes())
    h.update(extra_key)
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, extra_key: bytes) -> list[bytes]:
    """The hashes of every full block of a prompt, in order: `hash_block` chained, with one
    conversion of the ids to bytes for the whole prompt (about half the cost per block)."""
    out: list[bytes] = []
    parent = b"\x00" * 32
    data = memoryview(array("q", token_ids).tobytes())
    step = block_size * 8
    sha256 = hashlib.sha256
    for end in range(step, len(data) + 1, step):
        h = sha256(parent)
        h.update(data[end - step : end])
        h.update(extra_key)
        parent = h.digest()
        out.append(parent)
    return out


def block_key(block_hash: bytes) -> int:
    """The hash's first 8 bytes as an unsigned int: what travels (CacheUpdate) and is matched."""
    return int.from_bytes(block_hash[:8], "big")
