"""Growth from a few examples (moe.lifecycle.few_shot) and its learning-curve experiment (moe.experiments.few_shot).

Adapter experts on the tiny trunk; pathway experts on MiniLM's top layer, with the synthetic tenants."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from moe.experiments.few_shot import draw
from moe.inference import load_mixture
from moe.lifecycle import Lifecycle
from moe.lifecycle.few_shot import Neighbours, nearest_tenant
from moe.model.router import ROUTING
from moe.model.stats import MEAN, PooledScatter, class_statistics, discriminant_rows
from moe.store import ExpertStore
from moe.trunk import HFEncoderTrunk, TinyTrunk
from tests.helpers import compose_config, digests, fast_growth, read_synthetic_tenants, synthetic_data

PATHWAY = dict(layers=1, lora_rank=4, lora_alpha=8.0, lr=3e-3, epochs=2, batch_size=16)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    return read_synthetic_tenants(tmp_path_factory.mktemp("few_shot_tenants"))


@pytest.fixture(scope="module")
def tiny() -> TinyTrunk:
    return TinyTrunk(dim=32, freeze=True)


def others_than(tenant: str, store) -> dict:
    """The digest of every file of the store but the tenant's own (its folder, its lock)."""
    return {p: d for p, d in digests(store).items() if tenant not in (p.parts[0], p.stem)}


def adapter_store(root, trunk, tenants, names, **growth) -> Lifecycle:
    lifecycle = Lifecycle(ExpertStore(root), trunk, trunk.encode, fast_growth(**growth))
    for name in names:
        lifecycle.grow(tenants[name])
    return lifecycle


def test_a_draw_takes_k_examples_of_every_intent_the_same_for_every_method(tenants):
    bank = tenants["bank"]
    drawn = draw(bank, 3, 0)
    assert sorted(e.label for e in drawn.split("train")) == sorted([*bank.labels] * 3)
    assert drawn.split("train") == draw(bank, 3, 0).split("train") != draw(bank, 3, 1).split("train")
    assert drawn.split("test") == bank.split("test") and drawn.split("val") == bank.split("val")
    assert draw(bank, None, 0) is bank
    with pytest.raises(ValueError, match="fewer than 31 train examples"):
        draw(bank, 31, 0)


def test_a_statistics_expert_is_the_discriminants_of_its_class_means_under_the_store_s_covariance(
    tmp_path, tiny, tenants
):
    """No training: its head is Fisher's discriminants of the few rows' means under the covariance pooled over the
    others' shards and its own rows, its adapter the identity; its shard says how it was grown."""
    lifecycle = adapter_store(tmp_path, tiny, tenants, ["weather", "music"])
    before = digests(tmp_path)
    bank = draw(tenants["bank"], 10, 0)  # k = 10, as the issue checks it
    lifecycle.cfg = replace(lifecycle.cfg, method="statistics", method_shrinkage=0.1)
    lifecycle.grow(bank)
    assert others_than("bank", tmp_path) == before  # every other shard, the trunk's record

    tensors, meta = lifecycle.store.load("bank")
    assert meta.metrics["growth_method"] == "statistics" and meta.metrics["train_examples"] == 20
    features = tiny.encode([e.text for e in bank.split("train")])
    labels = torch.tensor([bank.label_index(e.label) for e in bank.split("train")])
    stats = class_statistics(features, labels, 2)
    others = [lifecycle.store.load(name)[0] for name in ("weather", "music")]
    precision = (PooledScatter.of([stats]) + PooledScatter.of(others)).precision(0.1)
    weight, bias = discriminant_rows(stats[MEAN], precision, 8.0)
    torch.testing.assert_close(tensors["head.weight"], weight.T)
    torch.testing.assert_close(tensors["head.bias"], bias)
    assert not tensors["up.weight"].any()  # the adapter adds nothing

    model = load_mixture(lifecycle.store, trunk_fingerprint=tiny.fingerprint, trunk=tiny)
    test = [e for e in tenants["bank"].split("test")]
    x = tiny.encode([e.text for e in test])
    given = model(x, torch.full((len(x),), model.tenant_index("bank")))
    lda = (x @ weight.T * 8.0 + bias).argmax(-1)
    assert torch.equal(given.log_probs[:, 0, :2].argmax(-1), lda)


def test_a_warm_expert_starts_from_the_statistics_head_and_trains_from_there(tmp_path, tiny, tenants):
    """`warm`: today's training with its head started from the statistics expert's. With no epochs it is that head,
    its adapter a fresh one (down drawn, up zero: it adds nothing yet, and training can move both)."""
    lifecycle = adapter_store(tmp_path, tiny, tenants, ["weather", "music"])
    bank = draw(tenants["bank"], 3, 0)
    heads = {}
    for method in ("statistics", "warm"):
        lifecycle.cfg = replace(lifecycle.cfg, method=method, epochs=0, method_shrinkage=0.3)
        lifecycle.grow(bank)
        tensors, meta = lifecycle.store.load("bank")
        heads[method] = tensors["head.weight"]
        assert meta.metrics["growth_method"] == method
        lifecycle.store.delete("bank")
    assert torch.equal(heads["warm"], heads["statistics"])
    assert tensors["down.weight"].any() and not tensors["up.weight"].any()


