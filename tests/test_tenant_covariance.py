"""The statistics gate with each expert's own covariance (`GateSettings.own_covariance`, regularised discriminant
analysis at the level of experts): its row logits are Gaussian log-densities, it reduces to the linear gate, it routes
experts whose covariances differ better than one pooled covariance can, and it travels through a bundle."""

from __future__ import annotations

import math

import pytest
import torch

from moe.inference import GateSettings, load_mixture, open_bundle
from moe.model import ExpertInfo, build_mixture
from moe.model.stats import SHRINKAGE, PooledScatter, class_statistics, shrunk
from moe.store import ExpertStore, expert_shards
from tests.helpers import compose_config, synthetic_data

FP = "d" * 64
DIM, CLASSES, EXPERTS = 8, 3, 4


def gaussian_world(seed: int = 0, per_class: int = 200):
    """Experts whose classes are Gaussians with the expert's own covariance (each stretched along other axes):
    means (e, c, d), covariance factors (e, d, d)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(EXPERTS, CLASSES, DIM, generator=generator) * 1.5
    factors = torch.stack([torch.diag(torch.rand(DIM, generator=generator) * 3 + 0.2) for _ in range(EXPERTS)])
    return means, factors


def sample(means, factors, per_class: int, seed: int):
    """Features (n, d), their expert (n,) and class within it (n,)."""
    generator = torch.Generator().manual_seed(seed)
    xs, experts, labels = [], [], []
    for e in range(EXPERTS):
        for c in range(CLASSES):
            xs.append(means[e, c] + torch.randn(per_class, DIM, generator=generator) @ factors[e].T)
            experts.append(torch.full((per_class,), e))
            labels.append(torch.full((per_class,), c))
    return torch.cat(xs), torch.cat(experts), torch.cat(labels)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of EXPERTS experts whose statistics come from `gaussian_world` samples."""
    means, factors = gaussian_world()
    x, experts, labels = sample(means, factors, 200, seed=1)
    infos = [ExpertInfo(f"t{e}", tuple(f"t{e}-l{c}" for c in range(CLASSES))) for e in range(EXPERTS)]
    torch.manual_seed(0)
    model = build_mixture(infos, dim=DIM, rank=4)
    stats = {f"t{e}": class_statistics(x[experts == e], labels[experts == e], CLASSES) for e in range(EXPERTS)}
    store = ExpertStore(tmp_path_factory.mktemp("own") / "experts")
    for tensors, meta in expert_shards(model.eval(), FP, stats):
        store.save(tensors, meta)
    return store, stats, (means, factors)


def gate(own: float) -> GateSettings:
    return GateSettings(source="statistics", own_covariance=own)


@pytest.mark.parametrize("own", [0.3, 1.0])
def test_row_logits_are_each_class_gaussian_log_density_under_its_experts_covariance(store, own):
    store, stats, _ = store
    model = load_mixture(store, trunk_fingerprint=FP, gate=gate(own))
    pooled = PooledScatter.of(stats[f"t{e}"] for e in range(EXPERTS)).covariance()
    x = torch.randn(16, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        rows = model.router(x * model.input_scale, keep_rows=True).row_logits  # (b, e, c)
    for e in range(EXPERTS):
        s = stats[f"t{e}"]
        count = s["stats.count"].sum().item()
        own_covariance = s["stats.scatter"].double() / (count - CLASSES)
        covariance = shrunk((1 - own) * pooled + own * own_covariance, SHRINKAGE)
        gaussian = torch.distributions.MultivariateNormal(s["stats.mean"].double(), covariance_matrix=covariance)
        density = gaussian.log_prob(x.double()[:, None, :]) + 0.5 * DIM * math.log(2 * math.pi)  # (b, c)
        torch.testing.assert_close(rows[:, e].double(), density, rtol=1e-4, atol=1e-3)


def test_a_vanishing_own_share_routes_as_the_linear_gate(store):
    store, _, (means, factors) = store
    x, _, _ = sample(means, factors, 20, seed=3)
    linear, tiny = (load_mixture(store, trunk_fingerprint=FP, gate=gate(own)) for own in (0.0, 1e-9))
    assert linear.router.factor is None and tiny.router.factor is not None
    with torch.no_grad():
        a, b = linear.router(x * linear.input_scale), tiny.router(x * tiny.input_scale)
    assert torch.equal(a.experts, b.experts)
    torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-5)


def test_own_covariances_route_experts_of_different_shapes_better_than_one_pooled(store):
    store, _, (means, factors) = store
    x, experts, _ = sample(means, factors, 300, seed=4)  # fresh queries
    routing = {}
    for own in (0.0, 1.0):
        model = load_mixture(store, trunk_fingerprint=FP, gate=gate(own))
        with torch.no_grad():
            chosen = model.router(x * model.input_scale).experts[:, 0]
        routing[own] = (chosen == experts).float().mean().item()
    assert routing[1.0] > routing[0.0] + 0.02, routing


def test_the_quadratic_term_follows_its_experts_into_a_subset(store):
    store, _, (means, factors) = store
    model = load_mixture(store, trunk_fingerprint=FP, gate=gate(0.5))
    x, _, _ = sample(means, factors, 5, seed=5)
    kept = [3, 1]
    with torch.no_grad():
        full = model.router(x * model.input_scale).logits
        part = model.router.subset(kept)(x * model.input_scale).logits
    torch.testing.assert_close(part, full[:, kept], rtol=1e-6, atol=1e-5)  # another einsum shape: last bits


@pytest.mark.parametrize(
    "settings, problem",
    [
        (dict(source="statistics", own_covariance=1.5), "must lie in"),
        (dict(source="trained", own_covariance=0.2), "needs source='statistics'"),
    ],
)
def test_settings_without_meaning_are_refused(settings, problem):
    with pytest.raises(ValueError, match=problem):
        GateSettings(**settings)


def test_a_bundle_keeps_its_own_covariance_and_serves_what_the_store_routes(tiny_run, tmp_path):
    from moe.tasks import export

    data = synthetic_data(tmp_path / "data")
    routing = ["routing=statistics", "routing.own_covariance=0.25"]
    export.run(
        compose_config("export", [*data, f"store_dir={tiny_run.run / 'experts'}", *routing], tmp_path / "bundle")
    )
    served = open_bundle(tmp_path / "bundle")
    assert served.bundle.manifest["gate"]["own_covariance"] == 0.25
    direct = load_mixture(
        tiny_run.run / "experts",
        gate=GateSettings(source="statistics", own_covariance=0.25),
        trunk_fingerprint=served.trunk.fingerprint,
    )
    x = served.trunk.encode(["what is my balance", "play a song", "is it going to rain", "set an alarm"])
    with torch.no_grad():
        a, b = served.model.router(x * served.model.input_scale), direct.router(x * direct.input_scale)
    assert served.model.router.factor is not None
    assert torch.equal(a.logits, b.logits) and torch.equal(a.experts, b.experts)
