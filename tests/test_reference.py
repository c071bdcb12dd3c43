"""The joint linear reference: one linear softmax over every (tenant, intent) on the same features. It learns a
separable task, is deterministic, takes its regularisation from val alone, and is reported beside the mixture by
the continual scenario and by the evaluation of a store."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moe.data import Example, Tenant, read_tenant_file
from moe.evaluation.reference import (
    Accuracies,
    accuracy_metrics,
    fit_joint_linear,
    fit_metrics,
    joint_linear_reference,
    store_reference_metrics,
)
from moe.lifecycle import Lifecycle
from moe.store import ExpertStore
from moe.tasks import evaluate, scenario
from moe.tasks.inputs import feature_encoder
from moe.trunk import FeatureCache, TinyTrunk
from tests.helpers import (
    compose_config,
    fast_growth,
    synthetic_data,
    tenant_files_override,
    write_synthetic_tenants,
)

DIM = 8


class Table:
    """An encoder over made-up texts: each text's feature vector is looked up."""

    def __init__(self):
        self.features: dict[str, torch.Tensor] = {}

    def add(self, text: str, vector: torch.Tensor) -> str:
        self.features[text] = vector
        return text

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.features[t] for t in texts]) if texts else torch.empty(0, DIM)


def gaussian_tenants(table: Table, per_split=(40, 10, 20), spread=0.3, seed=0) -> list[Tenant]:
    """Three tenants of three intents, each intent a Gaussian blob around its own random centre."""
    generator = torch.Generator().manual_seed(seed)
    tenants = []
    for t in range(3):
        labels = tuple(f"intent{i}" for i in range(3))
        centres = {label: 2 * torch.randn(DIM, generator=generator) for label in labels}
        splits = {}
        for split, count in zip(("train", "val", "test"), per_split, strict=True):
            splits[split] = [
                Example(table.add(f"t{t} {label} {split} {i}", centres[label] + spread * torch.randn(DIM)), label)
                for label in labels
                for i in range(count)
            ]
        tenants.append(Tenant(f"tenant{t}", labels, splits))
    return tenants


def test_the_reference_learns_a_separable_task_and_tenant_given_is_never_below_routed():
    table = Table()
    torch.manual_seed(0)
    tenants = gaussian_tenants(table)
    model, test = joint_linear_reference(tenants, table, "test")
    assert test.overall.acc_routed > 95 and test.overall.queries == 3 * 3 * 20
    assert len(model.labels) == 9 and model.labels[3] == ("tenant1", "intent0")
    assert {c.weight_decay for c in model.grid} == {1e-2, 1e-3, 1e-4} and model.seconds > 0
    for figures in [test.overall, *test.per_tenant.values()]:
        assert figures.acc_tenant_given >= figures.acc_routed and figures.routing_acc >= figures.acc_routed
    assert test.group(["tenant0", "tenant1", "tenant2"]) == test.overall


def test_the_reference_is_deterministic():
    table = Table()
    torch.manual_seed(1)
    tenants = gaussian_tenants(table, spread=1.5)  # overlapping: the fit is not trivially perfect
    first, first_test = joint_linear_reference(tenants, table)
    second, second_test = joint_linear_reference(tenants, table)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.chosen == second.chosen and first.grid == second.grid and first_test == second_test


def imbalanced_tenant(table: Table, val_says_b_is_a: bool) -> Tenant:
    """Intent `a` (60 train rows) and `b` (6) far apart. A strongly regularised model has tiny weights and its
    unpenalised bias (the log prior) says `a` everywhere; a weakly regularised one tells them apart."""
    generator = torch.Generator().manual_seed(0)
    centre = {"a": -torch.ones(DIM), "b": torch.ones(DIM)}

    def rows(split: str, label: str, count: int, truth: str | None = None) -> list[Example]:
        noise = 0.2 * torch.randn(count, DIM, generator=generator)
        return [
            Example(table.add(f"{split} {label} {i}", centre[label] + noise[i]), truth or label) for i in range(count)
        ]

    splits = {
        "train": rows("train", "a", 60) + rows("train", "b", 6),
        "val": rows("val", "a", 10) + rows("val", "b", 10, truth="a" if val_says_b_is_a else "b"),
        "test": rows("test", "a", 10) + rows("test", "b", 10),
    }
    return Tenant("only", ("a", "b"), splits)


