"""gateway.listen: a port something listens on is refused before the gateway binds it."""

from __future__ import annotations

import errno
import socket

import pytest

from gateway.listen import ListenError, refuse_taken


def _listener(reuse_port: bool) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # as a gateway of several processes binds its ports
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "reuse_port"])
def test_a_port_something_listens_on_is_refused(reuse_port: bool) -> None:
    with _listener(reuse_port) as held:
        port = held.getsockname()[1]
        with pytest.raises(OSError) as caught:
            refuse_taken("127.0.0.1", port)
        assert caught.value.errno == errno.EADDRINUSE
        # Also where the gateway would listen on every address.
        with pytest.raises(OSError):
            refuse_taken("0.0.0.0", port)


def test_a_free_port_and_port_zero_pass() -> None:
    with _listener(False) as held:
        port = held.getsockname()[1]
    refuse_taken("127.0.0.1", port)  # closed: free again
    refuse_taken("127.0.0.1", 0)


def test_the_error_is_one_line_for_the_operator() -> None:
    err = ListenError("HTTP", "127.0.0.1", 8080, OSError(errno.EADDRINUSE, "in use"))
    assert str(err) == (
        "cannot listen on 127.0.0.1:8080 for HTTP: Address already in use "
        "(another process listens there: stop it or choose another port)"
    )
    other = ListenError("gRPC", "10.9.9.9", 50051, RuntimeError("Failed to bind"))
    assert str(other) == "cannot listen on 10.9.9.9:50051 for gRPC: Failed to bind"

    unresolved = ListenError("HTTP", "nowhere.invalid", 80, socket.gaierror(-2, "Name unknown"))
    assert str(unresolved) == (
        "cannot listen on nowhere.invalid:80 for HTTP: cannot resolve 'nowhere.invalid': "
        "Name unknown"
    )
