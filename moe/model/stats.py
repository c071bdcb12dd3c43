"""Per-expert feature statistics that travel in its shard (class means, counts and within-class scatter), and
the statistics gate they make: each class's linear discriminant under one covariance pooled over every expert.

They let routing be rebuilt or extended without the data that produced them: the pooled covariance is the sum of
every expert's scatter over the sum of their counts, so it grows exactly with one more expert. Growth
(`moe.lifecycle`) and the mixture builder (`moe.inference`) both route through `PooledScatter` and
`discriminant_rows` here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from einops import einsum

from moe.model.router import TopKRouter

SHRINKAGE = 0.02  # of the pooled covariance towards its mean variance: the statistics gate's one default
OWN_COVARIANCE = 0.0  # share of each expert's own covariance in its discriminants: 0 is the linear gate
MEAN, COUNT, SCATTER = STATISTICS = ("stats.mean", "stats.count", "stats.scatter")  # as a shard names them


@torch.no_grad()
def class_statistics(
    features: torch.Tensor, labels: torch.Tensor, num_labels: int, chunk: int = 65536
) -> dict[str, torch.Tensor]:
    """features (n, d), labels (n,) in [0, num_labels) -> mean (c, d), count (c,), scatter (d, d), in float64
    `chunk` rows at a time (memory that does not grow with the rows; one chunk up to `chunk` rows)."""
    count = torch.bincount(labels, minlength=num_labels).double()
    sums = torch.zeros(num_labels, features.shape[1], dtype=torch.float64)
    for start in range(0, len(features), chunk):
        sums.index_add_(0, labels[start : start + chunk], features[start : start + chunk].double())
    mean = sums / count.clamp(min=1)[:, None]
    scatter = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
    for start in range(0, len(features), chunk):
        centred = features[start : start + chunk].double() - mean[labels[start : start + chunk]]
        scatter += einsum(centred, centred, "n i, n j -> i j")
    return {MEAN: mean.float(), COUNT: count.float(), SCATTER: scatter.float()}


def empty_statistics(dim: int, num_labels: int) -> dict[str, torch.Tensor]:
    """Statistics of an expert trained without recorded features (count 0: routing rebuilt from it is refused)."""
    return {MEAN: torch.zeros(num_labels, dim), COUNT: torch.zeros(num_labels), SCATTER: torch.zeros(dim, dim)}


def pooled_covariance(scatter: torch.Tensor, count: float, classes: int) -> torch.Tensor:
    """The shared within-class covariance, in float64: the summed scatter over count - classes (at least 1)."""
    return scatter.double() / max(count - classes, 1.0)


def shrunk(covariance: torch.Tensor, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """The covariance shrunk towards its mean variance, so that it stays well conditioned with few examples."""
    target = torch.eye(covariance.shape[0], dtype=torch.float64) * covariance.diagonal().mean()
    return (1 - shrinkage) * covariance + shrinkage * target


def pooled_precision(scatter: torch.Tensor, count: float, classes: int, shrinkage: float = SHRINKAGE) -> torch.Tensor:
    """Inverse of the shared within-class covariance (`pooled_covariance`), `shrunk`."""
    return torch.linalg.inv(shrunk(pooled_covariance(scatter, count, classes), shrinkage))


def discriminant_rows(means: torch.Tensor, precision: torch.Tensor, input_scale: float = 1.0):
    """Gate rows of the statistics gate: the linear discriminant of each class under one shared covariance,
    `x . P mu - mu . P mu / 2`, expressed for a router that sees `x * input_scale`.

    means (..., c, d) -> weight (..., c, d), bias (..., c)."""
    projected = (means.double() @ precision).float()
    bias = -0.5 * (projected * means).sum(-1)
    return projected / input_scale, bias


@torch.no_grad()
def tenant_discriminants(
    stats: dict[str, torch.Tensor], pooled: torch.Tensor, own: float, shrinkage: float, input_scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian discriminants of one expert's classes under its own covariance mixed into the pooled one
    (regularised discriminant analysis, Friedman 1989, with the expert as the unit that owns a covariance):
    `cov = shrunk((1 - own) * pooled + own * expert's within-class covariance)`, and for a class mean mu

        logit(x) = x . P mu - mu . P mu / 2  -  |x F|^2 / 2 - log det(cov) / 2,   P = F F^T = cov^-1

    The first two terms are linear rows (`discriminant_rows`); the last two are the expert's quadratic term, the
    same for all its rows, which the linear gate (own = 0, one covariance for all) drops as a common constant.
    Returns rows weight (c, d), bias (c,), factor (d, d) and offset (scalar), for a router that sees
    `x * input_scale`."""
    count, classes = stats[COUNT].sum().item(), stats[COUNT].numel()
    covariance = shrunk((1 - own) * pooled + own * pooled_covariance(stats[SCATTER], count, classes), shrinkage)
    precision = torch.linalg.inv(covariance)
    weight, bias = discriminant_rows(stats[MEAN], precision, input_scale)
    factor = torch.linalg.cholesky(precision) / input_scale
    return weight, bias, factor.float(), -0.5 * torch.linalg.slogdet(covariance).logabsdet.float()


