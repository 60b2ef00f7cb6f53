"""Binding the gateway's listeners: a taken port is refused, in one line.

A gateway of several processes (`--processes`) binds its ports with SO_REUSEPORT so that
its siblings can serve them too. The kernel lets any process of the same user join such a
port, so a second gateway started on the port of one still running would have split the
traffic with it silently (each answering with its own workers and settings) instead of
failing. Process 0 therefore first checks that nothing listens on the port, with a plain
bind (SO_REUSEADDR only, as every listener here sets: a port left in TIME_WAIT is free);
the window between that check and its own bind is a few microseconds.
"""

from __future__ import annotations

import errno
import os
import socket


class ListenError(Exception):
    """A listener could not take its address: told to the operator in one line."""

    def __init__(self, what: str, host: str, port: int, cause: BaseException) -> None:
        code = getattr(cause, "errno", None)
        if isinstance(cause, socket.gaierror):  # its errno is an EAI_* code, not errno's
            reason = f"cannot resolve {host!r}: {cause.strerror}"
        elif isinstance(code, int):
            reason = os.strerror(code)
        else:
            reason = str(cause)
        hint = ""
        if code == errno.EADDRINUSE:
            hint = " (another process listens there: stop it or choose another port)"
        super().__init__(f"cannot listen on {host}:{port} for {what}: {reason}{hint}")


def refuse_taken(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) if something already listens on `host`:`port`.

    Port 0 is left to the kernel, which gives a port nobody holds.
    """
    if port == 0:
        return
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    for family, kind, proto, _, address in dict.fromkeys(infos):
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # a family this host lacks (IPv6 turned off): the server skips it too
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio binds it: IPv6 only
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(address)
