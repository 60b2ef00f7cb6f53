"""PromptIds.ids on the wire: token ids as unsigned 32-bit little-endian, on both wires
(gRPC `prompt_ids`, and the OpenAI body's `breakwater_prompt` in base64), so a 2k-token
prompt is one 8 KB copy each way instead of 2k varints or JSON numbers."""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from collections.abc import Sequence
from typing import Any

from proto import inference_pb2 as pb
from proto.limits import DEFAULT_LIMITS
from proto.openai_compat import OpenAIError

BODY_FIELD = "breakwater_prompt"
"""The OpenAI body's field for a gateway's PromptIds: `{"token_ids": base64, "tokenizer"}`.
Only a gateway sets it, on the way to a worker; a gateway refuses it from clients."""


def prompt_ids_bytes(ids: Sequence[int]) -> bytes:
    out = ids if isinstance(ids, array) and ids.typecode == "I" else array("I", ids)
    if sys.byteorder == "big":
        out = array("I", out)
        out.byteswap()
    return out.tobytes()


def prompt_ids_from(data: bytes) -> list[int] | None:
    """The ids as a list; None when `data` is not whole 32-bit ids."""
    if len(data) % 4:
        return None
    ids = array("I", data)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tolist()


def body_field(hint: pb.PromptIds) -> bytes:
    """`"breakwater_prompt":{...}`, to add to a JSON object's members."""
    return b'"%s":{"token_ids":"%s","tokenizer":"%s"}' % (
        BODY_FIELD.encode(),
        base64.b64encode(hint.ids),
        hint.tokenizer.encode("ascii", "replace"),
    )


def fits_with_ids(
    body: bytes, hint: pb.PromptIds, limit: int = DEFAULT_LIMITS.max_body_bytes
) -> bool:
    """Whether the body stays within a worker's body limit with the ids added (base64:
    ~5.3 bytes a token); a body that would not goes without them, as a client's would."""
    return len(body) + (len(hint.ids) + 2) // 3 * 4 + len(hint.tokenizer) + 64 <= limit


def with_body_field(body: bytes, hint: pb.PromptIds) -> bytes:
    """A JSON object's bytes with the field added last (so it wins over any earlier one)."""
    return with_member(body, body_field(hint))


def with_member(body: bytes, member: bytes) -> bytes:
    """A JSON object's bytes with `"name":value` added last: orjson and Python's json (the
    workers', vLLM's) take the last of repeated names, so it wins over a client's own."""
    end = body.rindex(b"}")
    head = body[:end].rstrip()
    sep = b"" if head.endswith(b"{") else b","
    return head + sep + member + body[end:]


def parse_body_field(value: Any) -> pb.PromptIds:
    """The body field as a worker reads it; OpenAIError (400) when malformed."""
    try:
        ids, tokenizer = value["token_ids"], value["tokenizer"]
        if not (isinstance(ids, str) and isinstance(tokenizer, str)):
            raise TypeError
        return pb.PromptIds(ids=base64.b64decode(ids, validate=True), tokenizer=tokenizer)
    except (TypeError, KeyError, binascii.Error):
        raise OpenAIError(
            400,
            f'\'{BODY_FIELD}\' must be {{"token_ids": base64, "tokenizer": str}}',
            param=BODY_FIELD,
        ) from None
