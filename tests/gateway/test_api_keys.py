"""`bw_<id>.<secret>` API keys: their format, the lookup by id with one constant-time
comparison, revocation and expiry at run time, the older digests still working, the config
file and CLI, and the admin API that makes, lists and revokes them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.admin.api import AdminAPI
from gateway.admin.overrides import FileStore, Overrides
from gateway.admission import Admission, AdmissionSettings, Quota, Tenant
from gateway.admission import tenants as tenants_mod
from gateway.admission.tenants import (
    KEY_SECRET_ENV,
    ApiKey,
    TenantDirectory,
    hash_key,
    new_api_key,
    settings_from_dict,
    split_key,
)
from proto.openai_compat import OpenAIError

SECRET = b"server-secret"
KEY_SHAPE = re.compile(r"bw_([A-Za-z0-9]{12})\.([A-Za-z0-9_-]{43,})")


def directory(*tenants: Tenant) -> TenantDirectory:
    return TenantDirectory(AdmissionSettings(tenants=tenants, key_secret=SECRET))


def made(tenant: str, **entry: Any) -> tuple[str, str, dict[str, Any]]:
    """A key as the admin API makes it: (key, id, store entry)."""
    key, key_id, digest = new_api_key(SECRET)
    return key, key_id, {"tenant": tenant, "digest": digest, "created_at": time.time(), **entry}


def refusal(d: TenantDirectory, key: str | None) -> dict[str, Any]:
    with pytest.raises(OpenAIError) as info:
        d.authenticate(None if key is None else f"Bearer {key}")
    assert info.value.status == 401
    return info.value.body()


# --- format ---------------------------------------------------------------------------------


def test_key_format_id_and_digest_of_the_secret_part() -> None:
    keys = [new_api_key(SECRET) for _ in range(50)]
    for key, key_id, digest in keys:
        m = KEY_SHAPE.fullmatch(key)
        assert m and m.group(1) == key_id
        secret_part = m.group(2)
        assert len(base64.urlsafe_b64decode(secret_part + "==")) >= 32
        assert digest == hmac.new(SECRET, secret_part.encode(), hashlib.sha256).hexdigest()
        assert split_key(key) == (key_id, secret_part)
    assert len({k[1] for k in keys}) == 50 and len({k[0] for k in keys}) == 50


@pytest.mark.parametrize(
    "key",
    ["sk-abc", "bw-abcdefghijkl.x", "bw_abc.defg", "bw_abcdefghijkl.", "bw_abcdefghijkl", "bw_"],
)
def test_other_shapes_are_keys_of_the_older_kind(key: str) -> None:
    assert split_key(key) is None


def test_new_key_never_reuses_a_taken_id(monkeypatch: pytest.MonkeyPatch) -> None:
    chars = iter("a" * 12 + "b" * 12)  # the first id drawn is taken, the second is not
    monkeypatch.setattr(tenants_mod.secrets, "choice", lambda _: next(chars))
    assert new_api_key(SECRET, {"a" * 12})[1] == "b" * 12


# --- lookup by id, one constant-time comparison --------------------------------------------


def test_a_key_is_found_by_id_with_one_compare_digest(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    d = directory(Tenant("acme"), Tenant("zeta"))
    entries = {}
    for name in ("acme", "zeta"):
        for _ in range(20):
            key, key_id, entry = made(name)
            entries[key_id] = entry
    d.set_runtime_keys(entries)
    calls = compare_calls
    assert d.authenticate(f"Bearer {key}").name == "zeta"
    assert len(calls) == 1  # no loop over the 40 keys, nor over tenants
    assert all(len(a) == len(b) == 32 for a, b in calls)


def test_unknown_id_and_wrong_secret_cost_the_same_and_answer_the_same(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    d = directory(Tenant("acme"))
    key, key_id, entry = made("acme")
    d.set_runtime_keys({key_id: entry})
    calls = compare_calls
    wrong_secret = f"bw_{key_id}.{'A' * 43}"
    unknown_id = "bw_" + "Z" * 12 + "." + key.partition(".")[2]
    bodies = [refusal(d, wrong_secret), refusal(d, unknown_id)]
    assert len(calls) == 2  # one comparison each: the unknown id against a dummy digest
    assert bodies[0] == bodies[1]
    assert bodies[0]["error"]["code"] == "invalid_api_key"
    assert key.partition(".")[2] not in json.dumps(bodies)


def test_the_failure_body_is_openai_shaped_and_never_echoes_the_key() -> None:
    d = directory(Tenant("acme"))
    key, key_id, entry = made("acme", revoked=True)
    d.set_runtime_keys({key_id: entry})
    body = refusal(d, key)
    assert body == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert refusal(d, None)["error"]["code"] == "invalid_api_key"


# --- revocation and expiry -----------------------------------------------------------------


def test_revoked_at_run_time_stops_working_at_once() -> None:
    d = directory(Tenant("acme"))
    old, old_id, old_entry = made("acme")
    d.set_runtime_keys({old_id: old_entry})
    assert d.authenticate(f"Bearer {old}").name == "acme"
    new, new_id, new_entry = made("acme")
    d.set_runtime_keys({old_id: old_entry, new_id: new_entry})  # rotation: both work
    assert d.authenticate(f"Bearer {old}").name == "acme"
    assert d.authenticate(f"Bearer {new}").name == "acme"
    revoked = {"tenant": "acme", "revoked": True, "revoked_at": time.time()}
    d.set_runtime_keys({old_id: revoked, new_id: new_entry})
    refusal(d, old)
    assert d.authenticate(f"Bearer {new}").name == "acme"
    assert [k.revoked for k in d.keys_of("acme")] == [True, False]


def test_expired_keys_are_refused() -> None:
    d = directory(Tenant("acme"))
    gone, gone_id, gone_entry = made("acme", expires_at=time.time() - 1)
    live, live_id, live_entry = made("acme", expires_at=time.time() + 3600)
    d.set_runtime_keys({gone_id: gone_entry, live_id: live_entry})
    refusal(d, gone)
    assert d.authenticate(f"Bearer {live}").name == "acme"
    views = {k.key_id: k.view(time.time()) for k in d.keys_of("acme")}
    assert views[gone_id]["expired"] and not views[live_id]["expired"]


def test_a_config_key_can_be_revoked_at_run_time() -> None:
    key, key_id, digest = new_api_key(SECRET)
    d = directory(Tenant("acme", keys=(ApiKey(key_id, "acme", digest),)))
    assert d.authenticate(f"Bearer {key}").name == "acme"
    d.set_runtime_keys({key_id: {"tenant": "acme", "revoked": True}})
    refusal(d, key)
    d.set_runtime_keys({})
    assert d.authenticate(f"Bearer {key}").name == "acme"


def test_keys_made_at_run_time_close_an_open_gateway_and_revoking_never_reopens_it() -> None:
    d = TenantDirectory(AdmissionSettings(key_secret=SECRET))
    assert not d.keys_required and d.authenticate(None).name == "default"
    key, key_id, entry = made("default")
    d.set_runtime_keys({key_id: entry})
    assert d.keys_required and d.default is None
    refusal(d, None)
    assert d.authenticate(f"Bearer {key}").name == "default"
    d.set_runtime_keys({key_id: {"tenant": "default", "revoked": True}})
    assert d.keys_required
    refusal(d, None)
    refusal(d, key)


def test_require_keys_fails_closed_before_any_key_exists() -> None:
    """--require-api-keys (or `require_keys = true`): no key yet, or the store not read
    yet, refuses everyone rather than serving everyone; a key made later works."""
    settings = settings_from_dict({"key_secret": SECRET.decode(), "require_keys": True}, env={})
    d = TenantDirectory(settings)
    assert d.keys_required and d.default is None
    refusal(d, None)
    refusal(d, "bw_abcdefabcdef.whatever-was-guessed-here-0123456789012345678")
    key, key_id, entry = made("default")
    d.set_runtime_keys({key_id: entry})
    assert d.authenticate(f"Bearer {key}").name == "default"
    d.set_runtime_keys({})  # the store emptied (or unreadable on a reload): still closed
    refusal(d, key)
    with pytest.raises(ValueError, match="require_keys"):
        settings_from_dict({"require_keys": "yes"}, env={})


def test_entries_for_unknown_tenants_or_garbage_are_skipped() -> None:
    d = directory(Tenant("acme"))
    key, key_id, entry = made("nobody")
    d.set_runtime_keys(
        {key_id: entry, "short": {"tenant": "acme"}, "x" * 12: "junk", "y" * 12: {"tenant": 1}}
    )
    refusal(d, key)
    assert d.keys_of("acme") == []


# --- older keys -----------------------------------------------------------------------------


def test_older_key_digests_keep_working_next_to_new_keys(
    compare_calls: list[tuple[bytes, bytes]],
) -> None:
    d = directory(
        Tenant("old", Quota(), (hash_key("sk-legacy", SECRET), hash_key("a.b.c", SECRET))),
        Tenant("new"),
    )
    key, key_id, entry = made("new")
    d.set_runtime_keys({key_id: entry})
    calls = compare_calls
    assert d.authenticate("Bearer sk-legacy").name == "old"
    assert len(calls) == 2  # the older loop: every digest, no early exit
    assert d.authenticate("Bearer a.b.c").name == "old"  # dots, but no id of ours
    calls.clear()
    assert d.authenticate(f"Bearer {key}").name == "new"
    assert len(calls) == 1
    # an old key shaped like a new one whose id is unknown still falls back to the loop
    odd = "bw_" + "q" * 12 + ".legacy"
    d2 = directory(Tenant("old", Quota(), (hash_key(odd, SECRET),)))
    assert d2.authenticate(f"Bearer {odd}").name == "old"


# --- config file and CLI -------------------------------------------------------------------


def test_config_keys_load_and_authenticate() -> None:
    key, key_id, digest = new_api_key(SECRET)
    text = f'[tenants.acme]\nkeys = [{{id = "{key_id}", digest = "{digest.upper()}"}}]\n'
    settings = settings_from_dict(tomllib.loads(text), env={KEY_SECRET_ENV: SECRET.decode()})
    (acme,) = settings.tenants
    assert acme.keys == (ApiKey(key_id, "acme", digest),)
    assert TenantDirectory(settings).authenticate(f"Bearer {key}").name == "acme"


@pytest.mark.parametrize(
    ("keys", "match"),
    [
        ("nope", "must be a list"),
        ([{"id": "short", "digest": "0" * 64}], "letters and digits"),
        ([{"id": "a" * 12, "digest": "bw_aaaaaaaaaaaa.secret"}], "64 hex"),
        ([{"id": "a" * 12, "digest": "0" * 64, "secret": "x"}], "unknown field"),
        ([{"id": "a" * 12, "digest": "0" * 64, "expires_at": "soon"}], "Unix seconds"),
        ([{"id": "a" * 12, "digest": "0" * 64}, {"id": "a" * 12, "digest": "1" * 64}], "id"),
    ],
)
def test_config_key_errors_are_explicit(keys: Any, match: str) -> None:
    data = {"key_secret": "s", "tenants": {"acme": {"keys": keys}}}
    with pytest.raises(ValueError, match=match):
        settings_from_dict(data, env={})


def test_config_keys_need_the_secret() -> None:
    data = {"tenants": {"acme": {"keys": [{"id": "a" * 12, "digest": "0" * 64}]}}}
    with pytest.raises(ValueError, match=KEY_SECRET_ENV):
        settings_from_dict(data, env={})


def test_cli_new_key_prints_the_key_once_and_its_config_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(KEY_SECRET_ENV, "cli-secret")
    assert tenants_mod.main(["new-key", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"^key:\s+(\S+)$", out, re.M)
    assert key and KEY_SHAPE.fullmatch(key.group(1))
    config = "\n".join(line for line in out.splitlines() if not re.match(r"\w+:", line))
    settings = settings_from_dict(tomllib.loads(config))
    assert TenantDirectory(settings).authenticate(f"Bearer {key.group(1)}").name == "acme"
    assert out.count(key.group(1)) == 1
    with pytest.raises(SystemExit):
        tenants_mod.main(["new-key", "--tenant", "no spaces"])


# --- admin API ------------------------------------------------------------------------------

TOKEN = "admin-token"


async def admin_session(tmp_path: Path, secret: bytes | None = SECRET) -> Any:
    adm = Admission(AdmissionSettings(tenants=(Tenant("acme"),), key_secret=secret))
    overrides = Overrides(FileStore(str(tmp_path)))
    overrides.listeners.append(lambda: adm.tenants.set_runtime_keys(overrides.keys))
    await overrides.start()
    api = AdminAPI(TOKEN, overrides, dict, set, lambda _: False, admission=adm)
    client = TestClient(TestServer(api.app()))
    await client.start_server()
    client.session.headers["Authorization"] = f"Bearer {TOKEN}"
    return client, adm, overrides


def test_admin_api_makes_lists_and_revokes_keys(tmp_path: Path) -> None:
    async def main() -> None:
        client, adm, overrides = await admin_session(tmp_path)
        try:
            assert (await client.post("/admin/tenants/nobody/keys")).status == 404
            r = await client.post("/admin/tenants/acme/keys", json={"expires_in_s": 3600})
            assert r.status == 200 and r.headers["Cache-Control"] == "no-store"
            made = await r.json()
            key, key_id = made["key"], made["key_id"]
            assert KEY_SHAPE.fullmatch(key) and key.startswith(f"bw_{key_id}.")
            assert made["expires_at"] == pytest.approx(time.time() + 3600, abs=5)
            assert adm.tenants.authenticate(f"Bearer {key}").name == "acme"
            bad = await client.post("/admin/tenants/acme/keys", json={"expires_in_s": -1})
            assert bad.status == 400
            assert (await client.post("/admin/tenants/acme/keys", json={"x": 1})).status == 400
            r2 = await client.post("/admin/tenants/acme/keys")  # no body: never expires
            key2 = (await r2.json())["key"]
            listed = await (await client.get("/admin/tenants/acme/keys")).json()
            assert [k["id"] for k in listed["keys"]] == [key_id, split_key(key2)[0]]  # type: ignore[index]
            assert listed["keys"][1]["expires_at"] is None
            r = await client.delete(f"/admin/tenants/acme/keys/{key_id}")
            assert r.status == 200
            with pytest.raises(OpenAIError):
                adm.tenants.authenticate(f"Bearer {key}")
            assert adm.tenants.authenticate(f"Bearer {key2}").name == "acme"
            assert (await client.delete(f"/admin/tenants/acme/keys/{key_id}")).status == 200
            assert (await client.delete("/admin/tenants/acme/keys/" + "n" * 12)).status == 404
            listed = await (await client.get("/admin/tenants/acme/keys")).json()
            assert [k["revoked"] for k in listed["keys"]] == [True, False]
            audit = await (await client.get("/admin/audit")).json()
            actions = [(e["action"], e.get("key_id")) for e in audit["entries"]]
            assert ("key_create", key_id) in actions and ("key_revoke", key_id) in actions
            # neither secrets nor digests in what the admin API lists, nor in the audit
            stored = (tmp_path / "admin-overrides.json").read_text()
            for text in (json.dumps(listed), json.dumps(audit), stored):
                for k in (key, key2):
                    assert k.partition(".")[2] not in text
            assert "digest" not in json.dumps(listed) and "digest" not in json.dumps(audit)
        finally:
            await client.close()
            await overrides.close()

    asyncio.run(main())


def test_admin_api_needs_a_secret_to_make_keys(tmp_path: Path) -> None:
    async def main() -> None:
        client, _, overrides = await admin_session(tmp_path, secret=None)
        try:
            r = await client.post("/admin/tenants/acme/keys")
            assert r.status == 409
            assert KEY_SECRET_ENV in (await r.json())["error"]["message"]
        finally:
            await client.close()
            await overrides.close()

    asyncio.run(main())
