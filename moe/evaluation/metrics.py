"""Classification metrics over predicted and true ids (percentages, as the training run reports them)."""

from __future__ import annotations

import torch


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Percent of `predicted == target`; NaN for no examples."""
    if target.numel() == 0:
        return float("nan")
    return 100.0 * (predicted == target).sum().item() / target.numel()


def per_class_f1(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """F1 of every class (n_classes,), and whether the class occurs at all (as a target or a prediction)."""
    hits = torch.bincount(target[predicted == target], minlength=num_classes).double()
    support = torch.bincount(target, minlength=num_classes).double() + torch.bincount(predicted, minlength=num_classes)
    f1 = torch.where(support > 0, 2 * hits / support.clamp(min=1), torch.zeros_like(hits))
    return f1, support > 0


def macro_f1(
    predicted: torch.Tensor, target: torch.Tensor, num_classes: int, classes: torch.Tensor | None = None
) -> float:
    """Percent; the mean F1 over the classes that occur (as sklearn's `average="macro"`), or over `classes`."""
    f1, present = per_class_f1(predicted, target, num_classes)
    chosen = present if classes is None else torch.zeros_like(present).index_fill_(0, classes, True) & present
    return 100.0 * f1[chosen].mean().item() if chosen.any() else float("nan")


def confusion_matrix(true: torch.Tensor, predicted: torch.Tensor, n: int) -> torch.Tensor:
    """(n, n) counts: row = true class, column = predicted class."""
    return torch.bincount(true * n + predicted, minlength=n * n).reshape(n, n)
