"""Expert evidence for routing: computed from a tenant's own data, kept in its shard, untouched by others' growth,
kept through hibernate and wake; weight 0 (or no evidence) gives today's answers bit for bit."""

from dataclasses import replace

import pytest
import torch

from moe.data import read_tenant_file
from moe.inference import GateSettings, load_mixture, predict
from moe.lifecycle import Lifecycle
from moe.model.evidence import EV_CALIBRATION, EVIDENCE_TENSORS, expert_evidence, fit_evidence, reweigh
from moe.model.experts import expert_features, head_logits
from moe.model.kinds import Architecture
from moe.store import ExpertStore
from moe.trunk import FeatureCache, TinyTrunk, fingerprint_module
from tests.helpers import digests, fast_growth, write_synthetic_tenants

KINDS = ["mahalanobis", "energy"]


@pytest.fixture
def tenants(tmp_path):
    files = write_synthetic_tenants(tmp_path / "data")
    return {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}


def grown(tmp_path, tenants, kind: str, names=("weather", "music", "bank")) -> Lifecycle:
    trunk = TinyTrunk(dim=16, freeze=True)
    encode = FeatureCache(tmp_path / "cache", trunk).encode
    lifecycle = Lifecycle(ExpertStore(tmp_path / f"store-{kind}"), trunk, encode, fast_growth(evidence=kind))
    for name in names:
        lifecycle.grow(tenants[name])
    return lifecycle


def evidence_of(store: ExpertStore, tenant: str) -> dict[str, torch.Tensor]:
    tensors, _ = store.load(tenant)
    return {name: tensors[name] for name in EVIDENCE_TENSORS if name in tensors}


def routed_texts(tenants) -> list[str]:
    return [e.text for tenant in tenants.values() for e in tenant.split("test")]


def without_evidence(store: ExpertStore, root) -> ExpertStore:
    """`store` as it would be without evidence: each shard's tensors but its evidence, its metadata saying none."""
    plain = ExpertStore(root)
    for tenant in store.tenants():
        tensors, meta = store.load(tenant)
        kept = {name: t for name, t in tensors.items() if name not in EVIDENCE_TENSORS}
        plain.save(kept, replace(meta, architecture=replace(meta.architecture, evidence="none")), new_tenant=True)
    return plain


