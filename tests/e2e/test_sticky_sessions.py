"""Sticky sessions and per-model policies, through a real gateway in front of sim workers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from loadtest.fleet import Proc, admin_json, start_gateway, start_sim_worker, wait_for
from proto import inference_pb2 as pb
from proto import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[Proc, list[Proc]]]:
    workers = [start_sim_worker("--worker-id", f"w{i}") for i in range(3)]
    args = [x for w in workers for x in ("--worker", w.ready["grpc"])]
    gw = start_gateway(
        *args, "--grpc-port", "0", "--sticky-sessions", "--model-routing", "sim=round-robin"
    )
    try:
        wait_for(
            lambda: (
                sum(w["state"] == "SERVING" for w in admin_json(gw, "/admin/workers")["workers"])
                == 3
            ),
            timeout=60,
        )
        yield gw, workers
    finally:
        gw.stop()
        for w in workers:
            w.stop()


def complete(
    gw: Proc, headers: dict[str, str] | None = None, **body: object
) -> tuple[int, dict, str]:
    req = urllib.request.Request(
        gw.ready["http"] + "/v1/completions",
        data=json.dumps(
            {"model": "sim", "prompt": "hello there", "max_tokens": 2, **body}
        ).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers["x-breakwater-worker"]
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), ""


def test_a_session_header_or_user_keeps_requests_on_one_replica(
    fleet: tuple[Proc, list[Proc]],
) -> None:
    gw, _ = fleet
    owners = set()
    for s in range(6):
        seen = {
            complete(gw, {"X-Session-Id": f"sess-{s}"}, prompt=f"turn {t}")[2] for t in range(4)
        }
        assert len(seen) == 1, seen
        owners |= seen
        users = {complete(gw, user=f"user-{s}", prompt=f"turn {t}")[2] for t in range(3)}
        assert len(users) == 1, users
    assert len(owners) >= 2  # six sessions do not all land on one of three replicas


def generate_calls(workers: list[Proc]) -> list[int]:
    out = []
    for w in workers:
        with grpc.insecure_channel(w.ready["grpc"]) as ch:
            out.append(
                pb_grpc.InferenceStub(ch).Stats(pb.StatsRequest(), timeout=30).generate_calls
            )
    return out


def test_grpc_metadata_session_key_sticks(fleet: tuple[Proc, list[Proc]]) -> None:
    gw, workers = fleet
    before = generate_calls(workers)
    with grpc.insecure_channel(gw.ready["grpc"]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for t in range(4):
            request = pb.GenerateRequest(
                model="sim", text=f"turn {t}", sampling=pb.SamplingParams(max_tokens=2)
            )
            list(stub.Generate(request, metadata=(("x-session-id", "grpc-session"),), timeout=60))
    grew = sorted(b - a for a, b in zip(before, generate_calls(workers), strict=True))
    assert grew == [0, 0, 4]
    routing = admin_json(gw, "/admin/workers")["routing"]
    assert isinstance(routing.pop("tokenizers"), list)  # loaded as the workers' reports come
    assert routing == {
        "default": "prefix-aware",
        "per_model": {"sim": "round-robin"},
        "sticky_sessions": True,
        "prefilling": {},
        "decisions": {},  # every call went by session or by round-robin, none prefix-aware
    }


def test_without_a_session_the_models_own_policy_applies(fleet: tuple[Proc, list[Proc]]) -> None:
    gw, _ = fleet
    picks = Counter(complete(gw, prompt="the same prompt every time")[2] for _ in range(9))
    assert sorted(picks.values()) == [3, 3, 3], picks  # round-robin for `sim`, not prefix-aware


def test_a_user_that_is_not_a_string_is_a_clear_400(fleet: tuple[Proc, list[Proc]]) -> None:
    gw, _ = fleet
    status, body, _ = complete(gw, user=42)
    assert status == 400
    assert body["error"]["param"] == "user"
