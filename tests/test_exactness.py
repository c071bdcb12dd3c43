"""The exactness rule: a tenant's tenant-given answers and scores are bit-identical whatever other experts exist or
grow, for the same queries in the same batches (README, "Exact claims"). Checked in the batches of a real
evaluation (`evaluate_mixture`), across the growth of other tenants, one of them wider than every expert before."""

import pytest
import torch

from moe.data import read_tenant_file
from moe.evaluation import evaluate_mixture, tenant_sources
from moe.inference import GateSettings, load_mixture
from moe.lifecycle import Lifecycle
from moe.store import ExpertStore
from moe.trunk import FeatureCache, TinyTrunk
from tests.helpers import fast_growth, write_synthetic_tenants, write_tenant_csv


def intents(prefix: str, count: int) -> dict[str, list[str]]:
    return {f"{prefix}_{i:02d}": [f"{prefix}{i}a", f"{prefix}{i}b", f"{prefix}{i}c"] for i in range(count)}


def given_answers(lifecycle: Lifecycle, tenants, source: str):
    model = load_mixture(
        lifecycle.store, gate=GateSettings(source=source), trunk_fingerprint=lifecycle.trunk.fingerprint
    )
    evaluation = evaluate_mixture(model, tenant_sources(tenants, ["val", "test"]), lifecycle.encode, batch_size=7)
    return {
        split: ([model.labels[i] for i in outcome.given.tolist()], outcome.given_score)
        for split, outcome in evaluation.outcomes.items()
    }


@pytest.mark.parametrize("source", ["statistics", "trained"])
def test_tenant_given_scores_are_bit_identical_across_growth_of_other_tenants(tmp_path, source):
    trunk = TinyTrunk(dim=16, freeze=True)
    lifecycle = Lifecycle(
        ExpertStore(tmp_path / "store"),
        trunk,
        FeatureCache(tmp_path / "cache", trunk).encode,
        fast_growth(source=source),
    )
    files = write_synthetic_tenants(tmp_path / "data")  # 2 intents each
    for name, count in (("home", 13), ("wide", 40)):  # home's row of 13 spans SIMD lanes; wide widens every row
        files[name] = write_tenant_csv(tmp_path / "data" / f"{name}.csv", intents(name, count), (10, 3, 3), seed=7)
    tenants = {name: read_tenant_file(name, path, split_column="split") for name, path in files.items()}
    for name in ("weather", "home"):
        lifecycle.grow(tenants[name])
    served = [tenants["weather"], tenants["home"]]
    before = given_answers(lifecycle, served, source)

    for name in ("wide", "bank"):
        lifecycle.grow(tenants[name])
    after = given_answers(lifecycle, served, source)

    for split in before:
        names_before, scores_before = before[split]
        names_after, scores_after = after[split]
        assert names_after == names_before, split
        assert torch.equal(scores_after, scores_before), (split, (scores_after - scores_before).abs().max().item())
