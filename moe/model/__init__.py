"""The sparse mixture of experts: router (gate), expert bank, dispatch/combine, and their assembly."""

from moe.model.dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from moe.model.experts import ExpertBank
from moe.model.mixture import (
    UNKNOWN_TENANT,
    ExpertInfo,
    Mixture,
    MixtureOfExperts,
    MixtureOutput,
    Prediction,
    best_labels,
    mixture_nll,
    union_scores,
)
from moe.model.router import RouterOutput, TopKRouter

__all__ = [
    "UNKNOWN_TENANT",
    "DispatchPlan",
    "ExpertBank",
    "ExpertInfo",
    "Mixture",
    "MixtureOfExperts",
    "MixtureOutput",
    "Prediction",
    "RouterOutput",
    "TopKRouter",
    "best_labels",
    "build_mixture",
    "combine",
    "dispatch",
    "mixture_nll",
    "plan_dispatch",
    "union_scores",
]


def build_mixture(
    experts: list[ExpertInfo],
    dim: int,
    gate_rows: str = "labels",
    top_k: int = 2,
    normalize_weights: bool = True,
    rank: int = 64,
    dropout: float = 0.0,
    input_scale: float = 8.0,
) -> MixtureOfExperts:
    """A fresh mixture. `gate_rows`: "labels" gives each expert one gate row per label (prototype gate),
    "one" a single row (Switch-style linear gate)."""
    rows = [len(info.labels) if gate_rows == "labels" else 1 for info in experts]
    router = TopKRouter(dim, rows, top_k=top_k, normalize_weights=normalize_weights)
    bank = ExpertBank(dim, [len(info.labels) for info in experts], rank=rank, dropout=dropout)
    return MixtureOfExperts(router, bank, experts, input_scale=input_scale, gate_rows=gate_rows)
