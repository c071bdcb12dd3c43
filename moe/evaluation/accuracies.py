"""Per-tenant accuracy, in one place: a group of in-scope queries' routed, tenant-given and routing accuracy with
their count (`Accuracies`), pooled over groups by their queries (`Accuracies.micro`), as flat metrics
(`accuracy_metrics`). The evaluation's per-tenant rows, the joint linear reference, the continual scenario and the
trunk upgrade all report these."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from moe.evaluation.collect import Outcome
from moe.evaluation.metrics import accuracy


@dataclass(frozen=True)
class Accuracies:
    """Accuracies in percent (NaN without queries) over `queries` in-scope queries."""

    acc_routed: float
    acc_tenant_given: float
    routing_acc: float
    queries: int

    @staticmethod
    def of(outcome: Outcome, mask: torch.Tensor | None = None) -> Accuracies:
        """Of the queries of `outcome` that `mask` selects (default: all)."""
        m = slice(None) if mask is None else mask
        label, tenant = outcome.label[m], outcome.tenant[m]
        return Accuracies(
            accuracy(outcome.routed[m], label),
            accuracy(outcome.given[m], label),
            accuracy(outcome.routed_tenant[m], tenant),
            len(tenant),
        )

    @staticmethod
    def micro(parts: Iterable[Accuracies]) -> Accuracies:
        """Pooled over every query of `parts` (each weighted by its queries)."""
        parts = [p for p in parts if p.queries]
        n = sum(p.queries for p in parts)
        if not n:
            return Accuracies(float("nan"), float("nan"), float("nan"), 0)
        pool = lambda key: sum(getattr(p, key) * p.queries for p in parts) / n  # noqa: E731
        return Accuracies(pool("acc_routed"), pool("acc_tenant_given"), pool("routing_acc"), n)

    def row(self) -> dict[str, float | int]:
        """As a table row: the queries, then the three accuracies."""
        return {"queries": self.queries, **accuracy_metrics(self, "")}


def accuracy_metrics(accuracies: Accuracies, prefix: str, suffix: str = "") -> dict[str, float]:
    """`{prefix}/acc_routed{suffix}`, ... (no prefix: the bare names)."""
    head = f"{prefix}/" if prefix else ""
    return {
        f"{head}acc_routed{suffix}": accuracies.acc_routed,
        f"{head}acc_tenant_given{suffix}": accuracies.acc_tenant_given,
        f"{head}routing_acc{suffix}": accuracies.routing_acc,
    }
