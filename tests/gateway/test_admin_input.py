"""Hostile values reaching the admission and override code the admin API feeds: refused as
ValueErrors (400s) rather than OverflowErrors (500s), stored ones skipped, and one consumer
of an admin change failing never keeps the others (key revocation above all) from it."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.admin.overrides import SPLIT, WEIGHT, Overrides, Split
from gateway.admission import Admission, AdmissionSettings, Quota, Tenant
from gateway.admission import admission as admission_mod
from gateway.admission.tenants import (
    MAX_COUNT,
    new_api_key,
    quota_from_fields,
    settings_from_dict,
)
from gateway.app import Gateway
from proto.openai_compat import OpenAIError

SECRET = b"admin-input-secret"
HUGE = 10**400
"""Past any double: what Python's json reads from a store or config file without complaint."""


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"max_concurrent": HUGE}, "max_concurrent"),
        ({"max_concurrent": 2**62}, "max_concurrent"),
        ({"max_concurrent": MAX_COUNT + 1}, "max_concurrent"),
        ({"requests_per_second": HUGE}, "requests_per_second"),
        ({"requests_per_second": 1e300}, "requests_per_second"),
        ({"requests_per_second": 5e-324}, "requests_per_second"),  # 0 once halved
        ({"requests_per_second": float("nan")}, "requests_per_second"),
        ({"tokens_per_second": 10, "token_burst": float("inf")}, "token_burst"),
        ({"priority": HUGE}, "priority"),
    ],
)
def test_out_of_range_quota_fields_are_value_errors(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"quota.{name}") as info:
        quota_from_fields(fields, Quota(), "quota")
    assert len(str(info.value)) < 200  # no wall of digits


def test_the_largest_quota_allowed_divides_among_processes() -> None:
    adm = Admission(AdmissionSettings(tenants=(Tenant("alice"),)), processes=2)
    adm.set_quotas({"alice": {"max_concurrent": MAX_COUNT, "requests_per_second": 1e15}})
    assert adm.tenant_quotas()["alice"].max_concurrent == MAX_COUNT
    share = adm._quotas["alice"]  # this process's half
    assert (share.max_concurrent, share.requests_per_second) == (MAX_COUNT // 2, 5e14)


def test_a_huge_stored_quota_is_skipped_not_raised() -> None:
    """What an older gateway saved (it took any integer): dividing it among processes
    raised OverflowError on every later admin change."""
    adm = Admission(AdmissionSettings(tenants=(Tenant("alice"), Tenant("bob"))), processes=2)
    adm.set_quotas({"alice": {"max_concurrent": HUGE}, "bob": {"max_concurrent": 4}})
    quotas = adm.tenant_quotas()
    assert quotas["alice"].max_concurrent is None and quotas["bob"].max_concurrent == 4


def test_config_numbers_past_a_double_are_value_errors() -> None:
    for table, data in (
        ("global", {"max_in_flight": HUGE}),
        ("global", {"max_queue_wait_s": HUGE}),
        ("redis", {"op_timeout_s": HUGE}),
        ("defaults", {"max_concurrent": HUGE}),
    ):
        with pytest.raises(ValueError, match=table):
            settings_from_dict({table: data}, env={})
    keys = [{"id": "abcdefabcdef", "digest": "0" * 64, "expires_at": HUGE}]
    with pytest.raises(ValueError, match="expires_at"):
        settings_from_dict({"key_secret": "s", "tenants": {"a": {"keys": keys}}}, env={})


def test_a_stored_key_with_a_huge_expiry_is_skipped_and_the_others_still_apply() -> None:
    adm = Admission(AdmissionSettings(tenants=(Tenant("alice"),), key_secret=SECRET))
    good, good_id, digest = new_api_key(SECRET)
    _, bad_id, bad_digest = new_api_key(SECRET)
    adm.tenants.set_runtime_keys(
        {
            bad_id: {"tenant": "alice", "digest": bad_digest, "expires_at": HUGE},
            good_id: {"tenant": "alice", "digest": digest, "created_at": time.time()},
        }
    )
    assert adm.tenants.key(bad_id) is None
    assert adm.tenants.authenticate(f"Bearer {good}").name == "alice"


def test_a_split_stored_with_weights_summing_past_a_double_still_splits_evenly() -> None:
    split = Split({"v1": 1.7e308, "v2": 1.7e308})
    assert Counter(split.pick() for _ in range(1000)) == {"v1": 500, "v2": 500}
    split = Split({"v1": HUGE, "v2": True, "v3": "1e3", "v4": float("nan"), "v5": 3})
    assert split.weights == {"v5": 3.0}


def test_junk_in_the_store_is_ignored_not_raised() -> None:
    """The store is JSON anyone with access may have edited: an entry of the wrong shape
    used to raise inside the refresh (and stop it for good)."""
    overrides = Overrides(store=SimpleNamespace())  # type: ignore[arg-type]
    overrides._apply(
        {
            SPLIT + "a": json.dumps([1, 2]),
            SPLIT + "b": json.dumps({"v1": 0}),
            SPLIT + "c": '{"v1": 1e999, "v2": 2}',  # Python's json reads it as inf
            SPLIT + "d": json.dumps({"v1": HUGE}),
            WEIGHT + "w1": json.dumps(HUGE),
            WEIGHT + "w2": "2",
        }
    )
    assert set(overrides.splits) == {"c"} and overrides.splits["c"].weights == {"v2": 2.0}
    assert overrides.weights == {"w2": 2.0}


def test_apply_overrides_revokes_keys_when_other_consumers_raise(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the consumers ran in a row: a quota that overflowed (as a huge max_concurrent
    did with two processes) skipped the key update after it, so a revoked key kept working,
    and the upstream pruning, on every later admin change."""
    adm = Admission(AdmissionSettings(tenants=(Tenant("alice"),), key_secret=SECRET), processes=2)

    def overflow(*_: Any) -> Quota:
        raise OverflowError("integer division result too large for a float")

    monkeypatch.setattr(admission_mod, "quota_share", overflow)

    def broken(*_: Any) -> None:
        raise RuntimeError("a consumer's bug")

    key, key_id, digest = new_api_key(SECRET)
    entry = {"tenant": "alice", "digest": digest, "created_at": time.time(), "revoked": False}
    pruned: list[set[str]] = []
    gw = SimpleNamespace(
        overrides=SimpleNamespace(
            keys={key_id: entry}, quotas={"alice": {"max_concurrent": 4}}, upstreams={}, shadows={}
        ),
        admission=adm,
        registry=SimpleNamespace(apply=broken, workers=lambda: [SimpleNamespace(worker_id="w1")]),
        shadows=SimpleNamespace(configure=broken),
        dispatcher=SimpleNamespace(prune_upstreams=pruned.append),
    )
    with caplog.at_level(logging.ERROR, "breakwater.gateway"):
        Gateway._apply_overrides(gw)  # type: ignore[arg-type]
        assert adm.tenants.authenticate(f"Bearer {key}").name == "alice"
        gw.overrides.keys = {key_id: {**entry, "digest": None, "revoked": True}}
        Gateway._apply_overrides(gw)  # type: ignore[arg-type]
    with pytest.raises(OpenAIError) as info:
        adm.tenants.authenticate(f"Bearer {key}")
    assert info.value.status == 401
    assert pruned == [{"w1"}, {"w1"}]
    failed = {r.getMessage() for r in caplog.records}
    assert failed == {
        "applying the admin overrides' upstreams failed",
        "applying the admin overrides' shadows failed",
        "applying the admin overrides' quotas failed",
    }
