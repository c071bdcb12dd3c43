"""Which intents of different experts are confusable, known from their stored statistics alone (before any query).

The statistics gate (`moe.model.stats`) models every class as a Gaussian around its stored mean under one covariance
pooled over every expert. Two such classes at Mahalanobis distance Δ (Δ² = (μa - μb)ᵀ P (μa - μb), P the gate's
pooled precision) are confused by the better of the two, each way, with probability Φ(-Δ/2) (equal priors): 0.5 for
one mean twice, 2.3 % at Δ = 4, 0.13 % at Δ = 6.

Δ is measured between *sample* means, and in a trunk's many dimensions their sampling noise alone puts two samples of
one intent far apart: E[Δ²] = Δ_true² + `noise`², noise² = d_eff (1/na + 1/nb), d_eff = tr(P S) with S the pooled
covariance (about 366 of MiniLM's 384 dimensions over CLINC150, where two disjoint halves of one intent's 100 examples
sit at Δ ≈ 3.8, Φ(-Δ/2) ≈ 3 %). `adjusted` is the confusion with that noise taken out, Φ(-√max(Δ² - noise², 0) / 2)
(Δ² - noise² estimates Δ_true² without bias): near 0.5 for two samples of one intent whatever their sizes, where
the raw Φ(-Δ/2) of two samples of 10 and 50 is under 1 %.
Nothing here reads a shard: callers hand in each expert's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import einsum

from moe.model.stats import COUNT, MEAN, SHRINKAGE, PooledScatter


class ExpertStatistics(NamedTuple):
    """One expert's statistics: `stats` holds `stats.mean` (c, d) and `stats.count` (c,) over `labels`, and
    `stats.scatter` (d, d) where the pooled scatter is made from them. Classes of count 0 (no recorded features) are
    never compared."""

    tenant: str
    labels: tuple[str, ...]
    stats: dict[str, torch.Tensor]


class OverlapPair(NamedTuple):
    tenant_a: str
    intent_a: str
    tenant_b: str
    intent_b: str
    distance: float  # Mahalanobis Δ between the two class means under the pooled precision
    confusion: float  # Φ(-Δ/2): the pairwise confusion of two Gaussians with that covariance, Δ apart
    noise: float  # the Δ that sampling alone puts between two samples of one class of these sizes
    adjusted: float  # Φ(-√max(Δ² - noise², 0) / 2): the confusion with the sampling noise taken out


@dataclass(frozen=True)
class Overlap:
    """Pairs of intents, by Δ ascending: `pairs` of different tenants, `within` of one tenant (empty unless asked).
    Over `tenants`, (t, t) float64: `min_distance` off the diagonal the smallest Δ between an intent of one and an
    intent of the other, on it the smallest between two intents of that tenant (inf: none); `max_adjusted` the same
    for the largest adjusted confusion (0: none)."""

    tenants: tuple[str, ...]
    pairs: list[OverlapPair]
    within: list[OverlapPair]
    min_distance: torch.Tensor
    max_adjusted: torch.Tensor
    intents: int  # intents compared (count > 0)
    compared: int  # cross-tenant pairs compared
    effective_dimension: float  # d_eff = tr(P S)


def pair_confusion(distance: torch.Tensor | float) -> torch.Tensor:
    """Φ(-Δ/2): how often the better of two equal-covariance Gaussian classes at Mahalanobis distance Δ is wrong."""
    return torch.special.ndtr(-torch.as_tensor(distance, dtype=torch.float64) / 2)


def squared_noise(d_eff: float, inverse_a: torch.Tensor, inverse_b: torch.Tensor) -> torch.Tensor:
    """noise² = d_eff (1/na + 1/nb), the E[Δ²] that sampling alone puts between two sample means of one class, for
    every pair of a class of `a` and one of `b`: inverse counts (m,), (n,) -> (m, n)."""
    return d_eff * (inverse_a[:, None] + inverse_b[None, :])


def squared_excess(squared: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """max(Δ² - noise², 0) from Δ² and noise²: Δ_true² estimated without bias (clamped at 0)."""
    return (squared - noise).clamp(min=0)


def adjusted_confusion(excess: torch.Tensor) -> torch.Tensor:
    """Φ(-√excess / 2), `excess` = max(Δ² - noise², 0) (`squared_excess`): the pairwise confusion with the sampling
    noise of the two means taken out."""
    return pair_confusion(excess.sqrt())


def _excess_limit(min_adjusted: float) -> float:
    """The largest excess whose adjusted confusion is at least `min_adjusted` (`adjusted_confusion` inverted, so that
    no Φ is taken over every pair); -1 above 0.5, which nothing reaches (two means at once are 0.5)."""
    if min_adjusted > 0.5:
        return -1.0
    return float(-2 * torch.special.ndtri(torch.tensor(min_adjusted, dtype=torch.float64))) ** 2


def pooled_scatter(experts: Sequence[ExpertStatistics]) -> PooledScatter:
    """The within-class scatter pooled over `experts`, as the statistics gate pools it."""
    return PooledScatter.of([e.stats for e in experts])


def effective_dimension(pooled: PooledScatter, precision: torch.Tensor) -> float:
    """d_eff = tr(P S), S the pooled covariance: E[Δ²] between two sample means of one class is d_eff (1/na + 1/nb)."""
    return float(einsum(precision.double(), pooled.covariance(), "i j, j i ->"))


def squared_norms(x: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """x_iᵀ P x_i of every row, in float64: x (n, d) -> (n,)."""
    x = x.double()
    return einsum(x @ precision.double(), x, "n d, n d -> n")


def squared_mahalanobis(
    a: torch.Tensor, b: torch.Tensor, precision: torch.Tensor, own_b: torch.Tensor | None = None
) -> torch.Tensor:
    """(a_i - b_j)ᵀ P (a_i - b_j) for every row pair, in float64: a (m, d), b (n, d) -> (m, n). `own_b` (n,) is
    `squared_norms(b, precision)` when already known (b compared against one chunk of a at a time)."""
    # m: rows of a, n: rows of b, d: features
    a, b, precision = a.double(), b.double(), precision.double()
    projected_a = a @ precision
    own_a = einsum(projected_a, a, "m d, m d -> m")
    own_b = squared_norms(b, precision) if own_b is None else own_b
    cross = einsum(projected_a, b, "m d, n d -> m n")
    return (own_a[:, None] + own_b[None, :] - 2 * cross).clamp(min=0)


class _Intents(NamedTuple):
    means: torch.Tensor  # (n, d) float64, classes of count > 0
    inverse_count: torch.Tensor  # (n,) float64
    tenant: torch.Tensor  # (n,) index into the tenants
    names: list[tuple[str, str]]  # (tenant, intent) of each row


def _intents(experts: Sequence[ExpertStatistics]) -> _Intents:
    means, counts, tenant, names = [], [], [], []
    for t, expert in enumerate(experts):
        count = expert.stats[COUNT]
        if len(expert.labels) != count.numel():
            raise ValueError(f"tenant {expert.tenant!r}: {len(expert.labels)} labels but statistics of another size")
        kept = (count > 0).nonzero().flatten()
        means.append(expert.stats[MEAN][kept].double())
        counts.append(count[kept].double())
        tenant += [t] * len(kept)
        names += [(expert.tenant, expert.labels[i]) for i in kept.tolist()]
    return _Intents(torch.cat(means), 1 / torch.cat(counts), torch.tensor(tenant, dtype=torch.long), names)


def _pair(a: tuple[str, str], b: tuple[str, str], distance: float, noise: float, adjusted: float) -> OverlapPair:
    return OverlapPair(*a, *b, distance, float(pair_confusion(distance)), noise, adjusted)


def _select(excess: torch.Tensor, squared: torch.Tensor, mask: torch.Tensor, limit: float, top: int | None):
    """Entries of `mask` to keep from a block: excess <= limit (adjusted confusion at least the floor), or among the
    block's `top` closest."""
    keep = mask & (excess <= limit)
    if top and mask.any():
        closest = squared.masked_fill(~mask, torch.inf).flatten().topk(min(top, int(mask.sum())), largest=False)
        keep.view(-1)[closest.indices] = True
    return keep