@dataclass
class PooledScatter:
    """Within-class scatter summed over experts, with their example and class counts."""

    scatter: torch.Tensor  # (d, d) float64
    count: float = 0.0
    classes: int = 0

    @classmethod
    def of(cls, experts: Iterable[dict[str, torch.Tensor]], dim: int | None = None) -> PooledScatter:
        """Pooled over the statistics of `experts` (in order); `dim` is needed when there may be none."""
        experts = list(experts)
        dim = dim if dim is not None else experts[0][SCATTER].shape[0]
        pooled = cls(torch.zeros(dim, dim, dtype=torch.float64))
        for stats in experts:
            pooled.add(stats)
        return pooled

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        self.scatter += stats[SCATTER].double()
        self.count += stats[COUNT].sum().item()
        self.classes += stats[COUNT].numel()

    def __add__(self, other: PooledScatter) -> PooledScatter:
        return PooledScatter(self.scatter + other.scatter, self.count + other.count, self.classes + other.classes)

    def covariance(self) -> torch.Tensor:
        return pooled_covariance(self.scatter, self.count, self.classes)

    def precision(self, shrinkage: float = SHRINKAGE) -> torch.Tensor:
        return pooled_precision(self.scatter, self.count, self.classes, shrinkage)


@torch.no_grad()
def fill_statistics_rows(
    router: TopKRouter, means: torch.Tensor, precision: torch.Tensor, input_scale: float, tenants: list[str]
) -> None:
    """Set the router's rows to the discriminants of class means (e, m, d), a chunk of experts at a time. Rows that
    overflow the gate's dtype are refused, naming their tenants: the pooled covariance is shared, so this is a
    property of the whole set of experts in that dtype, not of one shard."""
    for start in range(0, means.shape[0], router.CHUNK):
        weight, bias = discriminant_rows(means[start : start + router.CHUNK], precision, input_scale)
        weight = weight.to(router.weight.dtype)
        if not (finite := torch.isfinite(weight).flatten(1).all(dim=1)).all():
            names = [tenants[start + i] for i in (~finite).nonzero().flatten().tolist()]
            raise ValueError(f"statistics-gate rows of {names} overflow {router.weight.dtype}: use float32 shards")
        router.weight[start : start + router.CHUNK] = weight
        router.bias[start : start + router.CHUNK] = bias


@torch.no_grad()
def fill_tenant_rows(
    router: TopKRouter,
    experts: list[dict[str, torch.Tensor]],
    pooled: torch.Tensor,
    own: float,
    shrinkage: float,
    input_scale: float,
    tenants: list[str],
) -> None:
    """Set the router's rows and quadratic term to each expert's `tenant_discriminants` (statistics in router order)."""
    factors, offsets = [], []
    for i, stats in enumerate(experts):
        try:
            weight, bias, factor, offset = tenant_discriminants(stats, pooled, own, shrinkage, input_scale)
        except torch.linalg.LinAlgError as error:
            raise ValueError(f"statistics-gate rows of {tenants[i]}: its covariance is singular ({error})") from None
        weight = weight.to(router.weight.dtype)
        if not (torch.isfinite(weight).all() and torch.isfinite(factor).all()):
            raise ValueError(f"statistics-gate rows of {tenants[i]} overflow {router.weight.dtype}: use float32 shards")
        router.weight[i, : len(bias)] = weight
        router.bias[i, : len(bias)] = bias
        factors.append(factor)
        offsets.append(offset)
    router.set_quadratic(torch.stack(factors), torch.stack(offsets))


def merge_statistics(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Statistics of the union of two data sets over the same classes (b may have more classes: new ones
    are appended), exactly as if computed on all the data at once."""
    c_a, c_b = a[COUNT].numel(), b[COUNT].numel()
    pad = c_b - c_a
    count_a = torch.cat([a[COUNT], a[COUNT].new_zeros(pad)]).double()
    mean_a = torch.cat([a[MEAN], a[MEAN].new_zeros(pad, a[MEAN].shape[1])]).double()
    count_b, mean_b = b[COUNT].double(), b[MEAN].double()
    count = count_a + count_b
    mean = (count_a[:, None] * mean_a + count_b[:, None] * mean_b) / count.clamp(min=1)[:, None]
    weight = count_a * count_b / count.clamp(min=1)  # between-part correction of the within-class scatter
    delta = mean_a - mean_b
    scatter = a[SCATTER].double() + b[SCATTER].double() + einsum(weight[:, None] * delta, delta, "c i, c j -> i j")
    return {MEAN: mean.float(), COUNT: count.float(), SCATTER: scatter.float()}
