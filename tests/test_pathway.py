"""Pathway experts (moe.model.pathway): LoRA inside the trunk's top layers, grown, updated, paged and served.

On the shipped MiniLM trunk, with pathways over its top two layers and tiny synthetic tenants: seconds per grow."""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moe.data import read_tenant_file
from moe.inference import load_mixture, predict
from moe.lifecycle import Lifecycle
from moe.lifecycle.upgrade import upgrade_store
from moe.model import TENSOR_NAMES, best_labels
from moe.model.pathway import TARGETS, Pathways, PathwaySpec
from moe.store import ExpertStore, TrunkVersions, tensor_bytes
from moe.training.pathway import LowerStates, PathwayClassifier, PathwayConfig, collate
from moe.trunk import HFEncoderTrunk
from moe.trunk.base import sentence_features
from tests.helpers import (
    SYNTHETIC,
    compose_config,
    digests,
    fast_growth,
    run_python,
    script,
    synthetic_data,
    tenant_files_override,
    write_synthetic_tenants,
    write_tenant_csv,
)

TEXTS = ["what is my balance", "wake me up at seven tomorrow please", "will it rain", "play some jazz music now"]
PATHWAY = dict(layers=2, lora_rank=4, lora_alpha=8.0, lr=3e-3, epochs=2, batch_size=16)
# A mixed batch and each query alone pad their token states differently, and run the top layers as products of
# other shapes: the same answers, to float32 rounding.
MIXED_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def trunk() -> HFEncoderTrunk:
    return HFEncoderTrunk()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory):
    files = write_synthetic_tenants(tmp_path_factory.mktemp("pathway_tenants"))
    return {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}


def random_pathway(pathways: Pathways, seed: int) -> dict[str, torch.Tensor]:
    """A pathway with B drawn too (a fresh one has B = 0 and changes nothing)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = pathways.init_tensors(generator)
    return {k: torch.randn(t.shape, generator=generator) * 0.05 if k.endswith(".B") else t for k, t in tensors.items()}


def grown_store(root, trunk, tenants, names) -> Lifecycle:
    lifecycle = Lifecycle(ExpertStore(root), trunk, trunk.encode, fast_growth(kind="pathway", pathway=PATHWAY))
    for name in names:
        lifecycle.grow(tenants[name])
    return lifecycle


def test_the_trunk_is_untouched_outside_a_pathway(trunk):
    before, fingerprint = trunk(TEXTS), trunk.fingerprint
    pathways = Pathways(trunk, PathwaySpec(layers=2, rank=4))
    pathways.features(TEXTS, random_pathway(pathways, 0))
    trunk._fingerprint = None  # hashed afresh
    assert torch.equal(trunk(TEXTS), before) and trunk.fingerprint == fingerprint
    zero = pathways.init_tensors(torch.Generator().manual_seed(1))  # B = 0: the pathway is the trunk
    assert torch.equal(pathways.features(TEXTS, zero), before)


def test_the_lora_term_is_peft_s(trunk):
    """PEFT's `lora.Linear`, given the same A and B in the same modules, computes the same features."""
    from peft import LoraConfig, inject_adapter_in_model

    spec = PathwaySpec(layers=2, rank=4, alpha=8.0)
    pathways = Pathways(trunk, spec)
    pathway = random_pathway(pathways, 2)
    encoder = inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8.0, target_modules=list(TARGETS), layers_to_transform=[4, 5]),
        copy.deepcopy(trunk.encoder),
    )
    for name in pathways.module_names():
        layer, target = name.split(".", 1)
        module = encoder.encoder.layer[int(layer)].get_submodule(target)
        module.lora_A["default"].weight.data = pathway[f"lora.{name}.A"].clone()
        module.lora_B["default"].weight.data = pathway[f"lora.{name}.B"].clone()
    tokens = trunk.tokens(TEXTS)
    with torch.no_grad():
        reference = sentence_features(encoder(**tokens).last_hidden_state, tokens["attention_mask"])
    torch.testing.assert_close(pathways.features(TEXTS, pathway), reference, atol=1e-6, rtol=0)


def test_one_pass_over_many_pathways_is_each_pathway_alone(trunk):
    pathways = Pathways(trunk, PathwaySpec(layers=3, rank=4))
    stack = [random_pathway(pathways, seed) for seed in range(3)]
    rows = torch.tensor([2, 0, 1, 0])
    mixed = pathways.upper(pathways.lower(TEXTS), stack, rows)
    alone = torch.cat([pathways.features([text], stack[e]) for text, e in zip(TEXTS, rows.tolist(), strict=True)])
    torch.testing.assert_close(mixed, alone, atol=MIXED_TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="3 pathways need each row's pathway"):
        pathways.upper(pathways.lower(TEXTS), stack)