def test_reusing_a_pathway_needs_pathway_experts(tmp_path, tiny, tenants):
    lifecycle = adapter_store(tmp_path, tiny, tenants, ["weather"])
    for method in ("nearest", "contrastive"):
        lifecycle.cfg = replace(lifecycle.cfg, method=method)
        with pytest.raises(ValueError, match=f"'{method}'.*needs pathway experts.*adapter"):
            lifecycle.grow(tenants["bank"])
    assert lifecycle.store.tenants() == ["weather"]
    with pytest.raises(ValueError, match="unknown growth method 'lda'"):
        fast_growth(method="lda")


def test_the_nearest_tenant_is_where_the_gate_sends_most_of_the_new_rows():
    rows = {"a": torch.eye(2, 4), "b": torch.eye(4)[2:]}  # a's gate rows point along axes 0-1, b's along 2-3
    entries = {name: {ROUTING[0]: weight, ROUTING[1]: torch.zeros(2)} for name, weight in rows.items()}
    neighbours = Neighbours(entries, load=lambda name: {}, same_trunk=("a", "b"))
    features = torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 1.0], [1.0, 0, 0, 0]])
    assert nearest_tenant(features, neighbours, 8.0) == "b"
    assert nearest_tenant(features, replace(neighbours, same_trunk=("a",)), 8.0) == "a"
    with pytest.raises(ValueError, match="needs another expert on this trunk"):
        nearest_tenant(features, replace(neighbours, same_trunk=()), 8.0)


@pytest.mark.slow
def test_pathway_growth_from_the_nearest_tenant_and_from_pairs(tmp_path, tenants):
    """`nearest` starts from the pathway of the tenant the gate sends the rows to (with no epochs, it is that
    pathway); `contrastive` trains a pathway of its own; `statistics` keeps the trunk's features. Every other shard
    and the trunk stay byte-identical."""
    trunk = HFEncoderTrunk()
    lifecycle = Lifecycle(ExpertStore(tmp_path), trunk, trunk.encode, fast_growth(kind="pathway", pathway=PATHWAY))
    lifecycle.grow(tenants["weather"])
    lifecycle.grow(tenants["music"])
    before = digests(tmp_path)
    bank = draw(tenants["bank"], 3, 0)
    lora = [name for name in lifecycle.store.load("weather")[0] if name.startswith("lora.")]

    features = trunk.encode([e.text for e in bank.split("train")])
    nearest = nearest_tenant(features, lifecycle._neighbours(lifecycle._others("bank")), 8.0)
    lifecycle.cfg = replace(lifecycle.cfg, method="nearest", nearest_epochs=0)
    lifecycle.grow(bank)
    grown, start = lifecycle.store.load("bank")[0], lifecycle.store.load(nearest)[0]
    assert all(torch.equal(grown[name], start[name]) for name in lora)

    for method in ("contrastive", "statistics"):
        lifecycle.store.delete("bank")
        lifecycle.cfg = replace(lifecycle.cfg, method=method)
        lifecycle.grow(bank)
        tensors, meta = lifecycle.store.load("bank")
        assert meta.metrics["growth_method"] == method
        b = [tensors[name] for name in lora if name.endswith(".B")]
        assert all(t.any() for t in b) if method == "contrastive" else not any(t.any() for t in b)
        assert torch.isfinite(tensors["head.weight"]).all()
    assert others_than("bank", tmp_path) == before


@pytest.mark.slow
def test_the_learning_curve_experiment_chooses_on_development_tenants_and_reports_on_the_others(tmp_path):
    from moe.tasks import few_shot

    overrides = [*synthetic_data(tmp_path / "data"), "experiment=clinc150_few_shot", "trunk=tiny", "dev_domains=[bank]"]
    overrides += ["ks=[2,null]", "draws=2", "growth.epochs=3", "whole_store_ks=[2]", "probe.weight_decays=[0.01,0.001]"]
    cfg = compose_config("few_shot", overrides, tmp_path / "run")
    metrics = few_shot.run(cfg)
    out = tmp_path / "run"
    chosen = json.loads((out / "chosen.json").read_text())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["tenant"] for r in rows if r["split"] == "val"} == {"bank"}
    assert {r["tenant"] for r in rows if r["split"] == "test"} == {"weather", "music"}
    assert len([r for r in rows if r["split"] == "test" and r["method"] == "full" and r["k"] == 2]) == 4  # 2 draws
    assert len([r for r in rows if r["split"] == "test" and r["method"] == "full" and r["k"] is None]) == 2  # 1 draw
    assert chosen["settings"]["statistics"] in {f"method_shrinkage={s}" for s in (0.02, 0.1, 0.3, 0.6, 0.9)}
    assert set(chosen["method_per_k"]) == {"2", "all"}
    assert 0 <= metrics["chosen/k2/given"] <= 100 and 0 <= metrics["statistics/k2/store_routed"] <= 100
    assert (out / "learning_curves.png").stat().st_size > 0

    again = few_shot.run(cfg)  # every row is read back, none measured again
    assert again == metrics
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
