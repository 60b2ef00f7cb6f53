"""Tenants that isolate their prefix cache (`isolate_cache` in the admission config) get
hits only on their own prompts, over both fronts and both kinds of upstream, against real
gateway and sim worker processes: `cached_tokens` (and a fast first token) no longer tell
one tenant what another sent. vLLM's `cache_salt` partitions within a tenant's cache."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.admission.tenants import hash_key
from loadtest.fleet import Proc, start_gateway, start_sim_worker
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc

SECRET = "cache-isolation-secret"
KEYS = {"alice": "alice-key", "carol": "carol-key", "bob": "bob-key"}
PROMPT = "A system prompt that every tenant happens to share, long enough for blocks. " * 6


def write_config(path: Path) -> Path:
    lines = [f'key_secret = "{SECRET}"', "[defaults]", "isolate_cache = true"]
    for tenant, key in KEYS.items():
        lines += [f"[tenants.{tenant}]", f'key_digests = ["{hash_key(key, SECRET)}"]']
        if tenant == "bob":
            lines.append("isolate_cache = false")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", params=["grpc", "http"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proc]:
    """A fresh worker (an empty cache) each time, fronted over gRPC (the HTTP front
    relays to its OpenAI port) or as a plain OpenAI upstream."""
    worker = start_sim_worker("--http-port", "0")
    try:
        config = write_config(tmp_path_factory.mktemp("isolation") / "admission.toml")
        gw = start_gateway(
            "--worker", worker.ready[request.param], "--grpc-port", "0",
            "--admission-config", str(config),
        )  # fmt: skip
        try:
            yield gw
        finally:
            gw.stop()
    finally:
        worker.stop()


def cached(gw: Proc, tenant: str, salt: str | None = None, prompt: str = PROMPT) -> int:
    """The prompt's cached tokens as the answer's usage says, over HTTP."""
    body: dict[str, object] = {"model": "sim", "prompt": prompt, "max_tokens": 2}
    if salt is not None:
        body["cache_salt"] = salt
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[tenant]}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        usage = json.loads(r.read())["usage"]
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def cached_grpc(gw: Proc, tenant: str, prompt: str = PROMPT) -> int:
    with grpc.insecure_channel(gw.ready["grpc"]) as ch:
        req = pb.GenerateRequest(model="sim", text=prompt)
        req.stream_options.include_usage = True
        req.sampling.max_tokens = 2
        md = (("authorization", f"Bearer {KEYS[tenant]}"),)
        out = list(pb_grpc.InferenceStub(ch).Generate(req, timeout=60, metadata=md))
    return next(r.usage.cached_prompt_tokens for r in out if r.HasField("usage"))


def test_isolated_tenants_hit_only_their_own_prompts(gateway: Proc) -> None:
    """First with each worker: its cache starts empty."""
    assert cached(gateway, "alice") == 0
    hits = cached(gateway, "alice")
    assert hits >= 32  # the prompt's whole blocks, bar the last token's
    assert cached(gateway, "carol") == 0  # the same prompt, another isolated tenant
    assert cached(gateway, "bob") == 0  # nor a tenant that shares: alice's blocks are hers
    assert cached(gateway, "bob") == hits
    # a client naming a salt (up to the longest) stays inside its own tenant's cache
    assert cached(gateway, "bob", salt="x") == 0
    longest = "x" * 128
    assert cached(gateway, "carol", salt=longest) == 0
    assert cached(gateway, "carol", salt=longest) == hits
    # over gRPC alike: carol's and alice's prompts are theirs
    assert cached_grpc(gateway, "carol") == hits
    other = PROMPT.replace("system", "shared")
    assert cached_grpc(gateway, "alice", other) == 0
    assert cached(gateway, "carol", prompt=other) == 0
    assert cached(gateway, "alice", prompt=other) >= 32


def test_a_bad_cache_salt_is_a_clear_400(gateway: Proc) -> None:
    for salt in ("", 7, "s" * 129):
        with pytest.raises(urllib.error.HTTPError) as e:
            cached(gateway, "bob", salt=salt)  # type: ignore[arg-type]
        assert e.value.code == 400
        assert json.loads(e.value.read())["error"]["param"] == "cache_salt"
