"""Lifecycle operations: a grow touches nothing but its own folder; a woken tenant predicts exactly as before."""

import pytest
import torch

from moe.data import read_tenant_file
from moe.experiments.scenario import Event, Scenario, continual_metrics
from moe.inference import GateSettings, load_mixture
from moe.lifecycle import Lifecycle
from moe.model import best_labels
from moe.store import ExpertStore
from moe.trunk import FeatureCache, TinyTrunk, fingerprint_module
from tests.helpers import SYNTHETIC, digests, fast_growth, run_python, write_synthetic_tenants, write_tenant_csv


@pytest.fixture
def lifecycle(tmp_path):
    trunk = TinyTrunk(dim=16, freeze=True)
    return Lifecycle(
        ExpertStore(tmp_path / "store"), trunk, FeatureCache(tmp_path / "cache", trunk).encode, fast_growth()
    )


@pytest.fixture
def tenants(tmp_path):
    files = write_synthetic_tenants(tmp_path / "data")
    return {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}


def tenant_given(lifecycle, name, tenant):
    model = load_mixture(
        lifecycle.store, trunk_fingerprint=lifecycle.trunk.fingerprint, gate=GateSettings(source="statistics")
    )
    features = lifecycle.encode([e.text for e in tenant.split("test")])
    output = model(features, torch.full((len(features),), model.tenant_index(name)))
    own = len(tenant.labels)  # the padded width grows with other experts' label counts: compare its own columns
    return [model.labels[i] for i in best_labels(output)[0].tolist()], output.log_probs[:, 0, :own]


@pytest.mark.parametrize("routing", ["statistics", "trained"])
def test_grow_leaves_every_other_shard_and_the_trunk_byte_identical(lifecycle, tenants, routing):
    lifecycle.cfg = fast_growth(source=routing)
    lifecycle.grow(tenants["weather"])
    lifecycle.grow(tenants["music"])
    trunk = lifecycle.trunk  # hashed afresh (its `fingerprint` is cached once frozen)
    before, trunk_before = digests(lifecycle.store.root), fingerprint_module(trunk, trunk.config())
    lifecycle.grow(tenants["bank"])
    after = digests(lifecycle.store.root)
    own = {k: v for k, v in after.items() if k.parts[0] == "bank" or k.parts == (".locks", "bank.lock")}  # its lock
    assert {k: v for k, v in after.items() if k not in own} == before
    assert fingerprint_module(trunk, trunk.config()) == trunk_before
    assert lifecycle.store.tenants() == ["bank", "music", "weather"]
    with pytest.raises(ValueError, match="already has an expert"):
        lifecycle.grow(tenants["bank"])


def test_hibernated_tenant_wakes_with_bit_identical_predictions(lifecycle, tenants, tmp_path):
    lifecycle.grow(tenants["weather"])
    lifecycle.grow(tenants["music"])
    names, log_probs = tenant_given(lifecycle, "weather", tenants["weather"])
    lifecycle.hibernate("weather")
    assert "weather" not in lifecycle.store.tenants()
    lifecycle.grow(tenants["bank"])
    extra = write_tenant_csv(tmp_path / "music_more.csv", {"shuffle": ["shuffle", "random", "mix"]}, seed=7)
    lifecycle.update(read_tenant_file("music", extra, split_column="split"))  # a new intent for music
    assert lifecycle.store.versions("music") == [1, 2] and "shuffle" in lifecycle.store.meta("music").labels
    lifecycle.wake("weather")
    names_after, log_probs_after = tenant_given(lifecycle, "weather", tenants["weather"])
    assert names_after == names and torch.equal(log_probs_after, log_probs)


def test_unknown_tenant_and_double_wake_are_clear_errors(lifecycle, tenants):
    lifecycle.grow(tenants["weather"])
    with pytest.raises(KeyError, match="nobody"):
        lifecycle.hibernate("nobody")
    with pytest.raises(KeyError, match="not hibernating"):
        lifecycle.wake("weather")
    lifecycle.retire("weather", archive_dir=lifecycle.store.root.parent / "archive")
    assert lifecycle.store.tenants(dormant=True) == []
    assert (lifecycle.store.root.parent / "archive" / "weather" / "v0001.safetensors").is_file()


def test_scenario_records_matrix_and_zero_tenant_given_forgetting(lifecycle, tenants):
    scenario = Scenario(lifecycle, tenants)
    events = [
        Event("grow", "weather"),
        Event("grow", "music"),
        Event("hibernate", "weather"),
        Event("grow", "bank"),
        Event("wake", "weather"),
    ]
    records = scenario.run(events)
    assert len(records) == 5 and scenario.wake_identical == {"weather": True}
    assert records[2].given["weather"] != records[2].given["weather"]  # dormant: NaN, not served
    given = continual_metrics(records, "given", scenario.last_trained)
    assert given["forgetting"] == 0.0 and given["bwt"] == 0.0


@pytest.mark.slow
@pytest.mark.subprocess
def test_grow_script_brings_a_user_file_with_its_own_columns_into_a_store(tmp_path, lifecycle, tenants):
    lifecycle.grow(tenants["weather"])
    user = write_tenant_csv(tmp_path / "acme.csv", SYNTHETIC["bank"], columns=("utterance", "intent"))
    store = lifecycle.store.root
    cache = lifecycle.encode.__self__.folder.parent
    run_python(
        "scripts/grow.py",
        f"store_dir={store}",
        "trunk=tiny",
        "trunk.dim=16",
        "tenant.name=acme",
        f"tenant.files={user}",
        "tenant.text_column=utterance",
        "tenant.label_column=intent",
        "tenant.split_column=split",
        "growth.epochs=2",
        "growth.rank=8",
        f"paths.cache_dir={cache.parent}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert ExpertStore(store).tenants() == ["acme", "weather"]
    assert ExpertStore(store).meta("acme").labels == ("balance", "transfer")
