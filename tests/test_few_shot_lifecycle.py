"""A lifecycle that accepts few examples (issue 29, point 3): scripts/grow.py and scripts/update.py from one example
per intent up, the few-example method chosen by size (`few_shot.method_for`, `next_method`), an update that moves a
tenant onto the full method as a new version, and rollback to the few-example version.

Adapter experts on the tiny trunk (seconds); one slow test for pathway experts on MiniLM's top layer."""

from __future__ import annotations

import csv
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe.data import read_tenant_file
from moe.inference import load_mixture
from moe.lifecycle import Lifecycle
from moe.lifecycle.few_shot import method_for, next_method, statistics_expert
from moe.lifecycle.growth import statistics_samples, train_expert
from moe.model import TENSOR_NAMES
from moe.model.stats import COUNT, STATISTICS, class_statistics
from moe.store import ExpertStore
from moe.trunk import HFEncoderTrunk, TinyTrunk
from tests.helpers import FILLERS, SYNTHETIC, compose_config, digests, fast_growth, script, write_tenant_csv

BANK = SYNTHETIC["bank"]
# The scripts' settings, the few-example ones named here (conf/growth/default.yaml's are placeholders).
TINY = ["trunk=tiny", "trunk.dim=16", "growth.epochs=1", "growth.rank=8", "growth.batch_size=32"]
TINY += ["growth.rehearsal_per_class=10"]
TINY += ["tenant.split_column=split", "growth.few_shot_below=5", "growth.few_shot_method=statistics"]
METHOD_SHRINKAGE = 0.05
TINY += [f"growth.method_shrinkage={METHOD_SHRINKAGE}"]


def uneven_csv(path: Path, counts: dict[str, int], seed: int = 0, intents=BANK) -> Path:
    """A tenant file with `counts[label]` train rows of each intent (no val or test rows)."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "split"])
        for label, count in counts.items():
            for _ in range(count):
                writer.writerow([" ".join([rng.choice(FILLERS), *rng.sample(intents[label], 2)]), label, "train"])
    return path


def lifecycle_cfg(tmp_path: Path, store: Path, name: str, files: Path, *overrides: str):
    common = [f"store_dir={store}", *TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"tenant.name={name}"]
    return compose_config("lifecycle", [*common, f"tenant.files={files}", *overrides], tmp_path / "out")


@pytest.fixture
def store(tmp_path) -> Path:
    """A store of `weather` and `music` (30 train rows per intent), grown by scripts/grow.py on the tiny trunk."""
    root = tmp_path / "experts"
    for i, name in enumerate(("weather", "music")):
        files = write_tenant_csv(tmp_path / f"{name}.csv", SYNTHETIC[name], seed=i)
        script("grow")(lifecycle_cfg(tmp_path, root, name, files, "create_store=true"))
    return root


def tenant_given(store: ExpertStore, trunk, name: str, texts: list[str]) -> torch.Tensor:
    """The tenant-given log-probabilities of `name`'s expert over `texts`, as a mixture of the store serves them."""
    model = load_mixture(store, trunk_fingerprint=trunk.fingerprint, trunk=trunk)
    return model(trunk.encode(texts), torch.full((len(texts),), model.tenant_index(name))).log_probs


# -- the choice by size ----------------------------------------------------------------------------------------


def test_the_method_is_chosen_by_the_smallest_intent_and_an_explicit_method_wins():
    cfg = fast_growth(few_shot_below=5, few_shot_method="statistics")
    assert method_for([30, 4], cfg) == "statistics" and method_for(torch.tensor([5.0, 5.0]), cfg) == "full"
    assert method_for([1], replace(cfg, few_shot_below=0)) == "full"  # 0: never
    assert method_for([100, 100], replace(cfg, method="statistics")) == "statistics"  # explicit: whatever the size
    assert method_for([1, 1], replace(cfg, method="contrastive")) == "contrastive"
    # an update: a full tenant stays full; a few-example one moves on once every intent reaches the threshold
    assert next_method("full", [1, 1], cfg) == "full"
    assert next_method("statistics", [5, 4], cfg) == "statistics"
    assert next_method("statistics", [5, 6], cfg) == "full"
    assert next_method("nearest", [2, 9], cfg) == "nearest"
    with pytest.raises(ValueError, match="few_shot_below"):
        fast_growth(few_shot_below=-1)
    with pytest.raises(ValueError, match="unknown growth method 'lda'"):
        fast_growth(few_shot_method="lda")


