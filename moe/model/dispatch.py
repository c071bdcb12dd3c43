"""Sparse dispatch of inputs to their chosen experts, in separate small steps (after megablocks):

    plan_dispatch   no-grad routing metadata: group the (input, choice) assignments by expert
    dispatch        gather inputs into per-expert groups, padded to the largest group: (g, capacity, d)
    combine         scatter the groups' outputs back to (b, k, ...) in the order the router chose

Only experts that received an input get a group, so the caller can page in exactly `plan.experts`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange


class DispatchPlan(NamedTuple):
    experts: torch.Tensor  # (g,) expert id of each group, ascending
    group: torch.Tensor  # (a,) group of each assignment
    slot: torch.Tensor  # (a,) position of each assignment inside its group
    token: torch.Tensor  # (a,) input row of each assignment
    choice: torch.Tensor  # (a,) flat (b k) index of each assignment
    capacity: int  # largest group
    batch: int
    top_k: int


@torch.no_grad()
def plan_dispatch(experts: torch.Tensor, weights: torch.Tensor) -> DispatchPlan:
    """Assignments with weight 0 (an input allowed fewer than k experts) are dropped."""
    b, k = experts.shape
    flat_experts = rearrange(experts, "b k -> (b k)")
    choice = torch.nonzero(rearrange(weights, "b k -> (b k)") > 0).squeeze(1)
    order = torch.argsort(flat_experts[choice], stable=True)
    choice = choice[order]
    used, group, counts = torch.unique_consecutive(flat_experts[choice], return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(choice.numel(), device=choice.device) - starts[group]
    capacity = int(counts.max()) if counts.numel() else 0
    return DispatchPlan(used, group, slot, choice // k, choice, capacity, b, k)


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(b, d) inputs -> (g, capacity, d) groups, zero-padded."""
    groups = x.new_zeros(plan.experts.numel(), plan.capacity, x.shape[-1])
    groups[plan.group, plan.slot] = x[plan.token]
    return groups


def combine(outputs: torch.Tensor, plan: DispatchPlan, fill: float = 0.0) -> torch.Tensor:
    """(g, capacity, c) group outputs -> (b, k, c) per chosen expert; dropped choices hold `fill`."""
    flat = outputs.new_full((plan.batch * plan.top_k, outputs.shape[-1]), fill)
    flat[plan.choice] = outputs[plan.group, plan.slot]
    return rearrange(flat, "(b k) c -> b k c", k=plan.top_k)
