"""The gateway's Router: a policy per model, and sticky sessions with a load bound."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from gateway.registry.base import WorkerInfo
from gateway.routing.policy import PrefixAware, Router, sticky_choice
from gateway.settings import add_gateway_args, settings_from_args
from proto import inference_pb2 as pb
from serving.registry_record import WorkerState


def pool(n: int) -> list[WorkerInfo]:
    return [
        WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", state=WorkerState.SERVING) for i in range(n)
    ]


def req(model: str = "m", session: str = "", text: str = "hello") -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, text=text, session_key=session)


def test_a_session_stays_on_one_replica_and_sessions_spread() -> None:
    workers = pool(4)
    router = Router("round-robin", sticky=True)
    owners = {}
    for s in range(200):
        key = f"session-{s}"
        picks = {
            router.choose(workers, req(session=key, text=f"t{t}"), {}).worker_id for t in range(5)
        }
        assert len(picks) == 1, picks
        owners[key] = picks.pop()
    spread = Counter(owners.values())
    assert len(spread) == 4 and min(spread.values()) > 200 / 4 / 2, spread


def test_stickiness_is_the_same_in_every_gateway_and_moves_only_a_leavers_sessions() -> None:
    workers = pool(4)
    a, b = Router("prefix-aware", sticky=True), Router("least-outstanding", sticky=True)
    keys = [f"user-{i}" for i in range(100)]
    before = {k: a.choose(workers, req(session=k), {}).worker_id for k in keys}
    assert before == {k: b.choose(workers, req(session=k), {}).worker_id for k in keys}
    after = {k: a.choose(workers[1:], req(session=k), {}).worker_id for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "w0"}


def test_a_busy_owner_is_skipped_until_it_has_room() -> None:
    workers = pool(3)
    owner = sticky_choice("s", workers, {})
    busy = {owner.worker_id: 20}
    assert sticky_choice("s", workers, busy) is not owner
    assert sticky_choice("s", workers, {owner.worker_id: 4}) is owner  # within min*1.5+4


def test_without_a_session_key_or_stickiness_the_policy_decides() -> None:
    workers = pool(3)
    router = Router("round-robin", sticky=False)
    picks = [router.choose(workers, req(session="same"), {}).worker_id for _ in range(6)]
    assert picks == ["w0", "w1", "w2", "w0", "w1", "w2"]
    sticky = Router("round-robin", sticky=True)
    picks = [sticky.choose(workers, req(), {}).worker_id for _ in range(3)]
    assert picks == ["w0", "w1", "w2"]


def test_policies_per_model_and_one_prefix_index_for_all() -> None:
    router = Router("prefix-aware", {"batch": "round-robin", "chat": "least-outstanding"})
    assert router.policy_for("batch").name == "round-robin"
    assert router.policy_for("chat").name == "least-outstanding"
    assert router.policy_for("other").name == "prefix-aware"
    assert router.prefix_aware() is router.default
    assert router.describe() == {
        "default": "prefix-aware",
        "per_model": {"batch": "round-robin", "chat": "least-outstanding"},
        "sticky_sessions": False,
        "tokenizers": [],
        "prefilling": {},
        "decisions": {},
    }
    workers = pool(3)
    picks = [router.choose(workers, req("batch"), {"w0": 9}).worker_id for _ in range(3)]
    assert picks == ["w0", "w1", "w2"]  # round-robin ignores load
    assert router.choose(workers, req("chat"), {"w0": 2, "w1": 0, "w2": 1}).worker_id == "w1"


def test_the_same_prompt_for_two_models_does_not_share_prefix_keys() -> None:
    router = Router("prefix-aware")
    workers = pool(2)
    text = "a long shared system prompt " * 20
    first = router.choose(workers, req("m1", text=text), {})
    router.routed(first, req("m1", text=text))
    other = next(w for w in workers if w is not first)
    # m2 has never been sent this prompt: the least loaded replica wins, not m1's holder
    assert router.choose(workers, req("m2", text=text), {first.worker_id: 1}) is other


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("random")


def test_weights_scale_load_for_balancing_policies_and_round_robin_interleaves() -> None:
    from gateway.routing.policy import LeastOutstanding, RoundRobin, WeightedLoads

    a, b = WorkerInfo("a", "a:1"), WorkerInfo("b", "b:1")
    req = pb.GenerateRequest(model="m", text="x")
    loads = WeightedLoads({"a": 4, "b": 3}, {"a": 2.0})
    assert loads.get("a") == 2.0 and loads.get("b") == 3.0
    # weight 2 carries twice the calls before it counts as equally loaded
    assert LeastOutstanding().choose([a, b], req, loads).worker_id == "a"
    rr = RoundRobin()
    picks = [rr.choose([a, b], req, WeightedLoads({}, {"a": 2.0})).worker_id for _ in range(6)]
    assert picks == ["a", "b", "a", "a", "b", "a"]


def test_prefix_aware_tuning_comes_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:

    def parsed(*argv: str) -> PrefixAware:
        p = argparse.ArgumentParser()
        add_gateway_args(p)
        s = settings_from_args(p.parse_args(list(argv)))
        r = Router(
            s.routing, None, False, s.balance_rel, s.balance_abs, s.cache_threshold, s.miss_weight
        )
        pa = r.prefix_aware()
        assert pa is not None
        return pa

    pa = parsed()
    assert (pa.rel, pa.abs, pa.min_share, pa.miss_weight) == (1.5, 8.0, 0.3, 3.0)
    pa = parsed("--cache-threshold", "0.5", "--miss-weight", "2", "--balance-abs", "16")
    assert (pa.abs, pa.min_share, pa.miss_weight) == (16.0, 0.5, 2.0)
    monkeypatch.setenv("BREAKWATER_GATEWAY_CACHE_THRESHOLD", "0.1")
    assert parsed().min_share == 0.1
    for bad in (["--cache-threshold", "2"], ["--miss-weight", "0"], ["--balance-rel", "0.5"]):
        with pytest.raises(SystemExit):
            parsed(*bad)


def test_round_robin_keeps_a_turn_per_candidate_set() -> None:
    """A shadow's pool taking every third turn of one shared counter left one of three
    replicas out; each set keeps its own turn now."""
    from gateway.routing.policy import RoundRobin

    three = [WorkerInfo(w, f"{w}:1") for w in ("a", "b", "c")]
    shadow = [WorkerInfo("s", "s:1")]
    req = pb.GenerateRequest(model="m", text="x")
    rr = RoundRobin()
    picks = []
    for _ in range(30):
        picks += [rr.choose(three, req, {}).worker_id for _ in range(2)]
        rr.choose(shadow, req, {})
    assert {w: picks.count(w) for w in "abc"} == {"a": 20, "b": 20, "c": 20}


def test_least_outstanding_shares_a_light_load_by_weight() -> None:
    """Idle replicas tie: they take turns (weighted), where a hashed tie-break sent one
    replica nearly everything and weights changed nothing."""
    from gateway.routing.policy import LeastOutstanding, WeightedLoads

    workers = [WorkerInfo(w, f"{w}:1") for w in ("a", "b", "c")]
    req = pb.GenerateRequest(model="m", text="x")
    lo = LeastOutstanding()
    picks = [lo.choose(workers, req, {}).worker_id for _ in range(90)]
    assert {w: picks.count(w) for w in "abc"} == {"a": 30, "b": 30, "c": 30}
    weighted = WeightedLoads({}, {"a": 4.0})
    picks = [lo.choose(workers, req, weighted).worker_id for _ in range(60)]
    assert {w: picks.count(w) for w in "abc"} == {"a": 40, "b": 10, "c": 10}
    # under load, the fewest calls in flight per unit of weight still wins
    assert (
        lo.choose(workers, req, WeightedLoads({"a": 9, "b": 1, "c": 2}, {"a": 4.0})) == (workers[1])
    )