# -- scripts/grow.py from one example per intent ---------------------------------------------------------------


@pytest.mark.parametrize(
    "counts, overrides, method",
    [
        ({"balance": 1, "transfer": 1}, [], "statistics"),
        ({"balance": 1, "transfer": 9}, [], "statistics"),  # the smallest intent decides
        ({"balance": 1, "transfer": 9}, ["growth.few_shot_below=0"], "full"),  # trained, from one example
        ({"balance": 1, "transfer": 1}, ["growth.few_shot_below=1"], "full"),
        ({"balance": 6, "transfer": 9}, [], "full"),
        ({"balance": 6, "transfer": 9}, ["growth.method=statistics"], "statistics"),  # explicit: wins
        ({"balance": 1}, [], "statistics"),  # one intent, one example
        ({"balance": 1}, ["growth.few_shot_below=0"], "full"),
    ],
)
def test_grow_script_takes_one_example_per_intent_and_records_how_it_grew(tmp_path, store, counts, overrides, method):
    before = digests(store)
    files = uneven_csv(tmp_path / "bank.csv", counts)
    script("grow")(lifecycle_cfg(tmp_path, store, "bank", files, *overrides))
    tensors, meta = ExpertStore(store).load("bank")
    assert meta.metrics["growth_method"] == method
    assert meta.metrics["examples_per_intent_min"] == min(counts.values())
    assert meta.metrics["train_examples"] == sum(counts.values())
    assert tensors[COUNT].tolist() == [float(count) for count in counts.values()]  # labels in sorted order
    # a statistics expert's adapter adds nothing; nor does one trained on one intent (its softmax learns nothing)
    assert tensors["up.weight"].any() == (method == "full" and len(counts) > 1)
    others = {p: d for p, d in digests(store).items() if "bank" not in (p.parts[0], p.stem)}
    assert others == before  # every other shard, the trunk's record


def test_a_store_s_first_tenant_needs_spread_in_one_intent_and_says_why(tmp_path):
    store = tmp_path / "new_store"
    one_each = uneven_csv(tmp_path / "one_each.csv", {"balance": 1, "transfer": 1})
    with pytest.raises(ValueError, match="no within-class spread.*no other expert to pool a covariance"):
        script("grow")(lifecycle_cfg(tmp_path, store, "bank", one_each, "create_store=true"))
    assert not ExpertStore(store).tenants()
    two_of_one = uneven_csv(tmp_path / "two_of_one.csv", {"balance": 2, "transfer": 1})
    script("grow")(lifecycle_cfg(tmp_path, store, "bank", two_of_one, "create_store=true"))
    assert ExpertStore(store).meta("bank").metrics["growth_method"] == "statistics"


def test_mahalanobis_evidence_keeps_its_minimum_and_says_why(tmp_path):
    trunk = TinyTrunk(dim=16, freeze=True)
    lifecycle = Lifecycle(ExpertStore(tmp_path / "store"), trunk, trunk.encode, fast_growth(evidence="mahalanobis"))
    weather = write_tenant_csv(tmp_path / "w.csv", SYNTHETIC["weather"])
    lifecycle.grow(read_tenant_file("weather", weather, split_column="split"))
    one_each = uneven_csv(tmp_path / "b.csv", {"balance": 1, "transfer": 1})
    one_each = read_tenant_file("bank", one_each, split_column="split")
    with pytest.raises(ValueError, match="Mahalanobis evidence.*two different examples"):
        lifecycle.grow(one_each)
    lifecycle.cfg = replace(lifecycle.cfg, evidence="energy")  # the store's own evidence wins: still Mahalanobis
    with pytest.raises(ValueError, match="Mahalanobis"):
        lifecycle.grow(one_each)
    assert lifecycle.store.tenants() == ["weather"]


