"""One log format for every Breakwater process (stderr; stdout carries READY lines)."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import HttpProcessingError


class _ClientErrors(logging.Filter):
    """A request aiohttp could not parse (a header flood, a line past its limit, not HTTP
    at all) is the client's error: one INFO line, not an ERROR and a traceback each, which
    a client sending them in a loop would turn into a flood of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            record.msg, record.args = (
                "%s: %d %s",
                (record.getMessage(), exc.code, type(exc).__name__),
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp.server").addFilter(_ClientErrors())
