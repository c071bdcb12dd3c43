"""Trunk versions: a store records the trunks its experts were trained on, a new version is adapted from the awake
tenants' data, and an upgrade keeps every sleeping expert working (bridged or transported) without its data."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from moe.data import read_tenant_file
from moe.inference import GateSettings, load_mixture
from moe.inference.bundle import BundleError
from moe.lifecycle import Lifecycle
from moe.lifecycle.adapt import AdaptConfig, adapt_trunk
from moe.lifecycle.upgrade import upgrade_store
from moe.model import best_labels
from moe.model.bridge import Bridge
from moe.model.stats import class_statistics
from moe.store import ExpertStore, TrunkVersions
from moe.tasks import adapt_trunk as adapt_trunk_task
from moe.tasks import trunk_upgrade, upgrade
from moe.trunk import TinyTrunk
from tests.helpers import (
    compose_config,
    digests,
    fast_growth,
    flip_last_byte,
    run_python,
    tenant_files_override,
    write_synthetic_tenants,
)

STATISTICS = GateSettings(source="statistics")
ADAPT = AdaptConfig(epochs=3, lr=3e-2, head_lr=3e-2, batch_size=16, input_scale=8.0)


@pytest.fixture
def files(tmp_path):
    return write_synthetic_tenants(tmp_path / "data")


@pytest.fixture
def tenants(files):
    return {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}


@pytest.fixture
def store(tmp_path, tenants):
    """weather, music and bank grown on a tiny trunk; bank hibernating."""
    trunk = TinyTrunk(dim=16, freeze=True)
    lifecycle = Lifecycle(ExpertStore(tmp_path / "store"), trunk, trunk.encode, fast_growth(epochs=30))
    for tenant in tenants.values():
        lifecycle.grow(tenant)
    lifecycle.hibernate("bank")
    return lifecycle.store


def given_answers(store, trunk, tenant, tenants=None):
    model = load_mixture(store, tenants, STATISTICS, trunk.fingerprint)
    features = trunk.encode([e.text for e in tenant.split("test")])
    output = model(features, torch.full((len(features),), model.tenant_index(tenant.name)))
    return [model.labels[i][1] for i in best_labels(output)[0].tolist()], model


def accuracy(answers, tenant):
    return sum(a == e.label for a, e in zip(answers, tenant.split("test"), strict=True)) / len(answers)


def adapted_trunk(store, tenants):
    old = TinyTrunk(dim=16, freeze=True)
    new, _ = adapt_trunk(old, [tenants["weather"], tenants["music"]], ADAPT)
    TrunkVersions(store.root).record(new, parent=old.fingerprint, weights=True)
    return old, new


def test_a_grow_records_its_trunk_and_a_recorded_version_rebuilds_to_the_same_fingerprint(store, tenants):
    versions = TrunkVersions(store.root)
    old = TinyTrunk(dim=16, freeze=True)
    assert versions.fingerprints() == [old.fingerprint] and versions.current() is None
    assert versions.rebuild(old.fingerprint).fingerprint == old.fingerprint
    _, new = adapted_trunk(store, tenants)
    assert new.fingerprint != old.fingerprint and versions.describe(new.fingerprint)["parent"] == old.fingerprint
    rebuilt = versions.rebuild(new.fingerprint)  # from its saved weights
    assert rebuilt.fingerprint == new.fingerprint and rebuilt.frozen
    with pytest.raises(KeyError, match="not recorded"):
        versions.rebuild("f" * 64)


def test_an_old_expert_is_refused_on_a_new_trunk_unless_a_bridge_exists_naming_both_fingerprints(store, tenants):
    old, new = adapted_trunk(store, tenants)
    with pytest.raises(ValueError) as refused:
        load_mixture(store, ["bank", "music", "weather"], STATISTICS, new.fingerprint)
    message = str(refused.value)
    assert old.fingerprint[:12] in message and new.fingerprint[:12] in message and "no bridge" in message
    lifecycle = Lifecycle(store, new, new.encode, fast_growth())
    with pytest.raises(ValueError, match=old.fingerprint[:12]):  # a grow reads the others' statistics: refused too
        lifecycle.grow(read_tenant_file("late", store.root.parent / "data" / "bank.csv", split_column="split"))


@pytest.mark.parametrize("strategy", ["bridge", "transport"])
def test_an_upgrade_keeps_a_sleeping_expert_answering_on_the_new_trunk(store, tenants, strategy):
    bank = tenants["bank"]
    old_answers, _ = given_answers(store, TinyTrunk(dim=16, freeze=True), bank, ["bank", "music", "weather"])
    old, new = adapted_trunk(store, tenants)
    bank_files = {k: v for k, v in digests(store.root).items() if k.parts[0] == "bank"}
    lifecycle = Lifecycle(store, new, new.encode, fast_growth(epochs=30, transport_per_class=50))
    report = upgrade_store(lifecycle, old, [tenants["weather"], tenants["music"]], strategy)
    how = "bridged" if strategy == "bridge" else "transported"
    assert report.tenants == {"bank": how, "music": "retrained", "weather": "retrained"}
    assert TrunkVersions(store.root).current() == new.fingerprint
    answers, model = given_answers(store, new, bank, ["bank", "music", "weather"])
    assert accuracy(answers, bank) >= accuracy(old_answers, bank) - 0.1
    if strategy == "bridge":  # its shard untouched; it runs through the bridge
        assert {k: v for k, v in digests(store.root).items() if k.parts[0] == "bank"} == bank_files
        assert model.expert_trunks == {"bank": old.fingerprint, "music": new.fingerprint, "weather": new.fingerprint}
    else:  # a new version on the new trunk; the old one kept for rollback
        assert store.versions("bank") == [1, 2] and set(model.expert_trunks.values()) == {new.fingerprint}
    assert store.is_dormant("bank")  # still asleep


def test_an_upgrade_checks_every_awake_tenants_data_before_it_moves_anyone(store, tenants):
    """weather's data lacks one of its intents: refused before music (first in order) is retrained, so the store
    stays on the old trunk as it was, with no tenant moved and no bridge written."""
    old, new = adapted_trunk(store, tenants)
    before = digests(store.root)
    lifecycle = Lifecycle(store, new, new.encode, fast_growth(epochs=30))
    with pytest.raises(ValueError, match=r"tenant 'weather': its data lacks intents its expert knows, \['sun'\]"):
        upgrade_store(lifecycle, old, [tenants["music"], tenants["weather"].restricted(("rain",))], "bridge")
    assert digests(store.root) == before and TrunkVersions(store.root).current() is None


@pytest.mark.parametrize("gone", ["deleted", "unreadable"])
def test_adapting_and_upgrading_never_open_a_sleeping_tenants_files(tmp_path, store, files, gone):
    bank = files["bank"]  # still named in the configs below, as a user's list of every tenant would name it
    bank.unlink()
    if gone == "unreadable":  # a folder where its file stood: any attempt to read it fails
        bank.mkdir()
    override = _tenants_override(files)
    cfg = compose_config(
        "adapt_trunk",
        [f"store_dir={store.root}", "trunk=tiny", "trunk.dim=16", "logger=none", "adapt.epochs=2", "adapt.lr=3e-2"]
        + [override],
        tmp_path / "adapt",
    )
    adapted = adapt_trunk_task.run(cfg)
    assert adapted["tenants"] == ["weather", "music"]
    cfg = compose_config(
        "upgrade",
        [f"store_dir={store.root}", "trunk=tiny", "trunk.dim=16", "strategy=bridge", override]
        + ["growth.epochs=5", "expert.rank=8"],
        tmp_path / "upgrade",
    )
    summary = upgrade.run(cfg)
    assert summary["new"] == adapted["fingerprint"] and summary["tenants"]["bank"] == "bridged"
    assert TrunkVersions(store.root).current() == adapted["fingerprint"]


def _tenants_override(files):
    entries = ", ".join(f"{{name: {name}, files: '{path}', split_column: split}}" for name, path in files.items())
    return f"tenants=[{entries}]"


def test_a_bridge_folds_exactly_into_gate_rows_and_moves_statistics_by_their_definition():
    generator = torch.Generator().manual_seed(0)
    new = torch.randn(400, 6, generator=generator)
    old = new @ torch.randn(6, 5, generator=generator) + 0.3 + 0.01 * torch.randn(400, 5, generator=generator)
    bridge = Bridge.fit("a" * 64, "b" * 64, old, new)
    assert bridge.info["r2"] > 0.99
    weight, bias, scale = torch.randn(3, 5, generator=generator), torch.randn(3), 8.0
    folded_weight, folded_bias = bridge.rows_to_new(weight, bias, scale)
    x = new[:10] * scale
    torch.testing.assert_close(x @ folded_weight.T + folded_bias, bridge.to_old(x, scale) @ weight.T + bias)
    labels = torch.arange(400) % 2
    moved = bridge.statistics_to_new(class_statistics(old, labels, 2))
    direct = class_statistics(bridge.to_new(old), labels, 2)
    torch.testing.assert_close(moved["stats.mean"], direct["stats.mean"])
    assert torch.allclose(moved["stats.scatter"], direct["stats.scatter"] + 400 * bridge.residual, atol=1e-3)
    with pytest.raises(ValueError, match="calibration texts"):
        Bridge.fit("a" * 64, "b" * 64, old[:8], new[:8])


def test_the_experiment_reports_every_strategy_and_keep_is_exact_for_sleeping_tenants(tmp_path, files):
    overrides = ["trunk=tiny", "trunk.dim=16", "data=tenant_files", tenant_files_override(files), "dormant=[bank]"]
    overrides += ["growth.epochs=20", "expert.rank=8", "adapt.epochs=2", "adapt.lr=3e-2", "adapt.head_lr=3e-2"]
    overrides += ["growth.transport_per_class=30", "eval_split=test"]
    metrics = trunk_upgrade.run(compose_config("trunk_upgrade", overrides, tmp_path / "run"))
    for strategy in ("old", "bridge", "transport", "keep"):
        assert 0 <= metrics[f"{strategy}/all/acc_routed"] <= 100 and metrics[f"{strategy}/latency_ms_batch1"] > 0
    # the reference feeds the sleeping expert its own old trunk's features: exactly its old answers
    assert metrics["keep/dormant/acc_tenant_given"] == metrics["old/dormant/acc_tenant_given"]
    assert metrics["keep/trunks"] == 2 and metrics["bridge/trunks"] == 1

    def shards(strategy):  # bytes of each tenant's latest shard in that strategy's store
        store = ExpertStore(tmp_path / "run" / strategy / "experts")
        return sum(store.path(t, store.latest(t)).stat().st_size for t in store.tenants(dormant=True))

    bridge_file = next((tmp_path / "run" / "bridge" / "experts" / ".bridges").iterdir()).stat().st_size
    trunk_bytes = metrics["transport/memory_bytes"] - shards("transport")  # transport reads through no bridge
    assert metrics["bridge/memory_bytes"] == trunk_bytes + shards("bridge") + bridge_file
    assert not (tmp_path / "run" / "data" / "bank.csv").exists()  # its data file was deleted before the upgrade
    assert metrics["best_one_trunk/strategy"] in ("bridge", "transport")
    assert "newcomer/acc_tenant_given_new_trunk" in metrics


FRESH_PROCESS = """
import json, sys
from moe.serving import Server
queries = [json.loads(line) for line in open(sys.argv[2])]
server = Server(sys.argv[1])
assert set(server.bridged) == {"bank"}, server.bridged
print(json.dumps([a.to_dict() for a in server.predict([q["text"] for q in queries])]))
"""
ANSWER = ("tenant", "intent", "score", "out_of_scope", "experts", "runners_up")


@pytest.mark.subprocess
def test_a_bundle_of_an_upgraded_store_serves_in_a_fresh_process_what_evaluation_predicted(tmp_path, store, files):
    from moe.inference import read_bundle
    from moe.tasks import evaluate, export

    tenants = {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}
    old, new = adapted_trunk(store, tenants)
    lifecycle = Lifecycle(store, new, new.encode, fast_growth(epochs=30))
    upgrade_store(lifecycle, old, [tenants["weather"], tenants["music"]], "bridge")
    store.wake("bank")  # months later: the sleeping tenant wakes on the upgraded store, through its bridge
    data = ["data=tenant_files", tenant_files_override(files), "routing=statistics"]
    rule = ["oos.threshold=0.42", "oos.score=gate_max_prob"]
    common = [*data, *rule, f"store_dir={store.root}"]
    evaluate.run(
        compose_config(
            "evaluate", [*common, "logger=none", "write_predictions=true", "splits=[test]"], tmp_path / "eval"
        )
    )
    export.run(compose_config("export", [*common, "export.trunk=copy"], tmp_path / "bundle"))
    manifest = read_bundle(tmp_path / "bundle").manifest
    assert {e["tenant"]: e["trunk"] for e in manifest["experts"]}["bank"] == old.fingerprint
    assert manifest["trunk"]["fingerprint"] == new.fingerprint
    bridge = next(name for name in manifest["files"] if name.startswith("experts/.bridges/"))
    tampered = Path(shutil.copytree(tmp_path / "bundle", tmp_path / "tampered"))
    flip_last_byte(tampered / bridge)  # a bridge has no checksum of its own: checked even when shards wait
    with pytest.raises(BundleError, match="sha256 mismatch"):
        read_bundle(tampered, verify="lazy")
    predictions = tmp_path / "eval" / "predictions_test.jsonl"
    expected = [json.loads(line) for line in predictions.read_text().splitlines()]
    done = run_python("-c", FRESH_PROCESS, str(tmp_path / "bundle"), str(predictions))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [{k: e[k] for k in ANSWER} for e in expected]
    assert {e["tenant"] for e in expected} >= {"bank"}


def test_a_sleeping_expert_survives_two_upgrades_through_chained_bridges(store, tenants):
    bank = tenants["bank"]
    before, _ = given_answers(store, TinyTrunk(dim=16, freeze=True), bank, ["bank", "music", "weather"])
    awake = [tenants["weather"], tenants["music"]]
    v1, v2 = adapted_trunk(store, tenants)
    upgrade_store(Lifecycle(store, v2, v2.encode, fast_growth(epochs=30)), v1, awake, "bridge")
    v3, _ = adapt_trunk(v2, awake, ADAPT)
    TrunkVersions(store.root).record(v3, parent=v2.fingerprint, weights=True)
    report = upgrade_store(Lifecycle(store, v3, v3.encode, fast_growth(epochs=30)), v2, awake, "bridge")
    assert report.tenants["bank"] == "bridged" and TrunkVersions(store.root).current() == v3.fingerprint
    answers, model = given_answers(store, v3, bank, ["bank", "music", "weather"])
    assert model.expert_trunks["bank"] == v1.fingerprint  # the shard of the first trunk, read through v3 -> v1
    assert accuracy(answers, bank) >= accuracy(before, bank) - 0.15


def test_chained_bridges_compose_exactly():
    generator = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(300, 5, generator=generator) for _ in range(3))
    first = Bridge.fit("1" * 64, "2" * 64, a, b)  # trunk 1 -> trunk 2
    second = Bridge.fit("2" * 64, "3" * 64, b, c)  # trunk 2 -> trunk 3
    chained = first.then(second)
    x = torch.randn(7, 5, generator=generator)
    torch.testing.assert_close(chained.to_old(x, 8.0), first.to_old(second.to_old(x, 8.0), 8.0))
    torch.testing.assert_close(chained.to_new(x), second.to_new(first.to_new(x)))
    assert (chained.old, chained.new) == ("1" * 64, "3" * 64)
    stats = class_statistics(a, torch.arange(300) % 3, 3)  # statistics moved twice, or once through the chain
    twice = second.statistics_to_new(first.statistics_to_new(stats))
    for name, moved in chained.statistics_to_new(stats).items():
        torch.testing.assert_close(moved, twice[name], rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="can not be followed"):
        second.then(first)


def test_a_bridged_tenant_that_wakes_with_data_is_updated_onto_the_current_trunk(store, tenants):
    old, new = adapted_trunk(store, tenants)
    lifecycle = Lifecycle(store, new, new.encode, fast_growth(epochs=30, rehearsal_per_class=20))
    upgrade_store(lifecycle, old, [tenants["weather"], tenants["music"]], "bridge")
    store.wake("bank")
    lifecycle.update(tenants["bank"])  # its earlier intents rehearsed from its statistics, moved through the bridge
    assert store.meta("bank").trunk_fingerprint == new.fingerprint and store.versions("bank") == [1, 2]
    answers, model = given_answers(store, new, tenants["bank"])
    assert set(model.expert_trunks.values()) == {new.fingerprint} and accuracy(answers, tenants["bank"]) > 0.8


def test_an_adapted_minilm_version_is_saved_with_its_own_weights_and_rebuilds_to_its_fingerprint(tmp_path):
    from moe.trunk import HFEncoderTrunk

    trunk = HFEncoderTrunk()
    shipped = trunk.fingerprint
    versions = TrunkVersions(tmp_path / "store")
    assert "reference" in versions.record(trunk)  # the package rebuilds it: referenced, not copied
    with torch.no_grad():
        trunk.encoder.encoder.layer[-1].output.dense.bias.add_(0.01)  # "adapted"
    trunk.freeze()
    entry = versions.record(trunk, parent=shipped)  # a reference would rebuild the shipped weights: saved instead
    assert entry["weights"] == "weights" and trunk.fingerprint != shipped
    rebuilt = versions.rebuild(trunk.fingerprint)
    assert rebuilt.fingerprint == trunk.fingerprint
    torch.testing.assert_close(rebuilt.encode(["hello there"]), trunk.encode(["hello there"]))
