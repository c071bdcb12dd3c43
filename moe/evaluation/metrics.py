"""Classification metrics over predicted and true ids (percentages, as the training run reports them).

F1 and the confusion matrix are torchmetrics'; its argument checks refuse a single class, which a one-tenant mixture
routes to, so they run only from two classes up.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_f1_score


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Percent of `predicted == target`; NaN for no examples."""
    if target.numel() == 0:
        return float("nan")
    return 100.0 * (predicted == target).sum().item() / target.numel()


def per_class_f1(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F1 of every class (n_classes,), 0 where it never occurs, and whether it occurs (as a target or a prediction)."""
    present = (torch.bincount(target, minlength=num_classes) + torch.bincount(predicted, minlength=num_classes)) > 0
    if target.numel() == 0:
        return torch.zeros(num_classes, dtype=torch.float64), present
    f1 = multiclass_f1_score(predicted, target, num_classes, average="none", validate_args=num_classes > 1)
    return f1.double(), present


def macro_f1(
    predicted: torch.Tensor, target: torch.Tensor, num_classes: int, classes: torch.Tensor | None = None
) -> float:
    """Percent; the mean F1 over the classes that occur as a target or a prediction (torchmetrics' and sklearn's
    `average="macro"`), or over those of `classes` that occur; NaN when none does."""
    if target.numel() == 0:
        return float("nan")
    if classes is None:
        f1 = multiclass_f1_score(predicted, target, num_classes, average="macro", validate_args=num_classes > 1)
        return 100.0 * f1.item()
    f1, present = per_class_f1(predicted, target, num_classes)
    chosen = torch.zeros_like(present).index_fill_(0, classes, True) & present
    return 100.0 * f1[chosen].mean().item() if chosen.any() else float("nan")


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts: row = true class, column = predicted class."""
    return multiclass_confusion_matrix(predicted, true, n, validate_args=n > 1)