def test_the_regularisation_is_chosen_on_val_alone():
    table = Table()
    honest = fit_joint_linear([imbalanced_tenant(table, False)], table, weight_decays=(100.0, 1e-3))
    assert honest.chosen.weight_decay == 1e-3 and honest.chosen.val_acc_routed == 100.0
    misled = fit_joint_linear([imbalanced_tenant(table, True)], table, weight_decays=(100.0, 1e-3))
    assert misled.chosen.weight_decay == 100.0 and misled.chosen.val_acc_routed == 100.0
    for model in (honest, misled):  # the best val candidate, ties to the stronger decay, then to fewer steps
        assert model.chosen == max(model.grid, key=lambda c: c.val_acc_routed)
    # what val chose is what the test split shows: the misled reference never answers `b`
    test = misled.evaluate([imbalanced_tenant(table, False)], table, "test").overall
    assert test.acc_routed == 50.0 and test.acc_tenant_given == 50.0 and test.routing_acc == 100.0


def test_micro_average_pools_queries():
    pooled = Accuracies.micro([Accuracies(100.0, 100.0, 100.0, 3), Accuracies(0.0, 50.0, 100.0, 1)])
    assert pooled == Accuracies(75.0, 87.5, 100.0, 4)
    assert Accuracies.micro([]).queries == 0


def test_scenario_reports_the_joint_linear_reference_and_the_groups(tmp_path):
    events = "events=[{op: grow, tenant: weather}, {op: grow, tenant: music}, {op: grow, tenant: bank}]"
    overrides = [
        *synthetic_data(tmp_path / "data"),
        "trunk=tiny",
        events,
        "compare_groups={old: [weather], new: [music, bank], all: [weather, music, bank]}",
        "baselines.sequential=false",
        "baselines.joint=false",
        "growth.epochs=3",
        "growth.rank=8",
    ]
    metrics = scenario.run(compose_config("scenario", overrides, tmp_path / "run"))
    for who in ("final", "baseline/joint_linear"):
        for key in ("acc_routed", "routing_acc"):
            assert metrics[f"{who}/{key}_all"] == pytest.approx(metrics[f"{who}/{key}"])
            old, new = metrics[f"{who}/{key}_old"], metrics[f"{who}/{key}_new"]
            assert metrics[f"{who}/{key}_all"] == pytest.approx((old + 2 * new) / 3)  # 16 test queries each
    assert metrics["baseline/joint_linear/acc_tenant_given"] >= metrics["baseline/joint_linear/acc_routed"] > 90
    assert metrics["baseline/joint_linear/weight_decay"] in (1e-2, 1e-3, 1e-4)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["baseline/joint_linear/routing_acc"] == metrics["baseline/joint_linear/routing_acc"]
    assert (tmp_path / "run" / "accuracy_over_events.png").is_file()


def test_scenario_rejects_a_group_of_unknown_tenants(tmp_path):
    overrides = [*synthetic_data(tmp_path / "data"), "trunk=tiny", "events=[{op: grow, tenant: weather}]"]
    cfg = compose_config("scenario", [*overrides, "compare_groups={old: [nobody]}"], tmp_path / "run")
    with pytest.raises(KeyError, match="nobody"):
        scenario.run(cfg)