def _pairs(found: list[torch.Tensor], names: list[tuple[str, str]], limit: float, top: int | None):
    """Rows (i, j, Δ², noise², excess) gathered over blocks -> the kept pairs by Δ ascending (ties by position)."""
    rows = torch.cat(found) if found else torch.zeros(0, 5, dtype=torch.float64)
    rows = rows[torch.sort(rows[:, 2], stable=True).indices]
    keep = rows[:, 4] <= limit
    keep[: top or 0] = True
    rows = rows[keep]
    distance, noise, adjusted = rows[:, 2].sqrt(), rows[:, 3].sqrt(), adjusted_confusion(rows[:, 4])
    return [
        _pair(names[int(i)], names[int(j)], *values)
        for i, j, *values in torch.stack([rows[:, 0], rows[:, 1], distance, noise, adjusted], dim=1).tolist()
    ]


@torch.no_grad()
def intent_overlap(
    experts: Sequence[ExpertStatistics],
    shrinkage: float = SHRINKAGE,
    pooled: PooledScatter | None = None,
    min_confusion: float = 0.01,
    top: int | None = 20,
    within: bool = False,
    chunk: int = 1024,
) -> Overlap:
    """Every pair of intents of different experts under the statistics gate's precision: `pooled` (None: pooled over
    `experts`' scatter) with `shrinkage`. Pairs kept: adjusted confusion >= `min_confusion`, and at least the `top`
    closest (None: no such minimum); `within`: also pairs of one tenant's intents, kept by the same rule. Worked
    `chunk` intents against all at a time: memory O(chunk x intents), never all pairs at once."""
    # n: intents (of every expert), r: a chunk of them, t: tenants, d: features
    tenants = tuple(e.tenant for e in experts)
    if len(set(tenants)) != len(tenants):
        raise ValueError(f"tenants named twice: {sorted(t for t in set(tenants) if tenants.count(t) > 1)}")
    if not experts:
        raise ValueError("no experts to compare")
    pooled = pooled_scatter(experts) if pooled is None else pooled
    precision = pooled.precision(shrinkage)
    d_eff = effective_dimension(pooled, precision)
    intents = _intents(experts)
    n, t = len(intents.names), len(tenants)
    own = squared_norms(intents.means, precision)  # (n,)
    limit = _excess_limit(min_confusion)  # adjusted >= min_confusion  <=>  excess <= limit
    min_squared, min_excess = (torch.full((t, t), torch.inf, dtype=torch.float64) for _ in range(2))
    cross_rows: list[torch.Tensor] = []
    within_rows: list[torch.Tensor] = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        squared = squared_mahalanobis(intents.means[rows], intents.means, precision, own)  # (r, n): Δ²
        noise = squared_noise(d_eff, intents.inverse_count[rows], intents.inverse_count)  # (r, n): noise²
        excess = squared_excess(squared, noise)  # (r, n)
        upper = rows[:, None] < torch.arange(n)[None, :]  # each unordered pair once
        same = intents.tenant[rows, None] == intents.tenant[None, :]
        # the smallest of each (row's tenant, column's tenant) over this block's pairs: per row, then per row's tenant
        columns, row_tenant = intents.tenant.expand(len(rows), n), intents.tenant[rows, None].expand(-1, t)
        for matrix, values in ((min_squared, squared), (min_excess, excess)):
            values = values.masked_fill(~upper, torch.inf)
            per_row = values.new_full((len(rows), t), torch.inf).scatter_reduce_(1, columns, values, "amin")
            matrix.scatter_reduce_(0, row_tenant, per_row, "amin")
        for mask, found in [(upper & ~same, cross_rows)] + ([(upper & same, within_rows)] if within else []):
            i, j = _select(excess, squared, mask, limit, top).nonzero(as_tuple=True)
            found.append(torch.stack((rows[i].double(), j.double(), squared[i, j], noise[i, j], excess[i, j]), dim=1))
    compared = (n * n - int((torch.bincount(intents.tenant, minlength=t) ** 2).sum())) // 2
    return Overlap(
        tenants,
        _pairs(cross_rows, intents.names, limit, top),
        _pairs(within_rows, intents.names, limit, top),
        torch.minimum(min_squared, min_squared.T).sqrt(),
        adjusted_confusion(torch.minimum(min_excess, min_excess.T)),
        n,
        compared,
        d_eff,
    )


