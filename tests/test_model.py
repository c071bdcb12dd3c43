"""The mixture against plain references: a per-sample loop for dispatch/combine, a plain classifier for one expert."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from moe.inference import predict
from moe.model import (
    UNKNOWN_TENANT,
    ExpertBank,
    ExpertInfo,
    TopKRouter,
    best_labels,
    build_mixture,
    combine,
    dispatch,
    mixture_nll,
    plan_dispatch,
    union_scores,
)


def loop_reference(bank: ExpertBank, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each sample, each choice, one expert at a time: (b, k, c) log-probabilities, -inf where not chosen."""
    out = torch.full((x.shape[0], experts.shape[1], bank.head.shape[-1]), float("-inf"))
    for i in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if weights[i, j] > 0:
                e = int(experts[i, j])
                out[i, j] = bank(x[i].view(1, 1, -1), torch.tensor([e]))[0, 0].log_softmax(-1)
    return out


def random_bank(num_labels, dim=12, rank=4, seed=0):
    torch.manual_seed(seed)
    bank = ExpertBank(dim, num_labels, rank)
    with torch.no_grad():
        bank.up.normal_()  # a non-identity adapter, so that the adapter path is exercised
    return bank


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_combine_equals_loop(k):
    bank = random_bank([3, 5, 2, 4, 5])
    torch.manual_seed(1)
    x = torch.randn(37, 12)
    weights, experts = torch.rand(37, 5).softmax(-1).topk(k, dim=-1)
    weights[::4, -1] = 0.0  # some inputs are allowed fewer than k experts
    plan = plan_dispatch(experts, weights)
    routed = combine(bank(dispatch(x, plan), plan.experts).log_softmax(-1), plan, fill=float("-inf"))
    reference = loop_reference(bank, x, experts, weights)
    assert torch.allclose(routed, reference, atol=1e-5, equal_nan=False)


def test_plan_groups_only_used_experts():
    experts = torch.tensor([[3, 1], [3, 0], [1, 3]])
    plan = plan_dispatch(experts, torch.ones(3, 2))
    assert plan.experts.tolist() == [0, 1, 3]
    assert plan.capacity == 3
    # each (group, slot) is used once
    assert len(set(zip(plan.group.tolist(), plan.slot.tolist(), strict=True))) == 6


def test_one_expert_mixture_equals_plain_classifier():
    torch.manual_seed(0)
    model = build_mixture([ExpertInfo("only", ("a", "b", "c"))], dim=12, rank=0, input_scale=2.0)
    with torch.no_grad():
        model.bank.head.normal_()
        model.bank.head_bias.normal_()
    plain = torch.nn.Linear(12, 3)
    with torch.no_grad():
        plain.weight.copy_(model.bank.head[0].T)
        plain.bias.copy_(model.bank.head_bias[0])
    x = torch.randn(9, 12)
    output = model(x)
    expected = F.softmax(plain(x * 2.0), dim=-1)
    assert torch.allclose(output.scores[:, 0], expected, atol=1e-6)
    assert [p.intent for p in predict(model, x)] == [("a", "b", "c")[i] for i in expected.argmax(-1).tolist()]


def test_tenant_id_restricts_routing():
    infos = [ExpertInfo("t0", ("x", "y")), ExpertInfo("t1", ("x", "z")), ExpertInfo("t2", ("w",))]
    model = build_mixture(infos, dim=8, top_k=2)
    x = torch.randn(20, 8)
    tenant = torch.tensor([0, 1, 2, UNKNOWN_TENANT] * 5)
    output = model(x, tenant)
    chosen = model.expert_tenant[output.experts]
    for row in range(20):
        used = chosen[row][output.weights[row] > 0]
        if tenant[row] != UNKNOWN_TENANT:
            assert (used == tenant[row]).all()
            assert len(used) == 1  # each tenant owns one expert here
        else:
            assert len(used) == 2
    predictions = predict(model, x, tenant)
    assert all(p.tenant == f"t{int(t)}" for p, t in zip(predictions, tenant, strict=True) if t >= 0)


