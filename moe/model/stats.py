"""Per-expert feature statistics that travel in its shard: class means, counts and within-class scatter.

They let routing be rebuilt or extended without the data that produced them (a shared covariance is the
sum of every expert's scatter over the sum of their counts)."""

from __future__ import annotations

import torch
from einops import einsum


@torch.no_grad()
def class_statistics(features: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, torch.Tensor]:
    """features (n, d), labels (n,) in [0, num_labels) -> mean (c, d), count (c,), scatter (d, d)."""
    features = features.double()
    count = torch.bincount(labels, minlength=num_labels).double()
    sums = torch.zeros(num_labels, features.shape[1], dtype=torch.float64).index_add_(0, labels, features)
    mean = sums / count.clamp(min=1)[:, None]
    centred = features - mean[labels]
    scatter = einsum(centred, centred, "n i, n j -> i j")
    return {"stats.mean": mean.float(), "stats.count": count.float(), "stats.scatter": scatter.float()}


def empty_statistics(dim: int, num_labels: int) -> dict[str, torch.Tensor]:
    """Statistics of an expert trained without recorded features (count 0: routing rebuilt from it is refused)."""
    return {
        "stats.mean": torch.zeros(num_labels, dim),
        "stats.count": torch.zeros(num_labels),
        "stats.scatter": torch.zeros(dim, dim),
    }


def pooled_precision(scatter: torch.Tensor, count: float, classes: int, shrinkage: float = 0.05) -> torch.Tensor:
    """Inverse of the shared within-class covariance (summed scatter over count - classes), shrunk towards
    its mean variance so that it stays well conditioned with few examples."""
    covariance = scatter.double() / max(count - classes, 1.0)
    target = torch.eye(covariance.shape[0], dtype=torch.float64) * covariance.diagonal().mean()
    return torch.linalg.inv((1 - shrinkage) * covariance + shrinkage * target)


def discriminant_rows(means: torch.Tensor, precision: torch.Tensor, input_scale: float = 1.0):
    """Gate rows of the statistics gate: the linear discriminant of each class under one shared covariance,
    `x . P mu - mu . P mu / 2`, expressed for a router that sees `x * input_scale`.

    means (..., c, d) -> weight (..., c, d), bias (..., c)."""
    projected = (means.double() @ precision).float()
    bias = -0.5 * (projected * means).sum(-1)
    return projected / input_scale, bias


def merge_statistics(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Statistics of the union of two data sets over the same classes (b may have more classes: new ones
    are appended), exactly as if computed on all the data at once."""
    c_a, c_b = a["stats.count"].numel(), b["stats.count"].numel()
    pad = c_b - c_a
    count_a = torch.cat([a["stats.count"], a["stats.count"].new_zeros(pad)]).double()
    mean_a = torch.cat([a["stats.mean"], a["stats.mean"].new_zeros(pad, a["stats.mean"].shape[1])]).double()
    count_b, mean_b = b["stats.count"].double(), b["stats.mean"].double()
    count = count_a + count_b
    mean = (count_a[:, None] * mean_a + count_b[:, None] * mean_b) / count.clamp(min=1)[:, None]
    weight = count_a * count_b / count.clamp(min=1)  # between-part correction of the within-class scatter
    delta = mean_a - mean_b
    scatter = (
        a["stats.scatter"].double()
        + b["stats.scatter"].double()
        + einsum(weight[:, None] * delta, delta, "c i, c j -> i j")
    )
    return {"stats.mean": mean.float(), "stats.count": count.float(), "stats.scatter": scatter.float()}
