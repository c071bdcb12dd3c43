"""Registering experts from their headers alone (`load_mixture(verify="lazy")`): the same predictions as a full
registration, no weight read until an expert is chosen, and every check still made, at first page-in."""

from __future__ import annotations

import pytest
import torch

from moe.inference import GateSettings, load_mixture
from moe.model import TENSOR_NAMES, ExpertInfo, build_mixture
from moe.model.stats import class_statistics
from moe.store import ExpertStore, ShardError, expert_shards, read_meta, read_shard
from tests.helpers import flip_last_byte

FP = "f" * 64
DIM = 12
LABELS = [2, 3, 4, 3]
NAMES = [f"t{i}" for i in range(len(LABELS))]


@pytest.fixture
def store(tmp_path):
    torch.manual_seed(0)
    infos = [ExpertInfo(n, tuple(f"{n}-l{j}" for j in range(c))) for n, c in zip(NAMES, LABELS, strict=True)]
    model = build_mixture(infos, dim=DIM, rank=4)
    with torch.no_grad():
        for tensor in (model.bank.up, model.bank.head, model.router.weight):
            tensor.normal_()
    stats = {
        info.tenant: class_statistics(torch.randn(30, DIM), torch.arange(30) % len(info.labels), len(info.labels))
        for info in infos
    }
    store = ExpertStore(tmp_path / "experts")
    for tensors, meta in expert_shards(model.eval(), FP, stats):
        store.save(tensors, meta)
    return store


@pytest.mark.parametrize("source", ["trained", "statistics"])
def test_lazy_registration_predicts_exactly_as_full_registration(store, source):
    x = torch.randn(24, DIM, generator=torch.Generator().manual_seed(1))
    tenant = torch.arange(24) % (len(NAMES) + 1) - 1  # -1: routed
    full, lazy = (
        load_mixture(store, gate=GateSettings(source=source), trunk_fingerprint=FP, verify=v) for v in ("full", "lazy")
    )
    read = {
        key: sum(t.nbytes for n, t in read_shard(store.path(*key))[0].items() if n in TENSOR_NAMES) for key in full.keys
    }
    assert lazy.pager.sizes == read  # sized from the header, as the weights read in full would size it
    with torch.no_grad():
        a, b = full(x, tenant), lazy(x, tenant)
    for name in ("log_probs", "weights", "experts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_damaged_weight_is_found_at_first_page_in_naming_its_shard(store):
    path = store.path("t2", 1)
    tensors_sha = read_meta(path)[1]
    flip_last_byte(path)  # the layout keeps the header: a weight's byte (or a statistic's)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_mixture(store, trunk_fingerprint=FP)  # a full registration reads it and refuses it
    lazy = load_mixture(store, trunk_fingerprint=FP, verify="lazy")  # registration reads no weight
    assert read_meta(path)[1] == tensors_sha
    x = torch.randn(3, DIM)
    with torch.no_grad():
        lazy(x, torch.full((3,), lazy.tenant_index("t1")))  # other experts serve
        with pytest.raises(ShardError, match=r"t2/v0001.safetensors: checksum mismatch"):
            lazy(x, torch.full((3,), lazy.tenant_index("t2")))


def test_lazy_registration_still_refuses_another_trunk_and_a_misplaced_shard(store):
    with pytest.raises(ValueError, match="not on this model's trunk"):
        load_mixture(store, trunk_fingerprint="e" * 64, verify="lazy")
    misplaced = store.path("t3", 1)
    misplaced.write_bytes(store.path("t0", 1).read_bytes())
    model = load_mixture(store, trunk_fingerprint=FP, verify="lazy", skip_failed=True)
    assert list(model.left_out) == ["t3"] and "holds a shard of tenant 't0'" in str(model.left_out["t3"])


@pytest.mark.slow  # builds the session's tiny run
def test_a_lazily_verified_bundle_serves_the_same_answers_and_names_a_damaged_expert_when_chosen(tiny_run, tmp_path):
    import shutil

    from moe.inference import BundleError, read_bundle
    from moe.serving import Server

    texts = ["what is my balance", "play some jazz", "will it rain tomorrow", "wake me at seven"]
    full = Server(tiny_run.bundle)
    assert Server(tiny_run.bundle, verify="lazy").predict(texts) == full.predict(texts)
    copy = shutil.copytree(tiny_run.bundle, tmp_path / "bundle")
    damaged, other = full.tenants[0], full.tenants[1]
    flip_last_byte(next((copy / "experts" / damaged).glob("*.safetensors")))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        read_bundle(copy)
    degraded = Server(copy)  # a server starts without the damaged expert and names it (issue 30, case 6)
    assert damaged not in degraded.tenants and "sha256 mismatch" in degraded.damaged()[damaged]
    lazy = Server(copy, verify="lazy")  # opens: the experts' files are not read yet
    assert lazy.predict(texts, tenant=other) == full.predict(texts, tenant=other)
    with pytest.raises(ShardError, match=f"{damaged}/v0001.safetensors: checksum mismatch"):
        lazy.predict(texts, tenant=damaged)


def test_a_store_no_run_wrote_exports_and_serves(tmp_path):
    """A store written by a program (no run folder, no config.yaml) exports with the gate's defaults."""
    from hydra.utils import instantiate

    from moe.experiments.bench import write_store
    from moe.serving import Server
    from moe.tasks import export
    from tests.helpers import compose_config

    cfg = compose_config("export", ["trunk=tiny", "trunk.dim=384", "export.measure=false"], tmp_path / "bundle")
    trunk = instantiate(cfg.trunk)
    write_store(tmp_path / "made" / "experts", 3, rank=2, trunk_fingerprint=trunk.fingerprint, progress=False)
    cfg.store_dir = str(tmp_path / "made" / "experts")
    manifest = export.run(cfg)
    assert manifest["gate"]["top_k"] == 2 and len(manifest["experts"]) == 3
    answers = Server(tmp_path / "bundle", verify="lazy").predict(["hello there"], tenant="t00001")
    assert answers[0].tenant == "t00001"
