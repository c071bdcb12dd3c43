"""Per-expert feature statistics that travel in its shard: class means, counts and within-class scatter.

They let routing be rebuilt or extended without the data that produced them (a shared covariance is the
sum of every expert's scatter over the sum of their counts)."""

from __future__ import annotations

import torch
from einops import einsum

STATS_NAMES = ("stats.mean", "stats.count", "stats.scatter")


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