@pytest.mark.parametrize("method", ["full", "statistics"])
def test_energy_evidence_of_a_tenant_of_one_example_is_calibrated_in_raw_units(tmp_path, method):
    """One train row and no val rows: nothing to scale its evidence by, so its raw units (a finite shard)."""
    trunk = TinyTrunk(dim=16, freeze=True)
    lifecycle = Lifecycle(ExpertStore(tmp_path / "store"), trunk, trunk.encode, fast_growth(evidence="energy"))
    lifecycle.grow(
        read_tenant_file("weather", write_tenant_csv(tmp_path / "w.csv", SYNTHETIC["weather"]), split_column="split")
    )
    lifecycle.cfg = replace(lifecycle.cfg, method=method)
    lifecycle.grow(read_tenant_file("bank", uneven_csv(tmp_path / "b.csv", {"balance": 1}), split_column="split"))
    tensors, meta = lifecycle.store.load("bank")  # loading verifies every tensor is finite
    assert meta.metrics["growth_method"] == method and tensors["evidence.calibration"][1] == 1.0
    model = load_mixture(lifecycle.store, trunk_fingerprint=trunk.fingerprint, trunk=trunk)
    assert model.tenant_index("bank") >= 0


# -- scripts/update.py: below the threshold, then past it, and rollback --------------------------------------


def test_update_below_the_threshold_recomputes_the_statistics_expert_from_every_row_seen(tmp_path, store):
    """Exemplar-free: the second version's statistics are those of both files' rows at once, and its head the
    discriminants of their class means under the covariance pooled over the store, with no row of the first file."""
    first = uneven_csv(tmp_path / "first.csv", {"balance": 1, "transfer": 1}, seed=1)
    more = uneven_csv(tmp_path / "more.csv", {"balance": 2, "transfer": 1}, seed=2)
    script("grow")(lifecycle_cfg(tmp_path, store, "bank", first))
    script("update")(lifecycle_cfg(tmp_path, store, "bank", more))
    experts = ExpertStore(store)
    tensors, meta = experts.load("bank")
    assert meta.version == 2 and meta.metrics["growth_method"] == "statistics"
    assert meta.metrics["examples_per_intent_min"] == 2 and meta.metrics["train_examples"] == 3

    trunk = TinyTrunk(dim=16, freeze=True)
    rows = [*read_tenant_file("bank", first, split_column="split").split("train")]
    rows += read_tenant_file("bank", more, split_column="split").split("train")
    labels = torch.tensor([("balance", "transfer").index(e.label) for e in rows])
    every_row = class_statistics(trunk.encode([e.text for e in rows]), labels, 2)
    for name in STATISTICS:
        torch.testing.assert_close(tensors[name], every_row[name], atol=1e-5, rtol=1e-5)
    others = [experts.load(name)[0] for name in ("music", "weather")]
    expected = statistics_expert(meta.architecture, {k: tensors[k] for k in STATISTICS}, others, METHOD_SHRINKAGE)
    for name in TENSOR_NAMES:
        torch.testing.assert_close(tensors[name], expected[name])


