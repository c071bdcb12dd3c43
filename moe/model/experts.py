"""Tenant experts, stacked so that same-shape experts run as one batched product.

An expert is a residual bottleneck adapter over trunk features and a head over its tenant's own labels:
    z = x + up(gelu(down(x)));   logits = head(z)
Experts with fewer labels than the widest are padded; padded outputs are masked to -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TENSOR_NAMES = ("down.weight", "down.bias", "up.weight", "head.weight", "head.bias")


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

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `(e, n, c)` for groups `x` of shape `(e, n, d)`: group i runs through expert `experts[i]`
        (all experts in order when None)."""
        # e: expert groups, n: inputs per group, d: features, r: adapter rank, c: labels (padded)
        index = slice(None) if experts is None else experts
        hidden = F.gelu(torch.einsum("e n d, e d r -> e n r", x, self.down[index]) + self.down_bias[index, None])
        hidden = self.dropout(hidden)
        z = x + torch.einsum("e n r, e r d -> e n d", hidden, self.up[index])
        logits = torch.einsum("e n d, e d c -> e n c", z, self.head[index]) + self.head_bias[index, None]
        return logits.masked_fill(~self.label_mask[index, None], float("-inf"))

    def expert_tensors(self, expert: int, num_labels: int) -> dict[str, torch.Tensor]:
        """One expert's weights (its own labels only), contiguous and un-aliased for saving."""
        parts = (
            self.down[expert],
            self.down_bias[expert],
            self.up[expert],
            self.head[expert, :, :num_labels],
            self.head_bias[expert, :num_labels],
        )
        return {name: t.detach().clone().contiguous() for name, t in zip(TENSOR_NAMES, parts, strict=True)}

    @classmethod
    def from_tensors(cls, experts: list[dict[str, torch.Tensor]]) -> ExpertBank:
        dim, rank = experts[0]["down.weight"].shape
        num_labels = [tensors["head.bias"].shape[0] for tensors in experts]
        bank = cls(dim, num_labels, rank)
        with torch.no_grad():
            for p in bank.parameters():
                p.zero_()
            for i, t in enumerate(experts):
                c = num_labels[i]
                bank.down[i], bank.down_bias[i], bank.up[i] = t["down.weight"], t["down.bias"], t["up.weight"]
                bank.head[i, :, :c], bank.head_bias[i, :c] = t["head.weight"], t["head.bias"]
        return bank


def single_expert_logits(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert on its own inputs, from its shard tensors: `(n, d)` -> `(n, c)` over its own labels.

    The inference path: its result for an input depends only on that expert and its group, never on which
    other experts are resident, so paging can not change a prediction. Weights stored in a lower precision
    (a float16 or bfloat16 bundle) are computed in `x`'s dtype; in that dtype already, `.to` is a no-op."""
    tensors = {name: t.to(x.dtype) for name, t in tensors.items()}
    hidden = F.gelu(x @ tensors["down.weight"] + tensors["down.bias"])
    return (x + hidden @ tensors["up.weight"]) @ tensors["head.weight"] + tensors["head.bias"]
