"""Tenant experts: one formula, computed for one expert or for a stack of same-shape experts at once.

An expert is a residual bottleneck adapter over trunk features and a head over its tenant's own labels:
    z = x + up(gelu(down(x)));   logits = head(z)
`expert_logits` is that formula; the trainable `ExpertBank` stacks experts so that groups run as one batched
product, and the paged inference path runs each expert's group through the same function on its shard's tensors.
Experts with fewer labels than the widest are padded in a bank; padded outputs are masked to -inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TENSOR_NAMES = ("down.weight", "down.bias", "up.weight", "head.weight", "head.bias")


def expert_features(
    x: torch.Tensor, tensors: dict[str, torch.Tensor], dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """`(..., n, d)` inputs -> `(..., n, d)` the adapter's output `x + up(gelu(down(x)))`, before the head (what an
    expert's evidence reads, `moe.model.evidence`). Weights stored in a lower precision are computed in `x`'s dtype.
    `dropout` acts on the adapter's hidden units."""
    # e: experts (optional), n: inputs, d: features, r: adapter rank
    down, down_bias, up = (tensors[name].to(x.dtype) for name in TENSOR_NAMES[:3])
    hidden = F.gelu(x @ down + down_bias.unsqueeze(-2))  # (..., n, r)
    if dropout is not None:
        hidden = dropout(hidden)
    return x + hidden @ up


def head_logits(z: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`(..., n, d)` adapter outputs -> `(..., n, c)` logits over the expert's labels."""
    head, head_bias = (tensors[name].to(z.dtype) for name in TENSOR_NAMES[3:])
    return z @ head + head_bias.unsqueeze(-2)


def expert_logits(
    x: torch.Tensor, tensors: dict[str, torch.Tensor], dropout: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """`(..., n, d)` inputs -> `(..., n, c)` logits; the tensors carry the same leading dimensions (none for one
    expert, `e` for a stack): `head_logits(expert_features(x))`. Weights stored in a lower precision (a float16 or
    bfloat16 bundle) are computed in `x`'s dtype; in that dtype already, `.to` is a no-op."""
    return head_logits(expert_features(x, tensors, dropout), tensors)


class ExpertBank(nn.Module):
    """`num_labels[i]` outputs for expert i; `rank` 0 makes every expert a plain linear head.
    Dropout is a training-time setting, not part of an expert's identity: it is not saved in shards."""

    def __init__(self, dim: int, num_labels: list[int], rank: int = 64, dropout: float = 0.0):
        super().__init__()
        e, c = len(num_labels), max(num_labels)
        self.dim, self.rank = dim, rank
        self.dropout = nn.Dropout(dropout)  # on the adapter's hidden units, while training
        self.down = nn.Parameter(torch.randn(e, dim, rank) * dim**-0.5)
        self.down_bias = nn.Parameter(torch.zeros(e, rank))
        self.up = nn.Parameter(torch.zeros(e, rank, dim))  # zero: every adapter starts as the identity
        self.head = nn.Parameter(torch.randn(e, dim, c) * dim**-0.5 * 0.1)
        self.head_bias = nn.Parameter(torch.zeros(e, c))
        mask = torch.arange(c)[None, :] < torch.tensor(num_labels)[:, None]
        self.register_buffer("label_mask", mask, persistent=False)

    @property
    def num_experts(self) -> int:
        return self.head.shape[0]

    def _parameters_of(self, index) -> dict[str, torch.Tensor]:
        parts = (self.down, self.down_bias, self.up, self.head, self.head_bias)
        return {name: p[index] for name, p in zip(TENSOR_NAMES, parts, strict=True)}

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(e, n, c)` for groups `x` of shape `(e, n, d)`: group i runs through expert `experts[i]`
        (all experts in order when None)."""
        # e: expert groups, n: inputs per group, d: features, c: labels (padded)
        index = slice(None) if experts is None else experts
        logits = expert_logits(x, self._parameters_of(index), self.dropout)
        return logits.masked_fill(~self.label_mask[index, None], float("-inf"))

    def expert_tensors(self, expert: int, num_labels: int) -> dict[str, torch.Tensor]:
        """One expert's weights (its own labels only), contiguous and un-aliased for saving."""
        tensors = self._parameters_of(expert)
        tensors["head.weight"], tensors["head.bias"] = (
            tensors["head.weight"][:, :num_labels],
            tensors["head.bias"][:num_labels],
        )
        return {name: t.detach().clone().contiguous() for name, t in tensors.items()}

    @torch.no_grad()
    def load_expert(self, expert: int, tensors: dict[str, torch.Tensor]) -> None:
        """Set expert `expert` from shard tensors; a head with fewer labels fills the first columns (the rest stay)."""
        c = tensors["head.bias"].shape[0]
        self.down[expert], self.down_bias[expert], self.up[expert] = (
            tensors["down.weight"],
            tensors["down.bias"],
            tensors["up.weight"],
        )
        self.head[expert, :, :c], self.head_bias[expert, :c] = tensors["head.weight"], tensors["head.bias"]