def test_fit_evidence_is_typical_on_its_tenant_and_low_elsewhere():
    torch.manual_seed(0)
    d, c, n = 8, 3, 300
    centres = torch.randn(c, d) * 3
    labels = torch.arange(c).repeat(n // c)
    own, held = centres[labels] + torch.randn(n, d), centres[labels] + torch.randn(n, d)
    other = torch.randn(n, d) * 3 + 10.0
    expert = {"down.weight": torch.randn(d, 4) * 0.1, "down.bias": torch.zeros(4), "up.weight": torch.randn(4, d) * 0.1}
    expert |= {"head.weight": centres.T.contiguous(), "head.bias": torch.zeros(c)}
    for kind in KINDS:
        tensors = expert | fit_evidence(kind, expert, own, labels, held, input_scale=1.0)
        assert tuple(tensors[EV_CALIBRATION].shape) == (2,)
        z = expert_features(held, tensors)
        score = expert_evidence(z, head_logits(z, tensors), tensors)
        assert abs(score.mean().item()) < 1e-4 and abs(score.std().item() - 1) < 1e-3  # calibrated on it
    tensors = expert | fit_evidence("mahalanobis", expert, own, labels, held, input_scale=1.0)
    z = expert_features(other, tensors)
    assert expert_evidence(z, head_logits(z, tensors), tensors).max() < -3  # far from every class of its tenant


def test_reweigh_follows_the_evidence_and_leaves_unconsulted_candidates_out():
    weights = torch.tensor([[0.6, 0.4], [1.0, 0.0]])
    evidence = torch.tensor([[-5.0, 1.0], [-9.0, 3.0]])
    out = reweigh(weights, evidence, 1.0)
    assert out[0, 1] > out[0, 0] and torch.equal(out[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(reweigh(weights, evidence, 0.0), weights)


def test_architecture_records_evidence_and_old_metadata_reads_as_none():
    arch = Architecture(16, 8, evidence="mahalanobis")
    assert arch.to_dict()["evidence"] == "mahalanobis" and Architecture.from_dict(arch.to_dict()) == arch
    assert "evidence" not in Architecture(16, 8).to_dict()  # shards without evidence: metadata as before
    assert Architecture.from_dict(Architecture(16, 8).to_dict()).evidence == "none"
    assert set(EVIDENCE_TENSORS) <= set(arch.shapes(3)) and set(EVIDENCE_TENSORS) <= set(arch.weight_names())
    with pytest.raises(TypeError, match="evidence must be one of"):
        Architecture(16, 8, evidence="vibes")


@pytest.mark.parametrize("kind", KINDS)
def test_grow_leaves_other_shards_trunk_and_their_evidence_unchanged(tmp_path, tenants, kind):
    lifecycle = grown(tmp_path, tenants, kind, names=("weather", "music"))
    store, trunk = lifecycle.store, lifecycle.trunk
    before, trunk_before = digests(store.root), fingerprint_module(trunk, trunk.config())
    evidence_before = {name: evidence_of(store, name) for name in ("weather", "music")}
    lifecycle.grow(tenants["bank"])
    after = digests(store.root)
    own = {k for k in after if k.parts[0] == "bank" or k.parts == (".locks", "bank.lock")}
    assert {k: v for k, v in after.items() if k not in own} == before
    assert fingerprint_module(trunk, trunk.config()) == trunk_before
    for name, tensors in evidence_before.items():
        now = evidence_of(store, name)
        assert now.keys() == tensors.keys() and all(torch.equal(now[k], tensors[k]) for k in tensors)
    assert EV_CALIBRATION in evidence_of(store, "bank") and store.meta("bank").architecture.evidence == kind


@pytest.mark.parametrize("kind", KINDS)
def test_weight_zero_gives_todays_answers_exactly(tmp_path, tenants, kind):
    lifecycle = grown(tmp_path, tenants, kind)
    plain = without_evidence(lifecycle.store, tmp_path / "plain")
    features = lifecycle.encode(routed_texts(tenants))
    gate = GateSettings(source="statistics")
    today = load_mixture(plain, trunk_fingerprint=lifecycle.trunk.fingerprint, gate=gate)
    model = load_mixture(lifecycle.store, trunk_fingerprint=lifecycle.trunk.fingerprint, gate=gate)
    expected = today(features)
    today.evidence_weight = 3.0  # no evidence in its shards: still today's routing
    for mixture, weight in ((model, 0.0), (today, 3.0)):
        mixture.evidence_weight = weight
        got = mixture(features)
        for name in ("log_probs", "weights", "experts", "label_ids"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert predict(model, features) == predict(today, features)  # the answers too, scores and all
    # with the evidence weighed, the tenant-given answers stay bit for bit
    tenant = torch.tensor([model.tenant_index(t) for t in tenants for _ in tenants[t].split("test")])
    given = today(features, tenant)
    model.evidence_weight = 3.0
    weighed_given, weighed = model(features, tenant), model(features)
    for name in ("log_probs", "weights", "experts"):
        assert torch.equal(getattr(weighed_given, name), getattr(given, name)), name
    assert not torch.equal(weighed.weights, expected.weights)  # the evidence does change routed weights


def test_evidence_survives_hibernate_and_wake(tmp_path, tenants):
    lifecycle = grown(tmp_path, tenants, "mahalanobis")
    features = lifecycle.encode(routed_texts(tenants))

    def routed():
        model = load_mixture(lifecycle.store, trunk_fingerprint=lifecycle.trunk.fingerprint)
        model.evidence_weight = 2.0
        return model(features)

    before, evidence = routed(), evidence_of(lifecycle.store, "weather")
    lifecycle.hibernate("weather")
    lifecycle.wake("weather")
    after = routed()
    assert all(torch.equal(evidence_of(lifecycle.store, "weather")[k], v) for k, v in evidence.items())
    for name in ("log_probs", "weights", "experts"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name


@pytest.mark.parametrize("kind", KINDS)
def test_training_run_writes_each_experts_evidence_from_its_own_data(tmp_path, kind):
    from moe.tasks import train
    from tests.helpers import TINY_TRAIN, compose_config, synthetic_data

    cfg = compose_config(
        "train", [*synthetic_data(tmp_path / "data"), *TINY_TRAIN, f"evidence={kind}"], tmp_path / "run"
    )
    train.run(cfg)
    store = ExpertStore(cfg.paths.experts_dir)
    for tenant in store.tenants():
        tensors, meta = store.load(tenant)
        assert meta.architecture.evidence == kind
        assert set(EVIDENCE_TENSORS) & set(tensors) == set(
            meta.architecture.expert_kind.evidence_shapes(meta.architecture, 2)
        )
        assert tensors[EV_CALIBRATION][1] > 0  # a scale, from the tenant's own val queries
    model = load_mixture(store)
    model.evidence_weight = 1.0
    features = train.build_data(cfg, train.instantiate(cfg.trunk))
    features.setup()
    out = model(features.datasets["test"].features)
    assert torch.isfinite(out.weights).all() and torch.allclose(out.weights.sum(-1), torch.ones(len(out.weights)))


@pytest.mark.slow  # MiniLM
def test_evidence_inputs_computed_once_give_with_evidence_s_tensors_for_every_kind_and_shrinkage(tmp_path, tenants):
    """Pathway experts: each tenant's own features (`evidence_inputs`: its own texts through its own pathway),
    computed once and handed to `with_evidence` for several kinds and shrinkages, give the evidence `with_evidence`
    computes alone, bit for bit."""
    from moe.data import TenantDataModule
    from moe.model.pathway import Pathways
    from moe.tasks.train import evidence_inputs, with_evidence
    from moe.trunk import HFEncoderTrunk

    trunk, names = HFEncoderTrunk(), ["weather", "music"]
    store = ExpertStore(tmp_path / "store")
    growth = fast_growth(kind="pathway", pathway=dict(layers=1, lora_rank=2, lr=3e-3, epochs=1, batch_size=16))
    lifecycle = Lifecycle(store, trunk, trunk.encode, growth)
    for name in names:
        lifecycle.grow(tenants[name])
    shards = [store.load(name) for name in names]
    data = TenantDataModule([tenants[name] for name in names], trunk.encode)
    data.setup()
    inputs, train = evidence_inputs(shards, data, trunk), data.datasets["train"]
    for t, ((tensors, meta), own) in enumerate(zip(shards, inputs, strict=True)):
        arch = meta.architecture
        rows = (train.tenant == t).nonzero().flatten().tolist()
        lora = {name: tensors[name] for name in arch.pathway.lora_shapes(arch.dim)}
        expected = Pathways(trunk, arch.pathway.spec).features([train.texts[i] for i in rows], lora)
        assert torch.equal(own.labels, train.label[rows]) and own.held_out is not None
        torch.testing.assert_close(own.features, expected, atol=1e-5, rtol=1e-5)  # batched by length: rounding
    fitted = {}
    for kind, shrinkage in (("mahalanobis", 0.1), ("mahalanobis", 0.6), ("energy", 0.1)):
        alone = with_evidence(shards, data, trunk, kind, shrinkage)
        given = with_evidence(shards, data, trunk, kind, shrinkage, inputs)
        for (a, a_meta), (b, b_meta) in zip(alone, given, strict=True):
            assert a_meta == b_meta and a_meta.architecture.evidence == kind and a.keys() == b.keys()
            assert all(torch.equal(a[name], b[name]) for name in a)
        fitted[kind, shrinkage] = given[0][0]
    assert not torch.equal(fitted["mahalanobis", 0.1][EV_CALIBRATION], fitted["mahalanobis", 0.6][EV_CALIBRATION])
