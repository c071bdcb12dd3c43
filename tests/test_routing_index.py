"""The index over the gate's rows (`moe.inference.index`): it finds the router's exact top-k experts, scores them
exactly, never returns a padding row, and refuses inputs and routers it cannot serve."""

from __future__ import annotations

import pytest
import torch

from moe.inference.index import IndexSettings, RowIndex
from moe.model import TopKRouter
from moe.model.stats import discriminant_rows

DIM = 32


def clustered_router(experts: int = 200, seed: int = 0) -> tuple[TopKRouter, torch.Tensor]:
    """A statistics-style gate over clustered class means (2 to 12 labels an expert, so with padding rows), and
    the means (e, m, d) its queries are drawn near."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, 13, (experts,), generator=g).tolist()
    domains = torch.randn(experts // 10, 1, DIM, generator=g)
    means = domains[torch.randint(len(domains), (experts,), generator=g)] + 0.5 * torch.randn(
        experts, 12, DIM, generator=g
    )
    weight, bias = discriminant_rows(means, torch.eye(DIM, dtype=torch.float64))
    router = TopKRouter(DIM, labels, top_k=2, random_init=False)
    with torch.no_grad():
        router.weight.copy_(weight)
        router.bias.copy_(bias)
    return router, means


def queries(router: TopKRouter, means: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    expert = torch.randint(router.num_experts, (n,), generator=g)
    label = (torch.rand(n, generator=g) * router.row_mask[expert].sum(1)).long()  # a label the expert has
    return means[expert, label] + 0.3 * torch.randn(n, DIM, generator=g)


def exact(router: TopKRouter, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return router(x).logits.topk(k, dim=-1)


# faiss, the library chosen (and installed by the test extra); hnswlib and usearch are measured by
# scripts/bench_routing_index.py, which needs them installed
@pytest.mark.parametrize("library", ["faiss"])
def test_finds_the_exact_top_k_with_exact_scores(library):
    router, means = clustered_router()
    x = queries(router, means, 300)
    index = RowIndex.build(router, IndexSettings(library=library, M=16, ef_construction=100, ef=128, rows=32))
    logits, experts = index.top_k(x)
    exact_logits, exact_experts = exact(router, x, 2)
    hits = (experts[:, :, None] == exact_experts[:, None, :]).any(dim=1).float().mean().item()
    assert hits >= 0.99
    with torch.no_grad():
        scored = router(x).logits.gather(1, experts)
    torch.testing.assert_close(logits, scored, rtol=1e-5, atol=1e-4)  # the chosen experts' logits, as the router's
    assert (logits[:, 0] >= logits[:, 1]).all()
    assert index.num_rows == int(router.row_mask.sum()) < router.row_mask.numel()


def test_every_row_found_gives_exactly_the_router_top_k():
    """With every row found, dropping candidates by their bound must never drop one of the exact top k."""
    router, means = clustered_router(experts=30, seed=3)
    x = queries(router, means, 100, seed=4)
    index = RowIndex.build(router, IndexSettings(ef=400, rows=400))
    for k in (1, 2, 5):
        logits, experts = index.top_k(x, k)
        exact_logits, exact_experts = exact(router, x, k)
        assert torch.equal(experts, exact_experts)
        torch.testing.assert_close(logits, exact_logits, rtol=1e-5, atol=1e-4)


def test_padding_rows_are_never_returned():
    router, means = clustered_router(experts=50)
    x = queries(router, means, 64)
    with torch.no_grad():  # padding rows that would win every search if they were indexed
        router.weight.masked_fill_(~router.row_mask[..., None], 0.0)
        router.weight.add_((~router.row_mask[..., None]) * x.mean(0) * 100)
        router.bias.masked_fill_(~router.row_mask, 1e4)
    index = RowIndex.build(router, IndexSettings(ef=64, rows=32))
    found = index.nearest_rows(x)
    assert (found >= 0).all()
    assert router.row_mask.flatten()[found].all()
    logits, experts = index.top_k(x)
    assert torch.isfinite(logits).all()
    assert torch.equal(experts, exact(router, x, 2)[1])


def test_too_few_candidates_fall_back_to_the_exact_scan():
    router, means = clustered_router(experts=40)
    x = queries(router, means, 20)
    logits, experts = RowIndex.build(router, IndexSettings(ef=8, rows=1)).top_k(x, k=3)
    assert torch.equal(experts, exact(router, x, 3)[1])


def test_refuses_a_mismatched_dimension_and_an_empty_router():
    router, _ = clustered_router(experts=20)
    index = RowIndex.build(router)
    with pytest.raises(ValueError, match=f"inputs must be \\(batch, {DIM}\\).*got \\(4, {DIM + 1}\\)"):
        index.top_k(torch.randn(4, DIM + 1))
    with pytest.raises(ValueError, match="no rows to index"):
        RowIndex.build(TopKRouter(DIM, [0, 0, 0]))
    with pytest.raises(ValueError, match="library must be one of"):
        RowIndex.build(router, IndexSettings(library="annoy"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rows must be between 1 and ef"):
        RowIndex.build(router, IndexSettings(ef=8, rows=16))


def test_refuses_a_gate_with_a_quadratic_term():
    router, _ = clustered_router(experts=20)
    index = RowIndex.build(router)
    router.set_quadratic(torch.eye(DIM).expand(20, DIM, DIM), torch.zeros(20))
    for serve in (lambda: RowIndex.build(router), lambda: index.top_k(torch.randn(4, DIM))):
        with pytest.raises(ValueError, match="linear gate only"):
            serve()


# -- routing a served mixture through the index ------------------------------------------------------------------


def test_the_index_routes_like_the_full_gate_and_answers_alike(tmp_path):
    """`load_mixture(index=...)`: batches without a tenant go through the index, with the full gate's choices,
    weights and answers; batches that name tenants never touch it."""
    from moe.experiments.bench import SYNTHETIC_FINGERPRINT, write_store
    from moe.inference import load_mixture
    from moe.model import best_labels

    store = write_store(tmp_path / "experts", 40, rank=2, init_std={"router.weight": 0.05}, progress=False)
    exact_model = load_mixture(store, trunk_fingerprint=SYNTHETIC_FINGERPRINT)
    indexed = load_mixture(store, trunk_fingerprint=SYNTHETIC_FINGERPRINT, index=IndexSettings(ef=256, rows=64))
    assert exact_model.index is None and indexed.index is not None
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 384, generator=g)
    x = x / x.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        ours, theirs = indexed(x), exact_model(x)
        assert torch.equal(ours.experts, theirs.experts)
        torch.testing.assert_close(ours.weights, theirs.weights)
        assert torch.equal(best_labels(ours)[0], best_labels(theirs)[0])
        given = torch.arange(64) % 40
        a, b = indexed(x, given), exact_model(x, given)
        mixed = indexed(x, torch.where(torch.arange(64) % 2 == 0, given, -1))  # half known, half routed
    assert torch.equal(a.log_probs, b.log_probs) and torch.equal(a.router.energy, b.router.energy)
    assert torch.equal(mixed.experts[::2], a.experts[::2]) and torch.equal(mixed.experts[1::2], ours.experts[1::2])
    assert torch.equal(mixed.router.energy[1::2], ours.router.energy[1::2])
