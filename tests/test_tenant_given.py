"""A query whose tenant is given scores its own expert's gate rows only (`TopKRouter.given`): the same choice, weights
and answers as the full gate with only that expert allowed, and no other expert's rows read."""

from __future__ import annotations

import pytest
import torch

from moe.model import ExpertInfo, best_labels, build_mixture

DIM = 10
LABELS = [2, 4, 3, 5, 1]


@pytest.fixture
def model():
    torch.manual_seed(0)
    infos = [ExpertInfo(f"t{i}", tuple(f"t{i}-l{j}" for j in range(c))) for i, c in enumerate(LABELS)]
    model = build_mixture(infos, dim=DIM, rank=4)
    with torch.no_grad():
        for tensor in (model.bank.up, model.bank.head, model.router.weight, model.router.bias):
            tensor.normal_()
    return model.eval()


def full_gate(model, x, tenant):
    """The gate scoring every expert, only the given one allowed (the path every query took before)."""
    allowed = model.expert_tenant[None, :] == tenant[:, None]
    return model.router(x * model.input_scale, allowed)


@pytest.mark.parametrize("quadratic", [False, True])
def test_the_given_path_chooses_and_weighs_as_the_full_gate_with_one_expert_allowed(model, quadratic):
    if quadratic:
        factor = torch.randn(len(LABELS), DIM, DIM) * 0.1
        model.router.set_quadratic(factor, torch.randn(len(LABELS)))
    x = torch.randn(32, DIM)
    tenant = torch.arange(32) % len(LABELS)
    with torch.no_grad():
        ours, theirs = (
            model.router.given(x * model.input_scale, model.tenant_expert[tenant]),
            full_gate(model, x, tenant),
        )
    for name in ("probs", "experts", "weights"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    own = theirs.logits.gather(1, model.tenant_expert[tenant][:, None]).squeeze(1)
    torch.testing.assert_close(ours.logits.gather(1, model.tenant_expert[tenant][:, None]).squeeze(1), own)
    assert torch.isinf(ours.logits).sum() == 32 * (len(LABELS) - 1)  # every other expert: not scored


def test_a_batch_of_known_tenants_reads_no_other_experts_rows(model):
    x = torch.randn(8, DIM)
    tenant = torch.full((8,), 2)
    with torch.no_grad():
        before = model(x, tenant)
        model.router.weight[[0, 1, 3, 4]] = float("nan")  # any read of another expert's rows would spread NaN
        after = model(x, tenant)
        mixed = model(x, torch.tensor([2] * 7 + [-1]))  # one query routed: it alone scores the whole gate
    assert torch.isfinite(after.router.energy).all() and torch.equal(after.router.energy, before.router.energy)
    assert torch.equal(best_labels(after)[0], best_labels(before)[0])
    assert torch.equal(after.log_probs, before.log_probs) and torch.equal(after.weights, before.weights)
    # a known tenant's answer does not depend on what else is in its batch
    assert torch.equal(mixed.router.energy[:7], before.router.energy[:7]) and torch.isnan(mixed.router.energy[7])
    assert torch.equal(mixed.experts[:7], before.experts[:7]) and torch.equal(mixed.weights[:7], before.weights[:7])


def test_tenants_with_several_experts_keep_the_full_gate():
    infos = [ExpertInfo("a", ("x", "y")), ExpertInfo("a", ("z",)), ExpertInfo("b", ("w",))]
    model = build_mixture(infos, dim=DIM, rank=2)
    assert model.tenant_expert is None
    out = model(torch.randn(3, DIM), torch.tensor([0, 0, 1]))
    assert torch.equal(model.expert_tenant[out.experts[:, 0]], torch.tensor([0, 0, 1]))
