"""The gate: a learned softmax top-k router over registered experts.

Each expert owns `m` prototype rows of the gate (one per label for the `prototype` kind, one in all for the
Switch-style `linear` kind); an expert's logit is the logsumexp of its rows. The rows of one expert are its
routing entry: adding an expert appends rows and never touches the others'.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import reduce
from torch import nn


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (b, e) expert logits, -inf where not allowed
    row_logits: torch.Tensor  # (b, e, m) prototype-row logits, -inf on padding rows
    probs: torch.Tensor  # (b, e) softmax over allowed experts
    experts: torch.Tensor  # (b, k) chosen experts, best first
    weights: torch.Tensor  # (b, k) gate weights of the chosen experts (0 where fewer than k are allowed)
    load_balance_loss: torch.Tensor  # Switch/GShard: e * sum_e(fraction routed_e * mean prob_e)
    z_loss: torch.Tensor  # ST-MoE: mean(logsumexp(logits)^2)


class TopKRouter(nn.Module):
    """Scores experts from features; `allowed` (b, e) restricts each input to a subset (e.g. its tenant's)."""

    def __init__(self, dim: int, rows_per_expert: list[int], top_k: int = 2, normalize_weights: bool = True):
        super().__init__()
        num_experts, rows = len(rows_per_expert), max(rows_per_expert, default=1)
        self.top_k, self.normalize_weights = top_k, normalize_weights
        self.weight = nn.Parameter(torch.randn(num_experts, rows, dim) * dim**-0.5 * 0.1)  # near-uniform start
        self.bias = nn.Parameter(torch.zeros(num_experts, rows))
        mask = torch.arange(rows)[None, :] < torch.tensor(rows_per_expert)[:, None]
        self.register_buffer("row_mask", mask, persistent=False)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None) -> RouterOutput:
        # b: batch, e: experts, m: prototype rows per expert, d: features, k: chosen experts
        row_logits = torch.einsum("b d, e m d -> b e m", x, self.weight) + self.bias
        row_logits = row_logits.masked_fill(~self.row_mask, float("-inf"))
        logits = torch.logsumexp(row_logits, dim=-1)
        z_loss = reduce(torch.logsumexp(logits, dim=-1) ** 2, "b ->", "mean")
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)
        k = min(self.top_k, self.num_experts)
        weights, experts = probs.topk(k, dim=-1)
        if self.normalize_weights:
            weights = weights / reduce(weights, "b k -> b 1", "sum").clamp(min=1e-9)
        routed = torch.zeros_like(probs).scatter_(1, experts, (weights > 0).to(probs.dtype))
        fraction_routed = reduce(routed, "b e -> e", "mean") / k
        load_balance = self.num_experts * (fraction_routed * reduce(probs, "b e -> e", "mean")).sum()
        return RouterOutput(logits, row_logits, probs, experts, weights, load_balance, z_loss)

    def entry(self, expert: int, rows: int) -> dict[str, torch.Tensor]:
        """One expert's routing entry, un-aliased for saving."""
        return {
            "gate.weight": self.weight[expert, :rows].detach().clone().contiguous(),
            "gate.bias": self.bias[expert, :rows].detach().clone().contiguous(),
        }

    @classmethod
    def from_entries(cls, entries: list[dict[str, torch.Tensor]], **kwargs) -> TopKRouter:
        rows = [entry["gate.bias"].shape[0] for entry in entries]
        router = cls(entries[0]["gate.weight"].shape[1], rows, **kwargs)
        with torch.no_grad():
            for i, entry in enumerate(entries):
                router.weight[i].zero_()
                router.bias[i].zero_()
                router.weight[i, : rows[i]] = entry["gate.weight"]
                router.bias[i, : rows[i]] = entry["gate.bias"]
        return router
