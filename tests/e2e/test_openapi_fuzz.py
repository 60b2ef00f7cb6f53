"""Schemathesis against a real gateway over a simulated worker, driven by the OpenAPI document
the gateway itself serves (GET /openapi.json).

Bounded and derandomized, so it is a CI test and not a search: MAX_EXAMPLES schema-valid and
as many schema-invalid inputs per operation, the same ones every run. Every answer must have
a documented status, content type, headers and body (each server-sent event too); no input
may get a 5xx or hang, and every input outside the schema must be refused. Run with `-s` to
see the figures.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import breakwater
from proto.limits import DEFAULT_LIMITS
from serving.openapi import build_openapi
from tests.procs import Proc, start_gateway, start_sim_worker

MODEL = "sim"
MAX_EXAMPLES = 30
"""Per operation and generation mode (schema-valid, schema-invalid)."""
CALL_TIMEOUT_S = 10.0
"""A call not answered whole by then is counted as a hang."""
MAX_TOKENS = 8
"""Generation is capped here: the fuzzing is about inputs, not long outputs."""


@pytest.fixture(scope="module")
def sim_worker() -> Iterator[Proc]:
    w = start_sim_worker("--http-port", "0", "--sim-speed", "20", name=MODEL)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def sim_gateway(sim_worker: Proc) -> Iterator[Proc]:
    g = start_gateway("--worker", sim_worker.ready["grpc"])
    yield g
    g.stop()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers.get_content_type(), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get_content_type(), e.read()


@pytest.mark.parametrize("port", ["gateway", "worker"])
def test_served_document_is_valid_openapi(port: str, sim_gateway: Proc, sim_worker: Proc) -> None:
    base = (sim_gateway if port == "gateway" else sim_worker).ready["http"]
    status, content_type, body = get(base + "/openapi.json")
    assert (status, content_type) == (200, "application/json")
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == breakwater.__version__
    # it says what this port serves: /metrics only where there is one
    metrics = get(base + "/metrics")[0] == 200
    assert doc == build_openapi(DEFAULT_LIMITS, metrics=metrics)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz", "/readyz"):
        assert path in doc["paths"]
    # the bounds are the parsers' own
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == DEFAULT_LIMITS.max_messages
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == DEFAULT_LIMITS.max_tokens
    validator = pytest.importorskip("openapi_spec_validator")  # the dev extra
    validator.validate(doc)


@dataclass
class Figures:
    """What the fuzzing did and found."""

    operations: int = 0
    inputs: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    """Inputs not answered whole within CALL_TIMEOUT_S, or whose connection dropped."""
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        codes = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (
            f"{self.operations} operations, {self.inputs} inputs in {self.seconds:.1f} s "
            f"({codes}); {len(self.server_errors)} server errors, {len(self.hangs)} hangs, "
            f"{len(self.failures)} nonconforming answers"
        )


def _bounded(body: Any) -> Any:
    """A generated body made to reach the model: it names the served model (any other is a
    404 before the interesting part), and asks for at most MAX_TOKENS tokens. Only values
    the schema allows are changed, so a schema-invalid body stays invalid."""
    if not isinstance(body, dict):
        return body
    model = body.get("model")
    if isinstance(model, str) and 1 <= len(model) <= DEFAULT_LIMITS.max_model_chars:
        body["model"] = MODEL
    names = ("max_tokens", "max_completion_tokens")
    most = DEFAULT_LIMITS.max_tokens  # above it, a value is the invalid part: left alone
    for name in names:
        v = body.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and MAX_TOKENS < v <= most:
            body[name] = MAX_TOKENS
    if all(body.get(name) is None for name in names):
        body["max_tokens"] = MAX_TOKENS  # a chat's default is the model's whole context
    return body


def _deadline_asked(headers: dict[str, Any] | None) -> bool:
    """The caller set its own deadline: a 504 is then the answer it asked for."""
    return any(k.lower() == "x-request-timeout-ms" for k in headers or {})


def _fuzz(base: str) -> Figures:
    """Every operation of the document `base` serves, with MAX_EXAMPLES schema-valid and as
    many schema-invalid inputs each. Imports here: schemathesis is a dev extra."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    schema.hook("map_body")(lambda _context, body: _bounded(body))
    conformance = [
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    checks = {
        GenerationMode.POSITIVE: conformance,
        GenerationMode.NEGATIVE: [*conformance, negative_data_rejection],
    }
    figures = Figures()
    session = requests.Session()
    started = time.monotonic()

    def run_case(case: Any, mode: GenerationMode) -> None:
        figures.inputs += 1
        # An extra header the generator happens to name `Expect` asks the server for an
        # expectation it refuses with 417 before reading the request (RFC 9110; tested in
        # test_fast_http), which no check here knows as a refusal: not the document's API.
        for name in [k for k in case.headers or {} if k.lower() == "expect"]:
            del case.headers[name]
        what = f"{case.operation.label} ({mode.value}) body={case.body!r:.300} {case.headers}"
        try:
            response = case.call(session=session, timeout=CALL_TIMEOUT_S)
        except requests.RequestException as e:  # no answer in time, or a dropped connection
            figures.hangs.append(f"{what}: {e!r}")
            return
        status = response.status_code
        figures.statuses[status] += 1
        if response.stream_cut_short:  # at most MAX_TOKENS tokens: only a timeout cuts it
            figures.hangs.append(f"{what}: the stream did not end")
        if status >= 500 and not (status == 504 and _deadline_asked(case.headers)):
            figures.server_errors.append(f"{what}: {status} {response.text[:300]}")
        try:
            case.validate_response(response, checks=checks[mode])
        except FailureGroup as e:
            figures.failures.append(f"{what}: {e}")

    def fuzzer(op: Any, mode: GenerationMode) -> Callable[[], None]:
        @settings(
            max_examples=MAX_EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            run_case(case, mode)

        return fuzz

    for result in schema.get_all_operations():
        op = result.ok()
        figures.operations += 1
        has_inputs = bool(op.body) or any(True for _ in op.iter_parameters())
        for mode in checks:
            if mode is GenerationMode.NEGATIVE and not has_inputs:
                continue  # nothing to make invalid
            fuzzer(op, mode)()
    session.close()
    figures.seconds = time.monotonic() - started
    return figures


def test_fuzz_the_public_api_from_its_document(sim_gateway: Proc) -> None:
    pytest.importorskip("schemathesis")  # the dev extra
    figures = _fuzz(sim_gateway.ready["http"])
    print(figures.summary())
    assert not figures.server_errors, "\n".join(figures.server_errors[:5])
    assert not figures.hangs, "\n".join(figures.hangs[:5])
    assert not figures.failures, "\n\n".join(figures.failures[:3])
    # both sides were reached: answers generated, and inputs refused
    assert figures.statuses[200] > 0 and figures.statuses[400] > 0, figures.summary()
    # and the gateway still serves afterwards
    assert get(sim_gateway.ready["http"] + "/readyz")[0] == 200