@torch.no_grad()
def closest_intents(
    new: ExpertStatistics,
    existing: Sequence[ExpertStatistics],
    pooled: PooledScatter,
    shrinkage: float = SHRINKAGE,
    k: int = 1,
    min_adjusted: float | None = None,
) -> list[OverlapPair]:
    """For each intent of `new`, its `k` closest intents of `existing` (other tenants) under the precision of `pooled`
    (which should include `new`, as growth's routing does), as pairs (new first) by Δ ascending. With `min_adjusted`,
    instead every intent of `existing` whose adjusted confusion with it is at least `min_adjusted` (`k` unused), by
    adjusted confusion descending (ties by Δ ascending): the closest by Δ need not be the most confusable, as the
    adjusted confusion depends on the class counts. The new tenant's intents against the existing ones only, no
    existing pair computed."""
    # c: the new tenant's intents, n: the existing intents
    existing = [e for e in existing if (e.stats[COUNT] > 0).any()]
    if not existing or not (new.stats[COUNT] > 0).any():
        return []
    precision = pooled.precision(shrinkage)
    d_eff = effective_dimension(pooled, precision)
    ours, theirs = _intents([new]), _intents(existing)
    squared = squared_mahalanobis(ours.means, theirs.means, precision)  # (c, n): Δ²
    noise = squared_noise(d_eff, ours.inverse_count, theirs.inverse_count)  # (c, n): noise²
    adjusted = adjusted_confusion(squared_excess(squared, noise))  # (c, n)
    if min_adjusted is None:
        closest = squared.topk(min(k, squared.shape[1]), dim=1, largest=False).indices  # (c, k)
        found = [(i, j) for i in range(len(ours.names)) for j in closest[i].tolist()]
        found.sort(key=lambda ij: (squared[ij].item(), *ij))
    else:
        found = [(i, j) for i, j in (adjusted >= min_adjusted).nonzero().tolist()]
        found.sort(key=lambda ij: (-adjusted[ij].item(), squared[ij].item(), *ij))
    distance, noise = squared.sqrt(), noise.sqrt()
    return [
        _pair(ours.names[i], theirs.names[j], distance[i, j].item(), noise[i, j].item(), adjusted[i, j].item())
        for i, j in found
    ]
