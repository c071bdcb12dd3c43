"""End-to-end training from the real Hydra configs: outputs, shards, loggers, and every experiment file."""

import json
from typing import get_args

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from safetensors import safe_open
from safetensors.torch import load_file

from moe.inference import load_mixture
from moe.model import best_labels, union_scores
from moe.serving import Server
from moe.store import ExpertStore, expert_shards, read_shard
from moe.tasks import evaluate, export, scenario, train
from moe.tasks.train import build_classifier, build_data
from moe.trunk import TinyTrunk
from tests.helpers import CONF, compose_config, synthetic_data

FAST = [
    "trunk=tiny",
    "trainer.max_epochs=8",
    "callbacks=none",
    "data.batch_size=16",
    "trainer.check_val_every_n_epoch=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    out = folder / "run"
    return train.run(compose_config("train", [*synthetic_data(folder / "data"), "logger=csv", *FAST], out)), out


@pytest.mark.slow
def test_run_writes_config_shards_gate_and_metrics(trained):
    metrics, out = trained
    assert (out / "config.yaml").is_file() and (out / "gate.safetensors").is_file()
    written = json.loads((out / "metrics.json").read_text())
    for key in ("test/acc_routed", "test/acc_tenant_given", "test/routing_acc", "time/encode_s", "time/train_s"):
        assert key in written and written[key] == pytest.approx(metrics[key])
    # the synthetic intents are separable by keywords: well above chance (1/6 routed, 1/2 tenant given)
    assert written["test/acc_tenant_given"] > 90 and written["test/acc_routed"] > 80
    assert (out / "csv").is_dir()


@pytest.mark.slow
def test_each_shard_records_its_own_tenants_figures(trained):
    """Not the run's: each shard holds its tenant's figures, and their query-weighted mean is the run's."""
    metrics, out = trained
    store = ExpertStore(out / "experts")
    own = {tenant: store.meta(tenant).metrics for tenant in store.tenants()}
    for split in ("val", "test"):
        queries = {tenant: m[f"{split}/queries"] for tenant, m in own.items()}
        assert sum(queries.values()) == metrics[f"{split}/queries"]  # each counts its own queries, not the run's
        for key in ("acc_routed", "acc_tenant_given", "routing_acc"):
            weighted = sum(m[f"{split}/{key}"] * queries[t] for t, m in own.items()) / sum(queries.values())
            assert weighted == pytest.approx(metrics[f"{split}/{key}"], abs=1e-9), (split, key)
    assert all(m["train_examples"] == 60 for m in own.values())  # 30 rows of each of its 2 intents


def test_each_expert_is_a_self_describing_shard_readable_with_safetensors_alone(trained):
    _, out = trained
    shards = sorted((out / "experts").rglob("*.safetensors"))
    assert [p.parent.name for p in shards] == ["bank", "music", "weather"]
    with safe_open(shards[0], framework="pt") as handle:
        meta = handle.metadata()
        names = set(handle.keys())
    assert {"tenant", "labels", "trunk_fingerprint", "architecture", "version", "tensors_sha256"} <= set(meta)
    assert meta["tenant"] == "bank" and json.loads(meta["labels"]) == ["balance", "transfer"]
    assert {"head.weight", "gate.weight"} <= names


def by_tenant(model, output) -> tuple[list[list[str]], torch.Tensor]:
    """The tenants of each input's consulted experts, and the gate's probability of every tenant (in sorted order)."""
    rows = zip(output.experts.tolist(), output.weights.tolist(), strict=True)
    chosen = [[model.experts[e].tenant for e, w in zip(es, ws, strict=True) if w > 0] for es, ws in rows]
    order = sorted(range(len(model.experts)), key=lambda e: model.experts[e].tenant)
    return chosen, output.router.probs[:, order]


@pytest.mark.slow
def test_reassembled_mixture_predicts_like_the_trained_one(tmp_path):
    """The trained in-memory mixture, cut into shards and built back by `load_mixture`, routes and scores alike
    (the two list their experts in different orders, so the gate's sums may round apart in a near tie)."""
    L.seed_everything(0)
    cfg = compose_config("train", [*synthetic_data(tmp_path / "data"), *FAST], tmp_path / "run")
    trunk = TinyTrunk(dim=32, freeze=True)
    data = build_data(cfg, trunk)
    data.setup()
    classifier = build_classifier(cfg, data.tenants, trunk)
    L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(classifier, data)
    store = ExpertStore(tmp_path / "experts")
    for tensors, meta in expert_shards(classifier.model, trunk.fingerprint):
        store.save(tensors, meta)
    trained, paged = classifier.model.eval(), load_mixture(store, trunk_fingerprint=trunk.fingerprint)
    x = data.datasets["test"].features
    tenant = torch.tensor([paged.tenant_index(t.name) for t in data.tenants])[data.datasets["test"].tenant]
    with torch.no_grad():
        for given in (None, tenant):
            ours, theirs = paged(x, given), trained(x, given)
            (ours_chosen, ours_probs), (their_chosen, their_probs) = by_tenant(paged, ours), by_tenant(trained, theirs)
            torch.testing.assert_close(ours_probs, their_probs, atol=1e-6, rtol=0)
            same = torch.tensor([a == b for a, b in zip(ours_chosen, their_chosen, strict=True)])
            assert same.float().mean() > 0.95  # the rest are near ties of the last chosen expert
            scores = [union_scores(o.scores, o.label_ids)[same].max(-1) for o in (ours, theirs)]
            torch.testing.assert_close(scores[0].values, scores[1].values, atol=1e-5, rtol=0)
            assert torch.equal(best_labels(ours)[0][same], best_labels(theirs)[0][same])


@pytest.mark.slow
def test_wandb_logger_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = compose_config("train", [*synthetic_data(tmp_path / "data"), "logger=wandb", *FAST], out)
    train.run(cfg)
    assert list((out / "wandb").glob("offline-run-*")), "wandb wrote no offline run"


def experiments_run_by(script: str) -> list[str]:
    """Experiment files whose header names `scripts/<script>.py` as the command that runs them."""
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if f"scripts/{script}.py" in p.read_text())


