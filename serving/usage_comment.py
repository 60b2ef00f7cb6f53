"""A streamed answer's token usage as an SSE comment, for the gateway that relays it.

The gateway relays HTTP clients' streams to a Breakwater worker's OpenAI port byte for
byte, so it never sees the deltas. Usage comes in an OpenAI stream only when the client
asked (`stream_options.include_usage`), and rewriting the body to ask would cost the relay
its pass-through. Instead the gateway sends `X-Breakwater-Usage: 1`, and the worker ends
the stream with one comment line, `: usage PROMPT COMPLETION CACHED`, just before
`data: [DONE]`. The gateway reads it (request logs, token metrics, trace spans) and takes
it out; an SSE comment that did reach a client is ignored by every SSE parser.
"""

from __future__ import annotations

USAGE_HEADER = "X-Breakwater-Usage"
_MARK = b": usage "


def usage_comment(usage: tuple[int, int, int]) -> bytes:
    return _MARK + b"%d %d %d\n\n" % usage


def take_usage_comment(data: bytes) -> tuple[tuple[int, int, int] | None, bytes]:
    """The usage in a piece of a relayed stream, and the piece without its comment.

    Only a comment whole within the piece counts (the worker writes it with [DONE] in one
    write); anything else is left as it came.
    """
    start = data.find(_MARK)
    if start < 0 or (start > 0 and data[start - 1] != 0x0A):  # a comment starts a line
        return None, data
    end = data.find(b"\n\n", start)
    if end < 0:
        return None, data
    fields = data[start + len(_MARK) : end].split(b" ")
    if len(fields) != 3 or not all(f.isdigit() for f in fields):
        return None, data
    prompt, completion, cached = (int(f) for f in fields)
    return (prompt, completion, cached), data[:start] + data[end + 2 :]