def test_update_past_the_threshold_trains_as_the_full_method_and_rollback_serves_the_few_example_version(tmp_path):
    """A tenant grown from one example per intent (statistics); an update bringing every intent to the threshold
    trains its expert as the full method does: from scratch on the new rows and the rehearsal of the earlier ones
    (not from the statistics expert). Rollback serves the earlier version's answers exactly."""
    trunk = TinyTrunk(dim=16, freeze=True)
    cfg = fast_growth(dropout=0.0, few_shot_below=5, few_shot_method="statistics")
    lifecycle = Lifecycle(ExpertStore(tmp_path / "store"), trunk, trunk.encode, cfg)
    for i, name in enumerate(("weather", "music")):
        lifecycle.grow(
            read_tenant_file(
                name, write_tenant_csv(tmp_path / f"{name}.csv", SYNTHETIC[name], seed=i), split_column="split"
            )
        )
    first = read_tenant_file(
        "bank", uneven_csv(tmp_path / "first.csv", {"balance": 1, "transfer": 1}), split_column="split"
    )
    more = read_tenant_file(
        "bank", write_tenant_csv(tmp_path / "more.csv", BANK, per_split=(6, 3, 3), seed=7), split_column="split"
    )
    lifecycle.grow(first)
    texts = [e.text for e in more.split("test")]
    answers = tenant_given(lifecycle.store, trunk, "bank", texts)
    old, old_meta = lifecycle.store.load("bank")
    assert old_meta.metrics["growth_method"] == "statistics"

    lifecycle.update(more)
    new, meta = lifecycle.store.load("bank")
    assert meta.version == 2 and meta.metrics["growth_method"] == "full"
    assert meta.metrics["examples_per_intent_min"] == 7 and new[COUNT].tolist() == [7.0, 7.0]
    # the full method's expert, by hand: the new rows and the rehearsal of the first version's intents, from scratch
    features = trunk.encode([e.text for e in more.split("train")])
    y = torch.tensor([more.label_index(e.label) for e in more.split("train")])
    peers = [lifecycle.store.load(name)[0] for name in ("music", "weather")]
    old_stats = {k: old[k] for k in STATISTICS}
    rehearsal, drawn = statistics_samples(old_stats, cfg.rehearsal_per_class, cfg, peers)
    x, x_y = torch.cat([features, rehearsal]), torch.cat([y, drawn])
    fresh = train_expert(more, x, x_y, replace(cfg, method="full"))
    from_old = train_expert(more, x, x_y, replace(cfg, method="full"), initial=old)
    assert all(torch.equal(new[name], fresh[name]) for name in TENSOR_NAMES)
    assert not all(torch.equal(new[name], from_old[name]) for name in TENSOR_NAMES)
    assert new["up.weight"].any()

    later = read_tenant_file(
        "bank", write_tenant_csv(tmp_path / "later.csv", BANK, per_split=(1, 0, 0), seed=9), split_column="split"
    )
    lifecycle.update(later)  # on the full method, it stays there whatever the size of the update
    assert lifecycle.store.meta("bank").metrics["growth_method"] == "full"

    assert lifecycle.store.rollback("bank", 1) == [2, 3]
    assert torch.equal(tenant_given(lifecycle.store, trunk, "bank", texts), answers)
    assert lifecycle.store.meta("bank").metrics["growth_method"] == "statistics"


def test_update_script_from_one_example_per_intent_to_the_full_method(tmp_path, store):
    """Through the scripts, one intent first seen with one example: grown by statistics, updated past the threshold
    (every intent's rows so far >= 5) onto the full method, as version 2; version 1 stays for rollback."""
    first = uneven_csv(tmp_path / "first.csv", {"balance": 1, "transfer": 12}, seed=1)
    more = uneven_csv(tmp_path / "more.csv", {"balance": 4, "transfer": 2}, seed=2)
    script("grow")(lifecycle_cfg(tmp_path, store, "bank", first))
    script("update")(lifecycle_cfg(tmp_path, store, "bank", more))
    experts = ExpertStore(store)
    assert experts.versions("bank") == [1, 2]
    methods = [experts.meta("bank", v).metrics["growth_method"] for v in (1, 2)]
    assert methods == ["statistics", "full"]
    assert experts.meta("bank").metrics["examples_per_intent_min"] == 5
    assert experts.load("bank")[0]["up.weight"].any()
    assert not experts.load("bank", 1)[0]["up.weight"].any()


# -- pathway experts -------------------------------------------------------------------------------------------