# Pathway experts train through a Hugging Face encoder's layers (not the tiny trunk): one layer, one epoch.
PATHWAY_LIMITS = ["trunk=minilm", "expert.pathway.layers=1", "expert.pathway.epochs=1"]


def test_every_experiment_file_names_the_command_that_runs_it():
    named = {
        name for script in ("train", "scenario", "trunk_upgrade", "few_shot") for name in experiments_run_by(script)
    }
    assert named == {p.stem for p in (CONF / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("experiment", experiments_run_by("trunk_upgrade"))
def test_every_trunk_upgrade_experiment_names_real_tenants_and_strategies(experiment, tmp_path, clinc_dir):
    from moe.data.clinc150 import load_clinc150
    from moe.lifecycle.upgrade import Strategy

    cfg = compose_config("trunk_upgrade", [f"experiment={experiment}"], tmp_path)
    domains = {t.name for t in load_clinc150(clinc_dir).tenants}
    assert set(cfg.dormant) < domains and set(cfg.strategies) <= {*get_args(Strategy), "keep"}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", experiments_run_by("train"))
def test_every_experiment_runs_with_tiny_limits(experiment, tmp_path, clinc_dir):
    overrides = [
        f"experiment={experiment}",
        "logger=csv",
        *FAST,
        "trainer.max_epochs=1",
        "data.tenants.domains=[banking,travel]",
        *(PATHWAY_LIMITS if "pathway" in experiment else []),
    ]
    metrics = train.run(compose_config("train", overrides, tmp_path / experiment))
    assert metrics["data/tenants"] == 2
    assert len(list((tmp_path / experiment / "experts").rglob("*.safetensors"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize(  # the pathway scenario at its own limits: tests/test_pathway.py
    "experiment", [name for name in experiments_run_by("scenario") if "pathway" not in name]
)
def test_every_scenario_experiment_runs_with_tiny_limits(experiment, tmp_path, clinc_dir):
    overrides = [f"experiment={experiment}", "trunk=tiny", "growth.epochs=1", "growth.rank=4"]
    with pytest.raises(ValueError, match="eval_split=val: the baselines are measured on test"):
        scenario.run(compose_config("scenario", [*overrides, "eval_split=val"], tmp_path / "on_val"))
    cfg = compose_config("scenario", [*overrides, "baselines.sequential=false"], tmp_path)
    metrics = scenario.run(cfg)
    assert metrics["final/tenants"] == len({e.tenant for e in cfg.events})
    assert metrics["final/forgetting_tenant_given"] == 0.0 and metrics["wake/identical"] == 1.0
    for name in ("metrics.json", "accuracy_matrix.json", "accuracy_matrix.png", "accuracy_over_events.png"):
        assert (tmp_path / name).is_file()
    if cfg.data.tenants.get("overlapping"):  # the intents built to be shared warned when their second owner grew
        warnings = json.loads((tmp_path / "accuracy_matrix.json").read_text())["overlap_warnings"]
        assert "payday_date ~ hr_portal/salary_day" in warnings["payroll"], warnings
        assert "forecast ~ utility/weather" in warnings["concierge"], warnings
    # the grown store evaluates as the scenario served it (its run folder has a config.yaml but no gate file)
    store = ["store_dir=" + str(tmp_path / "experts"), "routing=statistics"]
    store += ["data=clinc150_overlap"] if cfg.data.tenants.get("overlapping") else []  # the scenario's tenants
    listing = ["logger=none", "oos.compare=false", "write_predictions=true"]
    evaluated = evaluate.run(compose_config("evaluate", [*store, *listing], tmp_path / "evaluation"))
    assert evaluated["eval/top_k"] == cfg.top_k
    assert evaluated["test/acc_routed"] == pytest.approx(metrics["final/acc_routed"], abs=0.05)  # 2 of 4,500
    # the rules chosen on val (out-of-scope score and threshold, runners-up margin) travel in the bundle, and the
    # bundle, served in this process, answers as the evaluation did
    manifest = export.run(compose_config("export", store, tmp_path / "bundle"))
    rules = manifest["gate"]["oos"] | {"unsure_margin": manifest["gate"]["unsure_margin"]}
    assert rules["score"] == evaluated["oos/score"] and rules["score_chosen_on"] == "val"
    assert rules["threshold"] == evaluated["oos/threshold"]
    assert rules["unsure_margin"] == evaluated["routing/unsure_margin"]
    predictions = (tmp_path / "evaluation" / "predictions_test.jsonl").read_text().splitlines()
    expected = [json.loads(line) for line in predictions[:: max(1, len(predictions) // 200)]]
    served = Server(tmp_path / "bundle").predict([e["text"] for e in expected])
    keys = ("tenant", "intent", "out_of_scope")
    assert [{k: getattr(a, k) for k in keys} for a in served] == [{k: e[k] for k in keys} for e in expected]
    assert [[t for t, _ in a.runners_up] for a in served] == [[r["tenant"] for r in e["runners_up"]] for e in expected]


@pytest.mark.slow
def test_trainable_trunk_trains_and_is_saved(tmp_path):
    out = tmp_path / "run"
    cfg = compose_config("train", [*synthetic_data(tmp_path / "data"), "logger=csv", *FAST, "trunk.freeze=false"], out)
    initial: TinyTrunk = instantiate(cfg.trunk)  # the trunk train.run() starts from: the same class, config and seed
    train.run(cfg)
    weights, start = load_file(out / "trunk.safetensors"), initial.state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in start.items()}
    assert not torch.equal(weights["proj.weight"], start["proj.weight"]), "the saved trunk is the untrained one"
    rebuilt = TinyTrunk.rebuild(initial.init_arguments(), out)  # the experts' trunk, from the file
    shards = [p for p in (out / "experts").glob("*/v*.safetensors") if not p.parent.name.startswith(".")]
    for shard in sorted(shards):  # each expert names the saved trunk (the store's own .trunks/ copy is not one)
        _, meta = read_shard(shard, rebuilt.fingerprint)
        assert meta.trunk_fingerprint == rebuilt.fingerprint != initial.fingerprint