def test_union_merges_shared_labels():
    label_ids = torch.tensor([[[0, 1], [1, 2]]])  # two chosen experts both name label 1
    scores = torch.tensor([[[0.1, 0.3], [0.4, 0.2]]])
    merged = union_scores(scores, label_ids)
    assert torch.allclose(merged, torch.tensor([[0.1, 0.7, 0.7, 0.2]]))


def test_scores_are_a_distribution_and_nll_matches():
    model = build_mixture([ExpertInfo(f"t{i}", ("a", "b", "c")) for i in range(4)], dim=8, top_k=2)
    x = torch.randn(16, 8)
    output = model(x)
    assert torch.allclose(output.scores.sum(dim=(1, 2)), torch.ones(16), atol=1e-5)
    target, _ = best_labels(output)
    chosen = union_scores(output.scores, output.label_ids).max(-1).values
    assert torch.allclose(mixture_nll(output, target), -chosen.log().mean(), atol=1e-5)


def test_router_losses_are_named_and_differentiable():
    router = TopKRouter(8, [3, 3, 3, 3], top_k=2)
    output = router(torch.randn(32, 8))
    assert output.load_balance_loss.ndim == 0 and output.z_loss.ndim == 0
    (output.load_balance_loss + output.z_loss).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # balanced routing scores 1, everything on one expert scores e = 4
    router = TopKRouter(4, [1, 1, 1, 1], top_k=1)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4)[:, None, :] * 50)
        router.bias.zero_()
    balanced = torch.eye(4).repeat(8, 1)
    assert torch.isclose(router(balanced).load_balance_loss, torch.tensor(1.0), atol=1e-4)
    collapsed = torch.eye(4)[:1].repeat(32, 1)
    assert torch.isclose(router(collapsed).load_balance_loss, torch.tensor(4.0), atol=1e-4)


def test_rows_of_other_experts_stay_put_when_an_expert_is_added(tmp_path):
    """Gate rows travel in each expert's shard: a mixture built after a third expert arrives scores the first two
    with exactly the rows it had before."""
    from moe.inference import load_mixture
    from moe.store import ExpertStore, expert_shards

    store = ExpertStore(tmp_path / "experts")
    two = build_mixture([ExpertInfo("a", ("x", "y")), ExpertInfo("b", ("x", "y", "z"))], dim=8)
    for tensors, meta in expert_shards(two, "f" * 64):
        store.save(tensors, meta)
    before = load_mixture(store).router
    third = build_mixture([ExpertInfo("c", ("p", "q", "r", "s"))], dim=8)
    store.save(*next(expert_shards(third, "f" * 64)))
    after = load_mixture(store).router
    assert torch.equal(after.weight[:2, :3], before.weight[:, :3]) and torch.equal(after.bias[:2, :3], before.bias)
    assert torch.equal(after.weight[0, :2], two.router.weight[0, :2])
    assert rearrange(after.row_mask, "e m -> (e m)").sum() == 9


def test_the_router_scores_experts_chunk_by_chunk_as_if_all_at_once(monkeypatch):
    router = TopKRouter(16, [3, 1, 2, 3, 3, 2, 1], top_k=2)
    x, allowed = torch.randn(10, 16), torch.rand(10, 7) > 0.3
    whole = router(x, allowed, keep_rows=True)
    monkeypatch.setattr(TopKRouter, "CHUNK", 2)  # four chunks, the last one short
    chunked = router(x, allowed)
    assert chunked.row_logits is None
    rows = rearrange(whole.row_logits, "b e m -> b (e m)")
    assert torch.allclose(chunked.energy, torch.logsumexp(rows, dim=-1), atol=1e-6)
    assert torch.allclose(chunked.max_row, rows.max(dim=-1).values, atol=1e-6)
    assert torch.allclose(chunked.probs, whole.probs, atol=1e-6)
    assert torch.equal(chunked.experts, whole.experts)