def test_a_linear_schedule_warms_up_then_decays_to_zero(trunk):
    """`schedule: linear` steps the learning rates of the LoRA tensors and the head once per batch: up from 0 over the
    `warmup` share of the steps, then down to 0 at the last one."""
    cfg = PathwayConfig(layers=2, lora_rank=4, epochs=2, batch_size=2, schedule="linear", warmup=0.25)
    module = PathwayClassifier(Pathways(trunk, cfg.spec()), 2, cfg)
    examples = LowerStates(module.pathways, TEXTS, torch.tensor([0, 1, 0, 1]))
    rates = []  # the LoRA tensors' and the head's, at each step

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            rates.extend(group["lr"] for group in trainer.optimizers[0].param_groups)

    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Record()]
    )
    trainer.fit(module, DataLoader(examples, batch_size=2, collate_fn=collate))
    peak = [cfg.lr, cfg.head_lr]
    shares = (0.0, 1.0, 2 / 3, 1 / 3)  # 4 steps: 1 warming up, 3 decaying
    assert rates == pytest.approx([share * rate for share in shares for rate in peak])
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [0.0, 0.0]
    with pytest.raises(ValueError, match="schedule must be one of"):
        PathwayConfig(schedule="cosine")
    with pytest.raises(ValueError, match="warmup is the share of the steps"):
        PathwayConfig(schedule="linear", warmup=1.5)


@pytest.mark.slow  # grows on MiniLM
def test_growing_a_pathway_leaves_every_other_shard_and_the_trunk_byte_identical(tmp_path, trunk, tenants):
    lifecycle = grown_store(tmp_path / "store", trunk, tenants, ["weather", "music"])
    before, fingerprint = digests(tmp_path / "store"), trunk.fingerprint
    state = {k: v.clone() for k, v in trunk.state_dict().items()}
    lifecycle.grow(tenants["bank"])
    after = digests(tmp_path / "store")
    assert all(after[path] == digest for path, digest in before.items() if path.suffix == ".safetensors")
    assert len([p for p in after if p.suffix == ".safetensors"]) == 3
    assert all(torch.equal(state[k], v) for k, v in trunk.state_dict().items())
    trunk._fingerprint = None
    assert trunk.fingerprint == fingerprint
    meta = lifecycle.store.meta("bank")
    assert meta.architecture.pathway.spec.layers == 2 and meta.trunk_fingerprint == fingerprint


@pytest.mark.slow  # grows on MiniLM
def test_a_mixed_tenant_batch_answers_as_each_query_alone(tmp_path, trunk, tenants):
    """Tenant given and routed, through the paged mixture: a batch spread over three pathway tenants gives each
    query the answer it gets alone, to float tolerance (`MIXED_TOLERANCE` on log-probabilities)."""
    grown_store(tmp_path / "store", trunk, tenants, ["weather", "music", "bank"])
    model = load_mixture(tmp_path / "store", trunk=trunk)
    examples = [(name, e.text) for name in ("weather", "music", "bank") for e in tenants[name].split("test")[:6]]
    texts = [text for _, text in examples]
    features, hidden = trunk.encode(texts), model.hidden_states(texts)
    for given in (model.tenant_ids([name for name, _ in examples]), None):
        batch = model(features, given, hidden=hidden)
        for i in range(len(texts)):
            one = model(features[i : i + 1], None if given is None else given[i : i + 1], hidden=hidden.take([i]))
            assert torch.equal(one.experts[0], batch.experts[i])
            torch.testing.assert_close(one.log_probs[0], batch.log_probs[i], atol=MIXED_TOLERANCE, rtol=0)
    # tenant given, as serving runs it: the gate's features and every pathway's in one pass over the top layers
    given = model.tenant_ids([name for name, _ in examples])
    fused_features, fused = model.given_pass(model.hidden_states(texts), given)
    torch.testing.assert_close(fused_features, features, atol=MIXED_TOLERANCE, rtol=0)
    two_passes = model(features, given, hidden=hidden)
    one_pass = model(fused_features, given, hidden=fused)
    assert torch.equal(one_pass.experts, two_passes.experts)
    torch.testing.assert_close(one_pass.log_probs, two_passes.log_probs, atol=MIXED_TOLERANCE, rtol=0)
    # and without the gate's features (serving, where no out-of-scope score reads the gate): the same answers
    _, alone = model.given_pass(model.hidden_states(texts), given, gate=False)
    torch.testing.assert_close(alone.pathway[1], fused.pathway[1], atol=MIXED_TOLERANCE, rtol=0)
    gate_free = predict(model, alone.pathway[1], given, "max_score", threshold=0.5, hidden=alone)
    with_gate = predict(model, features, given, "max_score", threshold=0.5, hidden=hidden)
    for a, b in zip(gate_free, with_gate, strict=True):
        assert (a.tenant, a.intent, a.experts, a.out_of_scope) == (b.tenant, b.intent, b.experts, b.out_of_scope)
        assert a.runners_up == ()  # one candidate expert
        assert a.score == pytest.approx(b.score, abs=MIXED_TOLERANCE)
    # a budget that holds one expert at a time: the batch's three pathways can not share one pass, so two passes
    small = load_mixture(tmp_path / "store", trunk=trunk, budget_bytes=max(model.pager.sizes.values()))
    paged_features, paged = small.given_pass(small.hidden_states(texts), given)
    assert paged.pathway is None
    torch.testing.assert_close(paged_features, features, atol=MIXED_TOLERANCE, rtol=0)
    waves = small(paged_features, given, hidden=paged)
    assert torch.equal(waves.experts, two_passes.experts)
    torch.testing.assert_close(waves.log_probs, two_passes.log_probs, atol=MIXED_TOLERANCE, rtol=0)


