"""API keys: the keys file and its command (a key shown once, stored hashed, revoked on the fly), routing among a
key's tenants in the model (one mixed batch, never another tenant's expert), and the HTTP service with keys on: a
tenant outside the key refused with the same 403 whether or not it exists, a routed query answered among the key's
tenants only, a revoked key refused within the poll delay, `/health` open, the state routes for an admin key."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from moe.model import ExpertInfo, build_mixture
from moe.serving import keys as api_keys
from tests.service import call, serving


def add_key(path, *args: str, capsys) -> str:
    assert api_keys.main(["add", "--file", str(path), *args]) == 0
    return capsys.readouterr().out.strip()


def test_a_key_is_shown_once_stored_hashed_and_revoked(tmp_path, capsys):
    path = tmp_path / "keys.json"
    key = add_key(path, "--tenants", "bank,music", capsys=capsys)
    admin = add_key(path, "--tenants", "*", "--admin", capsys=capsys)
    stored = path.read_text()
    assert key not in stored and key.split(".")[1] not in stored and api_keys.digest(key) in stored
    ring = api_keys.KeyFile(path, poll_s=0.05)
    record = ring.authenticate(key)
    assert record.tenants == ("bank", "music") and not record.admin and record.among() == {"bank", "music"}
    assert ring.authenticate(admin).admin and ring.authenticate(admin).among() is None
    for bad in (None, "", key + "x", key.split(".")[0], "nope." + key.split(".")[1], admin[:-1]):
        with pytest.raises(api_keys.KeyRefused) as refused:
            ring.authenticate(bad)
        assert refused.value.status == 401
    assert api_keys.main(["revoke", "--file", str(path), record.id]) == 0
    time.sleep(0.1)
    with pytest.raises(api_keys.KeyRefused, match="unknown or revoked"):
        ring.authenticate(key)
    assert ring.authenticate(admin).admin  # the other key still holds
    with pytest.raises(SystemExit):
        api_keys.main(["revoke", "--file", str(path), record.id])  # already gone: named
    capsys.readouterr()
    assert api_keys.main(["list", "--file", str(path)]) == 0 and key.split(".")[0] not in capsys.readouterr().out


def test_a_keys_file_that_cannot_be_read_refuses_every_key(tmp_path, capsys):
    path = tmp_path / "keys.json"
    key = add_key(path, "--tenants", "bank", capsys=capsys)
    ring = api_keys.KeyFile(path, poll_s=0.01)
    path.write_text('{"keys": ')  # a hand edit gone wrong: never the keys of before
    time.sleep(0.05)
    with pytest.raises(api_keys.KeyRefused) as refused:
        ring.authenticate(key)
    assert refused.value.status == 503
    with pytest.raises(ValueError, match="not JSON"):
        api_keys.KeyFile(path)
    headers = {"authorization": f"Bearer {key}"}
    assert api_keys.presented(headers) == key and api_keys.presented({"x-api-key": key}) == key
    assert api_keys.presented({"authorization": "Basic abc"}) is None


def test_routing_among_a_subset_never_chooses_another_expert_and_is_the_gate_masked():
    torch.manual_seed(0)
    experts = [ExpertInfo(f"t{i}", tuple(f"l{j}" for j in range(3 + i % 3))) for i in range(70)]  # two chunks
    model = build_mixture(experts, dim=16, top_k=2).eval()
    x = torch.randn(12, 16)
    among = torch.ones(12, 70, dtype=torch.bool)
    allowed = model.experts_among(["t3", "t65", "t40"])
    among[:8] = allowed  # eight restricted, four free
    with torch.no_grad():
        free, mixed = model(x), model(x, among=among)
        masked = model.router(x[:8] * model.input_scale, allowed.expand(8, -1))
    assert set(mixed.experts[:8].flatten().tolist()) <= {3, 40, 65} and torch.equal(mixed.experts[8:], free.experts[8:])
    assert torch.equal(mixed.log_probs[8:], free.log_probs[8:])  # the free queries: as without any restriction
    assert torch.equal(mixed.experts[:8], masked.experts) and torch.allclose(mixed.weights[:8], masked.weights)
    assert torch.equal(mixed.router.probs[:8], masked.probs)
    # the out-of-scope scores cover the allowed experts' rows only: no other tenant's prototype shows through
    rows = torch.einsum("b d, e m d -> b e m", x[:8] * model.input_scale, model.router.weight) + model.router.bias
    rows = rows.masked_fill(~model.router.row_mask, float("-inf"))[:, allowed]
    assert torch.allclose(mixed.router.energy[:8], rows.flatten(1).logsumexp(-1))
    with torch.no_grad():
        assert torch.equal(model(x, among=torch.ones(12, 70, dtype=torch.bool)).log_probs, free.log_probs)


# --- the service, with keys on -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_run, tmp_path_factory):
    """(base URL, keys file, keys by name): one replica asking for keys, re-reading its file every 0.2 s."""
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {}
    for name, tenants, admin in [
        ("bank", ["bank"], False),
        ("two", ["bank", "music"], False),
        ("ghost", ["acme"], False),  # a tenant not served (yet, or no longer)
        ("admin", ["*"], True),
    ]:
        keys[name], record = api_keys.new_key(tenants, admin)
        api_keys.write_keys(path, (api_keys.read_keys(path) if path.exists() else {}) | {record.id: record})
    settings = {"bundle": str(tiny_run.bundle), "keys_file": str(path), "keys_poll_s": 0.2, "batch_wait_ms": 20}
    with serving(settings) as url:
        yield url, path, keys


@pytest.fixture(scope="module")
def texts(tiny_run) -> list[str]:
    lines = (tiny_run.evaluation / "predictions_test.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_tenant_outside_the_key_gets_the_same_403_whether_or_not_it_exists(keyed):
    url, _, keys = keyed
    music = call(f"{url}/predict", {"text": "play some jazz", "tenant": "music"}, key=keys["bank"])
    acme = call(f"{url}/predict", {"text": "play some jazz", "tenant": "acme"}, key=keys["bank"])
    assert music == acme and music[0] == 403 and "music" not in json.dumps(music[1]), (music, acme)
    batch = {"queries": [{"text": "balance", "tenant": "bank"}, {"text": "x", "tenant": "weather"}]}
    refusal = {"detail": "queries[1].tenant: not a tenant of this key"}
    assert call(f"{url}/predict", batch, key=keys["bank"]) == (403, refusal)
    header = {"serve_multiplexed_model_id": "music"}
    assert call(f"{url}/predict", {"text": "balance", "tenant": "bank"}, key=keys["bank"], headers=header)[0] == 403
    # a tenant of the key that is not served: 404, naming only the key's own tenants
    status, body = call(f"{url}/predict", {"text": "play", "tenant": "acme"}, key=keys["admin"])
    assert status == 404 and "acme" in body["detail"]
    status, body = call(f"{url}/predict", {"text": "balance", "tenant": "bank"}, key=keys["bank"])
    assert status == 200 and body["tenant"] == "bank"


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_routed_query_is_routed_among_the_keys_tenants_only(keyed, tiny_run, texts):
    from moe.serving import Server

    url, _, keys = keyed
    offline = Server(tiny_run.bundle)
    free = offline.predict(texts)
    assert {a.tenant for a in free} == {"bank", "music", "weather"}  # unrestricted, the gate picks every tenant
    for name, allowed in (("bank", {"bank"}), ("two", {"bank", "music"})):
        expected = [a.to_dict() for a in offline.predict(texts, among=[allowed] * len(texts))]

        def ask(text: str, key=keys[name]) -> tuple[int, object]:
            return call(f"{url}/predict", {"text": text}, key=key)

        with ThreadPoolExecutor(16) as pool:  # concurrent: answered in mixed batches
            got = list(pool.map(ask, texts))
        for (status, answer), want in zip(got, expected, strict=True):
            assert status == 200 and answer["tenant"] in allowed
            assert set(answer["experts"]) <= allowed and {r["tenant"] for r in answer["runners_up"]} <= allowed
            assert answer["intent"] == want["intent"] and answer["score"] == pytest.approx(want["score"], rel=1e-5)
    status, refusal = call(f"{url}/predict", {"text": texts[0]}, key=keys["ghost"])
    assert status == 404 and "no tenant of this key is served" in refusal["detail"]
    # an admin key routes among every tenant, as without keys
    status, answer = call(f"{url}/predict", {"text": texts[0]}, key=keys["admin"])
    assert status == 200 and answer["tenant"] == free[0].tenant


@pytest.mark.slow
@pytest.mark.subprocess
def test_health_is_open_state_routes_need_an_admin_key_and_a_revoked_key_is_refused_in_time(keyed):
    url, path, keys = keyed
    assert call(f"{url}/health")[0] == 200
    assert call(f"{url}/predict", {"text": "balance"})[0] == 401
    assert call(f"{url}/predict", {"text": "balance"}, key="abc.def")[0] == 401
    for route in ("stats", "tenants"):
        assert call(f"{url}/{route}")[0] == 401 and call(f"{url}/{route}", key=keys["two"])[0] == 403
        assert call(f"{url}/{route}", key=keys["admin"])[0] == 200
    assert call(f"{url}/predict", {"text": "balance"}, key=keys["two"])[0] == 200
    revoked = keys["two"].split(".")[0]
    started = time.monotonic()
    api_keys.write_keys(path, {k: v for k, v in api_keys.read_keys(path).items() if k != revoked})
    while call(f"{url}/predict", {"text": "balance"}, key=keys["two"])[0] == 200:
        assert time.monotonic() - started < 5, "a revoked key still answered after 5 s"
        time.sleep(0.05)
    assert call(f"{url}/predict", {"text": "balance"}, key=keys["two"])[0] == 401
    assert call(f"{url}/predict", {"text": "balance"}, key=keys["bank"])[0] == 200