@pytest.mark.slow  # encodes and trains on MiniLM's top layer
def test_a_pathway_tenant_grown_from_one_example_moves_to_a_trained_pathway(tmp_path):
    """Pathway experts: grown by statistics from one example per intent (the pathway that changes nothing), updated
    below the threshold (recomputed, still untrained), then past it with examples of every intent (a pathway
    trained on them); an update past it that lacks an intent is refused, saying why. Rollback serves version 2."""
    trunk = HFEncoderTrunk()
    pathway = dict(layers=1, lora_rank=4, lora_alpha=8.0, lr=3e-3, epochs=2, batch_size=16)
    cfg = fast_growth(kind="pathway", pathway=pathway, few_shot_below=3, few_shot_method="statistics")
    lifecycle = Lifecycle(ExpertStore(tmp_path / "store"), trunk, trunk.encode, cfg)
    weather = write_tenant_csv(tmp_path / "weather.csv", SYNTHETIC["weather"], per_split=(8, 0, 0))
    lifecycle.grow(read_tenant_file("weather", weather, split_column="split"))
    tenant = lambda name, counts, seed: read_tenant_file(  # noqa: E731
        "bank", uneven_csv(tmp_path / f"{name}.csv", counts, seed), split_column="split"
    )
    lifecycle.grow(tenant("first", {"balance": 1, "transfer": 1}, 1))
    lifecycle.update(tenant("second", {"balance": 1, "transfer": 3}, 2))  # 2 and 4 rows so far
    second, meta = lifecycle.store.load("bank")
    assert meta.metrics["growth_method"] == "statistics" and meta.metrics["examples_per_intent_min"] == 2
    assert not any(second[name].any() for name in second if name.startswith("lora.") and name.endswith(".B"))
    texts = ["my account balance please", "wire money now", "send a transfer today"]

    def answers():
        model = load_mixture(lifecycle.store, trunk=trunk)
        ids = model.tenant_ids(["bank"] * len(texts))
        return model(trunk.encode(texts), ids, hidden=model.hidden_states(texts)).log_probs

    before = answers()
    with pytest.raises(ValueError, match=r"lack intents \['transfer'\].*raise growth.few_shot_below"):
        lifecycle.update(tenant("lacking", {"balance": 4}, 3))  # 6 and 4: past the threshold, with no transfer
    assert lifecycle.store.versions("bank") == [1, 2]
    lifecycle.update(tenant("third", {"balance": 4, "transfer": 4}, 4))
    third, meta = lifecycle.store.load("bank")
    assert meta.version == 3 and meta.metrics["growth_method"] == "full"
    assert any(third[name].any() for name in third if name.startswith("lora.") and name.endswith(".B"))
    assert third[COUNT].tolist() == [6.0, 8.0]  # routing keeps every row's statistics
    assert third["pathway.count"].tolist() == [4.0, 4.0]  # the new pathway's features: of the texts it saw
    lifecycle.store.rollback("bank", 2)
    assert torch.equal(answers(), before)

    lifecycle.cfg = replace(cfg, few_shot_below=0)  # never few-example: a pathway trained from one example each
    lifecycle.grow(
        read_tenant_file(
            "music",
            uneven_csv(tmp_path / "music.csv", {"play": 1, "stop": 1}, 5, SYNTHETIC["music"]),
            split_column="split",
        )
    )
    music, meta = lifecycle.store.load("music")
    assert meta.metrics["growth_method"] == "full" and meta.metrics["examples_per_intent_min"] == 1
    assert any(music[name].any() for name in music if name.startswith("lora.") and name.endswith(".B"))


def test_left_unset_the_threshold_is_the_one_the_learning_curves_chose_for_the_store_s_kind():
    from moe.lifecycle.growth import GROWERS

    cfg = fast_growth()  # few_shot_below and few_shot_method unset, as conf/growth/default.yaml leaves them
    pathway, adapter = GROWERS["pathway"].FEW_SHOT, GROWERS["adapter"].FEW_SHOT
    assert method_for([5, 9], cfg, pathway) == "nearest" and method_for([10, 12], cfg, pathway) == "full"
    assert method_for([1], cfg, adapter) == "full"  # adapters: today's growth at every k
    assert method_for([5], replace(cfg, few_shot_below=0), pathway) == "full"  # 0: never
    assert method_for([5], replace(cfg, few_shot_method="contrastive"), pathway) == "contrastive"