def test_evaluate_writes_the_reference_of_a_grown_store(tmp_path):
    trunk, store = TinyTrunk(dim=16, freeze=True), tmp_path / "run" / "experts"
    (tmp_path / "run").mkdir()
    OmegaConf.save(
        OmegaConf.create({"top_k": 2}), tmp_path / "run" / "config.yaml"
    )  # the run folder a store is evaluated from
    lifecycle = Lifecycle(ExpertStore(store), trunk, FeatureCache(tmp_path / "cache", trunk).encode, fast_growth())
    files = write_synthetic_tenants(tmp_path / "data")
    tenants = [read_tenant_file(name, path, split_column="split") for name, path in files.items()]
    for tenant in tenants:
        lifecycle.grow(tenant)
    overrides = [
        "data=tenant_files",
        tenant_files_override(files),
        f"store_dir={store}",
        "trunk=tiny",
        "trunk.dim=16",
        "routing=statistics",
        "logger=none",
        "oos.compare=false",
        "reference.joint_linear=true",
    ]
    cfg = compose_config("evaluate", overrides, tmp_path / "evaluation")
    evaluate.run(cfg)
    written = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    # the same reference fitted directly on the grown tenants, with the evaluation's encoder (its feature cache)
    encode = feature_encoder(instantiate(cfg.trunk), cfg.paths.get("cache_dir"))
    model = fit_joint_linear(tenants, encode)
    prefix = "reference/joint_linear"
    expected = fit_metrics(model, prefix)
    for split in ("val", "test"):
        figures = model.evaluate(tenants, encode, split)
        assert figures.overall.queries == sum(len(t.split(split)) for t in tenants) > 0
        expected |= accuracy_metrics(figures.overall, f"{prefix}/{split}")
    assert {key: written[key] for key in expected} == pytest.approx(expected)
    assert written["reference/joint_linear/test/acc_tenant_given"] >= written["reference/joint_linear/test/acc_routed"]
    assert written["reference/joint_linear/weight_decay"] in (1e-2, 1e-3, 1e-4)


TABLE = Table()  # the features of `seeded_gaussian_tenants`


def seeded_gaussian_tenants() -> list[Tenant]:
    """`gaussian_tenants` on `TABLE`, the same ones at every call (a data config's `_target_`)."""
    with torch.random.fork_rng():
        torch.manual_seed(2)
        return gaussian_tenants(TABLE, spread=1.5)


def test_store_reference_is_trained_on_the_intents_the_store_knows_in_its_order():
    data = OmegaConf.create({"tenants": {"_target_": "tests.test_reference.seeded_gaussian_tenants"}})
    known = [("tenant2", "intent2"), ("tenant2", "intent0"), ("tenant0", "intent1"), ("tenant0", "not_in_the_data")]
    tenant0, _, tenant2 = seeded_gaussian_tenants()  # fills TABLE here (hydra imports this file as another module)
    metrics = store_reference_metrics(data, known, TABLE, ["val", "test"])
    tenants = [tenant0.restricted(["intent1"]), tenant2.restricted(["intent2", "intent0"])]  # in the data's order
    assert tenants[1].labels == ("intent2", "intent0") and tenants[1].name == "tenant2"
    assert {e.label for split in ("train", "val", "test") for e in tenants[1].split(split)} == {"intent2", "intent0"}
    model = fit_joint_linear(tenants, TABLE)
    assert model.labels == (("tenant0", "intent1"), ("tenant2", "intent2"), ("tenant2", "intent0"))
    prefix = "reference/joint_linear"
    expected = fit_metrics(model, prefix) | {f"{prefix}/train_s": metrics[f"{prefix}/train_s"]}
    for split in ("val", "test"):
        expected |= accuracy_metrics(model.evaluate(tenants, TABLE, split).overall, f"{prefix}/{split}")
    assert metrics == pytest.approx(expected)
    with pytest.raises(KeyError, match="not_in_the_data"):
        tenant0.restricted(["intent0", "not_in_the_data"])


def tenants_without_train() -> list[Tenant]:
    return [Tenant("weather", ("rain",), {"test": [Example("rain again", "rain")]})]


def test_store_reference_logs_an_error_when_the_tenants_have_no_train_split(caplog):
    data = OmegaConf.create({"tenants": {"_target_": "tests.test_reference.tenants_without_train"}})
    with caplog.at_level(logging.ERROR, logger="moe.evaluation.reference"):
        assert store_reference_metrics(data, [("weather", "rain")], Table(), ["test"]) == {}
    assert "no train split" in caplog.text