@pytest.mark.slow  # grows on MiniLM
def test_a_pathway_store_needs_its_trunk_and_the_texts(tmp_path, trunk, tenants):
    grown_store(tmp_path / "store", trunk, tenants, ["weather"])
    with pytest.raises(ValueError, match="load it with its trunk"):
        load_mixture(tmp_path / "store")
    model = load_mixture(tmp_path / "store", trunk=trunk)
    with pytest.raises(ValueError, match="hidden_states"):
        model(trunk.encode(TEXTS))
    # its LoRA tensors count against the pager's budgets with its head's
    key, meta = model.keys[0], ExpertStore(tmp_path / "store").meta("weather")
    lora = sum(4 * torch.Size(shape).numel() for shape in Pathways(trunk, PathwaySpec(2, 4)).shapes().values())
    assert model.pager.sizes[key] == tensor_bytes(meta, TENSOR_NAMES) + lora


@pytest.mark.slow  # grows on MiniLM
def test_an_update_keeps_the_pathway_and_rehearses_the_earlier_intents(tmp_path, trunk, tenants):
    """New intents by update: the pathway's LoRA tensors stay bit for bit, the expert's head grows."""
    bank = tenants["bank"]
    first = bank.restricted(("balance",))
    lifecycle = Lifecycle(
        ExpertStore(tmp_path / "store"), trunk, trunk.encode, fast_growth(kind="pathway", pathway=PATHWAY)
    )
    lifecycle.grow(first)
    lifecycle.update(bank)
    old, _ = lifecycle.store.load("bank", 1)
    new, meta = lifecycle.store.load("bank", 2)
    assert meta.labels == ("balance", "transfer")
    assert all(torch.equal(old[name], new[name]) for name in old if name.startswith("lora."))
    assert new["pathway.count"].tolist() == [60.0, 30.0]  # the earlier 30 and the 30 more this update brings
    model = load_mixture(lifecycle.store, trunk=trunk)
    texts = [e.text for e in bank.split("test")]
    given = model(trunk.encode(texts), model.tenant_ids(["bank"] * len(texts)), hidden=model.hidden_states(texts))
    labels = [model.labels[i][1] for i in best_labels(given)[0].tolist()]
    right = sum(label == e.label for label, e in zip(labels, bank.split("test"), strict=True))
    assert right >= 0.9 * len(texts)


@pytest.mark.slow  # grows on MiniLM
def test_a_hibernated_pathway_wakes_with_identical_answers(tmp_path, trunk, tenants):
    lifecycle = grown_store(tmp_path / "store", trunk, tenants, ["weather", "music"])
    texts = [e.text for e in tenants["music"].split("test")]

    def answers():
        model = load_mixture(lifecycle.store, trunk=trunk)
        ids = model.tenant_ids(["music"] * len(texts))
        return model(trunk.encode(texts), ids, hidden=model.hidden_states(texts)).log_probs

    before = answers()
    lifecycle.hibernate("music")
    assert "music" not in load_mixture(lifecycle.store, trunk=trunk).tenants
    lifecycle.wake("music")
    assert torch.equal(answers(), before)


