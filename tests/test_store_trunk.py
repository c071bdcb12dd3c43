"""A store describes itself: training records its trunk in the store's registry, so a store copied away from its run
folder (no config.yaml beside it) is evaluated, exported and grown from the store alone; a store trained before that
(no registry entry: the old format) still opens through its run's config.yaml."""

from __future__ import annotations

import logging
import shutil

import pytest

from moe.store import ExpertStore
from moe.store.trunks import TrunkVersions, serving_trunk
from moe.tasks import evaluate, export, grow, train
from moe.trunk import TinyTrunk
from tests.helpers import TINY_TRAIN, compose_config, synthetic_data, write_tenant_csv

FIGURES = ("test/acc_routed", "test/acc_tenant_given", "test/routing_acc", "val/acc_routed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run whose trunk trained with the experts (its weights exist nowhere else), and its data overrides."""
    root = tmp_path_factory.mktemp("self_describing")
    data = synthetic_data(root / "data")
    train.run(compose_config("train", [*data, *TINY_TRAIN, "trunk.freeze=false", "trainer.max_epochs=2"], root / "run"))
    return root / "run", data


def evaluated(store, data, out) -> dict:
    return evaluate.run(compose_config("evaluate", [*data, f"store_dir={store}", "logger=none"], out))


def test_training_records_its_trunk_with_its_trained_weights_and_serves_on_it(trained):
    run, _ = trained
    versions = TrunkVersions(run / "experts")
    current = versions.current()
    assert current is not None and versions.describe(current)["weights"] == "weights"
    assert {meta.trunk_fingerprint for meta in map(ExpertStore(run / "experts").meta, ["bank", "weather"])} == {current}


def test_a_store_away_from_its_run_is_evaluated_exported_and_grown_from_the_store_alone(trained, tmp_path):
    run, data = trained
    store = shutil.copytree(run / "experts", tmp_path / "elsewhere" / "experts")
    assert not (store.parent / "config.yaml").exists()
    at_home = evaluated(run / "experts", data, tmp_path / "home")
    away = evaluated(store, data, tmp_path / "away")
    assert {k: away[k] for k in FIGURES} == {k: at_home[k] for k in FIGURES}
    assert away["trunk/fingerprint"] == TrunkVersions(store).current()

    manifest = export.run(compose_config("export", [*data, f"store_dir={store}", "export.trunk=copy"], tmp_path / "b"))
    assert manifest["trunk"]["fingerprint"] == TrunkVersions(store).current()

    intents = {"book": ["flight", "hotel", "book"], "cancel": ["cancel", "refund", "trip"]}
    csv = write_tenant_csv(tmp_path / "travel.csv", intents)
    growing = [f"store_dir={store}", "tenant.name=travel", f"tenant.files={csv}", "tenant.split_column=split"]
    growing += ["growth.epochs=1", "growth.rank=8", "growth.rehearsal_per_class=10", "trunk=minilm"]  # never loaded
    grow.run(compose_config("lifecycle", growing, tmp_path / "grow"))
    assert ExpertStore(store).meta("travel").trunk_fingerprint == TrunkVersions(store).current()


def test_a_store_trained_before_stores_recorded_their_trunk_still_opens(trained, tmp_path, caplog):
    run, data = trained
    old = shutil.copytree(run, tmp_path / "old_run")
    shutil.rmtree(old / "experts" / ".trunks")  # the old format: the trunk is named by the run's config.yaml alone
    with caplog.at_level(logging.WARNING, logger="moe.tasks.inputs"):
        figures = evaluated(old / "experts", data, tmp_path / "old")
    assert "records no trunk" in caplog.text
    assert {k: figures[k] for k in FIGURES} == {
        k: evaluated(run / "experts", data, tmp_path / "new")[k] for k in FIGURES
    }


def test_the_served_version_is_the_current_one_else_the_one_not_adapted_from_another(tmp_path):
    versions = TrunkVersions(tmp_path)
    made = []
    assert serving_trunk(tmp_path, lambda: made.append(1) or (TinyTrunk(freeze=True), False))[1] is False and made
    base, adapted = TinyTrunk(seed=0, freeze=True), TinyTrunk(seed=1, freeze=True)
    versions.record(base)  # as growth records the trunk it trains on
    assert versions.serving() == base.fingerprint
    versions.record(adapted, parent=base.fingerprint, weights=True)  # adapted, not yet upgraded onto
    trunk, trained = serving_trunk(tmp_path, lambda: pytest.fail("the store records its trunk"))
    assert (trunk.fingerprint, trained) == (base.fingerprint, False)
    versions.set_current(adapted.fingerprint)
    trunk, trained = serving_trunk(tmp_path, lambda: pytest.fail("the store records its trunk"))
    assert (trunk.fingerprint, trained) == (adapted.fingerprint, True)
    versions.record(TinyTrunk(seed=2, freeze=True))
    (tmp_path / ".trunks" / "CURRENT").unlink()
    with pytest.raises(ValueError, match="serves on none"):
        versions.serving()
