"""Calibration: does a prediction's score match how often such predictions are right?"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchmetrics.functional.classification import binary_calibration_error


class Reliability(NamedTuple):
    """Equal-width bins over [0, 1]; bin i holds confidences in (edges[i], edges[i+1]] (the first also holds 0)."""

    edges: torch.Tensor  # (bins + 1,)
    count: torch.Tensor  # (bins,) predictions in each bin
    confidence: torch.Tensor  # (bins,) their mean confidence (0 where empty)
    accuracy: torch.Tensor  # (bins,) the fraction right (0 where empty)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> Reliability:
    """The per-bin figures the reliability plot draws (torchmetrics keeps its bins to itself)."""
    confidence = confidence.double().clamp(0, 1)
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    hits = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct.double())
    return Reliability(
        torch.linspace(0, 1, bins + 1, dtype=torch.float64),
        count,
        sums / count.clamp(min=1),
        hits / count.clamp(min=1),
    )


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE in percent: sum over bins of (bin share) x |accuracy - mean confidence| (Guo et al., 2017), torchmetrics'.

    Its bins are [a, b), with confidence 1 alone in an extra one; ours, `Reliability`'s, are (a, b]. Measured on
    1 - confidence against being wrong, |accuracy - mean confidence| is unchanged and the bins mirror into ours, 1
    included; only a confidence of exactly 0 (which no prediction's score is) gets a bin of its own there."""
    if confidence.numel() == 0:
        return float("nan")
    wrong = (~correct.bool()).long()
    return 100.0 * binary_calibration_error(1 - confidence.double().clamp(0, 1), wrong, n_bins=bins).item()