@pytest.mark.slow  # grows on MiniLM
def test_the_grow_and_update_scripts_train_a_pathway_from_the_tenants_file(tmp_path, tenants):
    """scripts/grow.py and scripts/update.py on a pathway store: the tenant's texts, read whole, train its pathway."""
    first = write_tenant_csv(tmp_path / "bank.csv", SYNTHETIC["bank"])
    more = write_tenant_csv(tmp_path / "bank_more.csv", SYNTHETIC["bank"] | {"loan": ["loan", "borrow", "mortgage"]})
    store = tmp_path / "store"
    pathway = [f"expert.pathway.{key}={value}" for key, value in PATHWAY.items()]
    common = [f"store_dir={store}", "expert=pathway", *pathway, "tenant.name=bank", "tenant.split_column=split"]
    script("grow")(compose_config("lifecycle", [*common, f"tenant.files={first}", "create_store=true"], tmp_path))
    script("update")(compose_config("lifecycle", [*common, f"tenant.files={more}"], tmp_path))
    lifecycle_store = ExpertStore(store)
    (old, _), (new, meta) = lifecycle_store.load("bank", 1), lifecycle_store.load("bank", 2)
    assert meta.labels == ("balance", "transfer", "loan") and meta.architecture.pathway.spec.layers == 2
    assert all(torch.equal(old[name], new[name]) for name in old if name.startswith("lora."))
    assert any(old[name].abs().sum() > 0 for name in old if name.endswith(".B"))  # trained: B moved from zero


def recorded_new_version(store: ExpertStore, trunk: HFEncoderTrunk) -> HFEncoderTrunk:
    """Another version of `trunk` (one weight moved), recorded in `store` as a version trained from it."""
    new = copy.deepcopy(trunk)
    with torch.no_grad():
        next(new.encoder.encoder.layer[-1].parameters()).add_(1e-3)
    new.freeze()
    assert new.fingerprint != trunk.fingerprint
    TrunkVersions(store.root).record(new, parent=trunk.fingerprint, weights=True)
    return new


@pytest.mark.slow  # grows on MiniLM
def test_an_upgrade_refuses_a_sleeping_pathway_before_writing_anything(tmp_path, trunk, tenants):
    """A pathway adapts its own trunk's layers: no bridge or transport carries it to another trunk version."""
    lifecycle = grown_store(tmp_path / "store", trunk, tenants, ["weather", "music"])
    lifecycle.hibernate("music")
    new = recorded_new_version(lifecycle.store, trunk)
    before = digests(lifecycle.store.root)
    upgrading = Lifecycle(lifecycle.store, new, new.encode, fast_growth(kind="pathway", pathway=PATHWAY))
    for strategy in ("bridge", "transport"):
        with pytest.raises(ValueError, match=r"\['music'\] are pathway experts.*retrain them from their data"):
            upgrade_store(upgrading, trunk, [tenants["weather"]], strategy)
    assert digests(lifecycle.store.root) == before


@pytest.mark.slow
def test_a_pathway_rolled_back_to_before_an_upgrade_is_refused_by_name_and_the_others_still_load(
    tmp_path, trunk, tenants
):
    lifecycle = grown_store(tmp_path / "store", trunk, tenants, ["weather", "music"])
    new = recorded_new_version(lifecycle.store, trunk)
    upgrading = Lifecycle(lifecycle.store, new, new.encode, fast_growth(kind="pathway", pathway=PATHWAY))
    calibration = [f"note {i}: {TEXTS[i % len(TEXTS)]}" for i in range(800)]  # a bridge needs 2 x 384 texts
    report = upgrade_store(upgrading, trunk, [tenants["weather"], tenants["music"]], "bridge", calibration)
    assert report.tenants == {"music": "retrained", "weather": "retrained"}
    lifecycle.store.rollback("weather", 1)  # its version from the old trunk
    with pytest.raises(ValueError, match=r"weather.*pathway expert on trunk .*no bridge carries it"):
        load_mixture(lifecycle.store, trunk=new)
    model = load_mixture(lifecycle.store, trunk=new, skip_failed=True)
    assert model.tenants == ["music"] and list(model.left_out) == ["weather"]
    lifecycle.store.restore("weather", 2)
    assert load_mixture(lifecycle.store, trunk=new).tenants == ["music", "weather"]


