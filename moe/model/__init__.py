"""The sparse mixture of experts: router (gate), expert formula and bank, dispatch/combine, the mixture, and the
feature statistics behind the statistics gate."""

from moe.model.dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from moe.model.experts import TENSOR_NAMES, ExpertBank, expert_logits
from moe.model.mixture import (
    UNKNOWN_TENANT,
    ExpertInfo,
    Mixture,
    MixtureOfExperts,
    MixtureOutput,
    best_labels,
    build_mixture,
    mixture_nll,
    union_scores,
)
from moe.model.router import GateRows, RouterOutput, RowSource, TopKRouter, check_choice

__all__ = [
    "TENSOR_NAMES",
    "UNKNOWN_TENANT",
    "DispatchPlan",
    "ExpertBank",
    "ExpertInfo",
    "GateRows",
    "Mixture",
    "MixtureOfExperts",
    "MixtureOutput",
    "RouterOutput",
    "RowSource",
    "TopKRouter",
    "best_labels",
    "build_mixture",
    "check_choice",
    "combine",
    "dispatch",
    "expert_logits",
    "mixture_nll",
    "plan_dispatch",
    "union_scores",
]
