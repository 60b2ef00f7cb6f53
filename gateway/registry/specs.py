"""Worker specs as `--worker` and the admin API take them: checked where they enter, so a
typo is an error at once rather than a replica that never turns healthy."""

from __future__ import annotations

from yarl import URL

from serving.registry_record import UpstreamKind

_WHAT = "host:port, grpc://host:port or http(s)://host:port"


def parse_worker_spec(spec: str) -> tuple[UpstreamKind, str]:
    """'127.0.0.1:50051' or 'grpc://host:port' is a gRPC worker; http(s)://... an OpenAI server."""
    if spec.startswith(("http://", "https://")):
        return "openai-http", spec
    return "grpc", spec.removeprefix("grpc://")


def check_address(address: object) -> str:
    """A worker spec as `--worker` takes it, or ValueError saying what is wrong."""
    if not isinstance(address, str) or not address or len(address) > 512 or " " in address:
        raise ValueError(f"a worker address must be {_WHAT}")
    kind, rest = parse_worker_spec(address)
    if kind == "grpc":
        if "://" in rest:  # another scheme (ftp://, HTTP://): not taken as a gRPC host
            raise ValueError(f"worker address {address!r} is not {_WHAT}")
        host, _, port = rest.rpartition(":")
        # isascii: str.isdigit() and int() take other scripts' digits, which gRPC does not
        if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise ValueError(f"worker address {address!r} is not {_WHAT}")
        return address
    try:
        url = URL(rest)
        ok = bool(url.host) and url.port is not None and 0 < url.port < 65536
    except ValueError:
        ok = False
    if not ok or not rest.isascii():
        raise ValueError(f"worker address {address!r} is not {_WHAT}")
    return address