FRESH_PROCESS = """
import json, sys
from moe.serving import Server
queries = [json.loads(line) for line in open(sys.argv[2])]
server = Server(sys.argv[1])
assert server.model.hidden_states(["a query"]) is not None  # token states: pathway experts
print(json.dumps([a.to_dict() for a in server.predict([q["text"] for q in queries])]))
"""
ANSWER = ("tenant", "intent", "score", "out_of_scope", "experts", "runners_up")


@pytest.mark.slow  # trains on MiniLM
@pytest.mark.subprocess
def test_a_bundle_of_a_pathway_store_serves_in_a_fresh_process_what_evaluation_predicted(tmp_path):
    """scripts/train.py with expert=pathway writes a pathway store; its evaluation's predictions are what the
    exported bundle serves in a fresh process, answer for answer."""
    from moe.tasks import evaluate, export, train

    data = ["data=tenant_files", tenant_files_override(write_synthetic_tenants(tmp_path / "data"))]
    pathway = ["expert=pathway", "expert.pathway.layers=1", "expert.pathway.epochs=1", "expert.pathway.lora_rank=2"]
    train.run(
        compose_config(
            "train", [*data, *pathway, "logger=none", "callbacks=none", "trainer.max_epochs=2"], tmp_path / "run"
        )
    )
    meta = ExpertStore(tmp_path / "run" / "experts").meta("bank")
    assert meta.architecture.pathway.spec.layers == 1 and meta.architecture.pathway.spec.rank == 2
    common = [*data, "oos.threshold=0.42", "oos.score=gate_max_prob", f"store_dir={tmp_path / 'run' / 'experts'}"]
    # features encoded in the batch the server encodes (not read from the cache): an encoder's features depend on
    # its batch's padding, by float rounding; the runners-up margin chosen on val, as the bundle's was
    evaluate.run(
        compose_config(
            "evaluate",
            [*common, "logger=none", "write_predictions=true", "splits=[val,test]", "cache_features=false"],
            tmp_path / "eval",
        )
    )
    export.run(compose_config("export", common, tmp_path / "bundle"))
    predictions = tmp_path / "eval" / "predictions_test.jsonl"
    expected = [json.loads(line) for line in predictions.read_text().splitlines()]
    done = run_python("-c", FRESH_PROCESS, str(tmp_path / "bundle"), str(predictions))
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [{k: e[k] for k in ANSWER} for e in expected]
    # in half precision: the bundle's own shards evaluated beside float32 (they load with the trunk they adapt)
    export.run(compose_config("export", [*common, "export.dtype=float16"], tmp_path / "bundle16"))
    manifest = json.loads((tmp_path / "bundle16" / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and "test/changed_predictions" in manifest["precision"]


@pytest.mark.slow
def test_the_pathway_scenario_runs_with_tiny_limits(tmp_path):
    """experiment=clinc150_pathway_incremental's machinery on the synthetic tenants, one adapted layer, one epoch:
    every tenant's tenant-given answers survive the others' growth and its own sleep exactly, and the joint baseline
    times the retraining of the pathways."""
    from moe.tasks import scenario

    events = (
        "events=[{op: grow, tenant: bank, intents: 1}, {op: grow, tenant: music}, {op: hibernate, tenant: music}, "
        "{op: grow, tenant: weather}, {op: update, tenant: bank}, {op: wake, tenant: music}]"
    )
    overrides = ["experiment=clinc150_pathway_incremental", events, *synthetic_data(tmp_path / "data")]
    overrides += ["compare_groups=null", "baselines.joint_tenants=[bank,music]", "baselines.joint_linear=false"]
    overrides += ["expert.pathway.layers=1", "expert.pathway.epochs=1", "growth.epochs=5"]
    cfg = compose_config("scenario", overrides, tmp_path / "run")
    assert cfg.expert.kind == "pathway" and not cfg.baselines.sequential
    metrics = scenario.run(cfg)
    assert metrics["final/tenants"] == 3
    assert metrics["final/forgetting_tenant_given"] == 0.0 and metrics["wake/identical"] == 1.0
    assert metrics["baseline/joint/tenants"] == 2 and metrics["grow_speedup_over_joint"] > 0
    assert ExpertStore(tmp_path / "run" / "experts").meta("bank").architecture.pathway.spec.layers == 1
