"""Worker addresses are checked where they enter (`--worker`, the admin API)."""

from __future__ import annotations

import pytest

from gateway.registry.specs import check_address, parse_worker_spec

GOOD = [
    "127.0.0.1:50051",
    "grpc://worker-0.svc:50051",
    "grpc://[::1]:50051",
    "http://127.0.0.1:8000",
    "https://vllm.internal:8443/",
    "http://vllm.internal",  # port 80
]
BAD = [
    "",
    "nowhere",
    "ftp://1.2.3.4:5",  # another scheme is no gRPC host
    "HTTP://1.2.3.4:5",
    "h:x",
    "h:0",
    "h:65536",
    "h:\u0663",  # not ASCII: gRPC would not parse it
    ":50051",
    "http://",
    "http://h:99999",
    "http://h:\uff18\uff10",  # fullwidth 80, which yarl would quietly take
    "has space:1",
    "h" * 600 + ":1",
]


@pytest.mark.parametrize("spec", GOOD)
def test_good_addresses_pass(spec: str) -> None:
    assert check_address(spec) == spec


@pytest.mark.parametrize("spec", [*BAD, None, 5])
def test_bad_addresses_say_what_is_wrong(spec: object) -> None:
    with pytest.raises(ValueError, match="host:port"):
        check_address(spec)


def test_kinds() -> None:
    assert parse_worker_spec("grpc://h:1") == ("grpc", "h:1")
    assert parse_worker_spec("https://h:1") == ("openai-http", "https://h:1")
