"""The gate: a softmax top-k router over registered experts, and the one vocabulary that describes it.

Each expert owns `m` rows of the gate, its routing entry (`GateRows`): one per label ("labels", the prototype gate)
or one in all ("one", Switch/GShard-style); an expert's logit is the logsumexp of its rows. Adding an expert
appends rows and never touches the others'. At inference the rows come from one of two places (`RowSource`): as
trained and stored in each shard, or derived from each shard's feature statistics (`moe.model.stats`), where an
expert may also add a quadratic term common to its rows (its classes scored as Gaussians under its own covariance).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from einops import rearrange, reduce
from torch import nn

GateRows = Literal["labels", "one"]  # an expert's routing entry: a row per label, or one row
RowSource = Literal["trained", "statistics"]  # inference: the rows stored in each shard, or rows from its statistics
GATE_WEIGHT, GATE_BIAS = ROUTING = ("gate.weight", "gate.bias")  # an expert's gate rows, as its shard names them


def check_choice(value: str, kind, name: str) -> str:
    """`value` if it is one of the `Literal` type `kind`'s values, else a ValueError naming `name` and the choices."""
    if value not in (choices := get_args(kind)):
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (b, e) expert logits, -inf where not allowed
    row_logits: torch.Tensor | None  # (b, e, m) prototype-row logits, -inf on padding rows (when asked for)
    energy: torch.Tensor  # (b,) logsumexp of every row of every expert scored (`forward`: all; `given`: its own)
    max_row: torch.Tensor  # (b,) the best single row's logit among those scored
    probs: torch.Tensor  # (b, e) softmax over allowed experts
    experts: torch.Tensor  # (b, k) chosen experts, best first
    weights: torch.Tensor  # (b, k) gate weights of the chosen experts (0 where fewer than k are allowed)
    load_balance_loss: torch.Tensor  # Switch/GShard: e * sum_e(fraction routed_e * mean prob_e)
    z_loss: torch.Tensor  # ST-MoE: mean(logsumexp(logits)^2)

    @staticmethod
    def merged(first: torch.Tensor, a: RouterOutput, b: RouterOutput) -> RouterOutput:
        """One batch's output from two parts: the inputs where `first` (b,) is true from `a`, the others from `b`, in
        order (per-input fields only: no row logits; the losses are `a`'s, for inference)."""

        def put(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((first.numel(), *x.shape[1:]))
            out[first], out[~first] = x, y
            return out

        fields = ("logits", "energy", "max_row", "probs", "experts", "weights")
        return a._replace(row_logits=None, **{name: put(getattr(a, name), getattr(b, name)) for name in fields})


class TopKRouter(nn.Module):
    """Scores experts from features; `allowed` (b, e) restricts each input to a subset (e.g. its tenant's)."""

    CHUNK = 64  # experts scored at a time: (b, e, m) row logits never exist whole for thousands of experts

    def __init__(
        self,
        dim: int,
        rows_per_expert: list[int],
        top_k: int = 2,
        normalize_weights: bool = True,
        random_init: bool = True,
        dtype: torch.dtype = torch.float32,
    ):
        """`random_init=False` starts every row at zero, for a router about to be filled from stored rows.
        `dtype`: how the rows are held (a float16 gate takes half the memory); they are scored in the input's."""
        super().__init__()
        if not rows_per_expert:
            raise ValueError("a router needs at least one expert")
        num_experts, rows = len(rows_per_expert), max(rows_per_expert)
        self.top_k, self.normalize_weights = top_k, normalize_weights
        if random_init:  # near-uniform start, scaled in place (no temporary copies of a large gate)
            weight = torch.randn(num_experts, rows, dim).mul_(dim**-0.5).mul_(0.1).to(dtype)
        else:
            weight = torch.zeros(num_experts, rows, dim, dtype=dtype)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_experts, rows))
        mask = torch.arange(rows)[None, :] < torch.tensor(rows_per_expert)[:, None]
        self.register_buffer("row_mask", mask, persistent=False)
        # an optional quadratic term per expert, common to its rows (`set_quadratic`); None: a linear gate
        self.register_buffer("factor", None, persistent=False)  # (e, d, d)
        self.register_buffer("offset", None, persistent=False)  # (e,)

    def set_quadratic(self, factor: torch.Tensor, offset: torch.Tensor) -> None:
        """Add `-|x F_e|^2 / 2 + offset_e` to every row logit of expert e: factor (e, d, d), offset (e,). With it the
        gate scores each expert's classes as Gaussians under that expert's own covariance (`tenant_discriminants`)."""
        shape = (self.num_experts, self.weight.shape[-1], self.weight.shape[-1])
        if factor.shape != shape or offset.shape != shape[:1]:
            raise ValueError(f"quadratic term {tuple(factor.shape)}, {tuple(offset.shape)} does not fit {shape}")
        self.factor, self.offset = factor.to(self.weight.device), offset.to(self.weight.device)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None = None, keep_rows: bool = False) -> RouterOutput:
        """`keep_rows`: also return the (b, e, m) row logits (the supervised gate loss needs them)."""
        # b: batch, e: experts, m: prototype rows per expert, d: features, k: chosen experts
        rows, expert_logits, energies, max_rows = [], [], [], []
        for start in range(0, self.num_experts, self.CHUNK):  # one chunk of experts at a time
            chunk = self._row_logits(x, start)
            rows += [chunk] if keep_rows else []
            expert_logits.append(torch.logsumexp(chunk, dim=-1))
            energies.append(torch.logsumexp(rearrange(chunk, "b e m -> b (e m)"), dim=-1))
            max_rows.append(reduce(chunk, "b e m -> b", "max"))
        row_logits = torch.cat(rows, dim=1) if keep_rows else None
        logits = torch.cat(expert_logits, dim=1)
        energy = torch.logsumexp(torch.stack(energies, dim=-1), dim=-1)  # exact identity for a single chunk
        max_row = reduce(torch.stack(max_rows, dim=-1), "b chunks -> b", "max")
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
        return RouterOutput(logits, row_logits, energy, max_row, probs, experts, weights, load_balance, z_loss)

    @torch.no_grad()
    def among(self, x: torch.Tensor, allowed: torch.Tensor) -> RouterOutput:
        """Each input routed among its allowed experts (b, e) only, scored as if the gate held those alone: logits,
        probabilities, chosen experts and weights are `forward`'s with `allowed`; `energy` and `max_row` cover the
        allowed experts' rows (as `given` covers its one expert's), so no other expert shows in an answer."""
        # b: batch, e: experts, m: prototype rows per expert, k: chosen experts
        expert_logits, energies, max_rows = [], [], []
        for start in range(0, self.num_experts, self.CHUNK):
            chunk = self._row_logits(x, start).masked_fill(~allowed[:, start : start + self.CHUNK, None], float("-inf"))
            expert_logits.append(torch.logsumexp(chunk, dim=-1))
            energies.append(torch.logsumexp(rearrange(chunk, "b e m -> b (e m)"), dim=-1))
            max_rows.append(reduce(chunk, "b e m -> b", "max"))
        logits = torch.cat(expert_logits, dim=1)
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(min(self.top_k, self.num_experts), dim=-1)
        if self.normalize_weights:
            weights = weights / reduce(weights, "b k -> b 1", "sum").clamp(min=1e-9)
        energy = torch.logsumexp(torch.stack(energies, dim=-1), dim=-1)
        max_row = reduce(torch.stack(max_rows, dim=-1), "b chunks -> b", "max")
        zero = logits.new_zeros(())
        return RouterOutput(logits, None, energy, max_row, probs, experts, weights, zero, zero)

    @torch.no_grad()
    def given(self, x: torch.Tensor, experts: torch.Tensor) -> RouterOutput:
        """Each input routed to its one given expert (b,), scoring that expert's rows only: what a query whose
        tenant is known costs, whatever number of experts the gate holds. Chosen experts, weights and probabilities
        are those `forward` gives with only that expert allowed; `energy` and `max_row` cover its own rows."""
        # b: batch, e: experts, m: rows per expert, d, r: features, k: chosen experts
        b, k = x.shape[0], min(self.top_k, self.num_experts)
        weight, bias = self.weight[experts].to(x.dtype), self.bias[experts]  # (b, m, d), (b, m)
        rows = torch.einsum("b d, b m d -> b m", x, weight) + bias
        if self.factor is not None:  # each expert's quadratic term, a distinct expert at a time (no (b, d, d) copy)
            quadratic = torch.empty(b, dtype=x.dtype, device=x.device)
            for e in experts.unique().tolist():
                mine = experts == e
                quadratic[mine] = (x[mine] @ self.factor[e].to(x.dtype)).square().sum(-1)
            rows = rows + (self.offset[experts] - 0.5 * quadratic)[:, None]
        rows = rows.masked_fill(~self.row_mask[experts], float("-inf"))
        own = torch.logsumexp(rows, dim=-1)  # (b,)
        logits = torch.full((b, self.num_experts), float("-inf"), dtype=own.dtype, device=x.device)
        logits.scatter_(1, experts[:, None], own[:, None])
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(k, dim=-1)  # as `forward` with one expert allowed: the rest weigh 0
        zero = own.new_zeros(())
        return RouterOutput(logits, None, own, rows.amax(dim=-1), probs, chosen, weights, zero, zero)

    def _row_logits(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """(b, e', m) row logits of the experts from `start` on, -inf on padding rows."""
        weight, bias = self.weight[start : start + self.CHUNK].to(x.dtype), self.bias[start : start + self.CHUNK]
        row_logits = torch.einsum("b d, e m d -> b e m", x, weight) + bias
        if self.factor is not None:  # b: batch, e: experts, d, r: features
            factor = self.factor[start : start + self.CHUNK].to(x.dtype)
            quadratic = torch.einsum("b d, e d r -> b e r", x, factor).square().sum(-1)  # (b, e') |x F_e|^2
            row_logits = row_logits + (self.offset[start : start + self.CHUNK] - 0.5 * quadratic)[..., None]
        return row_logits.masked_fill(~self.row_mask[start : start + self.CHUNK], float("-inf"))

    def entry(self, expert: int, rows: int) -> dict[str, torch.Tensor]:
        """One expert's routing entry, un-aliased for saving."""
        return {
            GATE_WEIGHT: self.weight[expert, :rows].detach().clone().contiguous(),
            GATE_BIAS: self.bias[expert, :rows].detach().clone().contiguous(),
        }

    def subset(self, experts: list[int]) -> TopKRouter:
        """A router over these experts only, in this order, with their rows as they are."""
        rows = self.row_mask[experts].sum(dim=-1).tolist()
        router = TopKRouter(
            self.weight.shape[-1], rows, self.top_k, self.normalize_weights, random_init=False, dtype=self.weight.dtype
        )
        with torch.no_grad():
            router.weight.copy_(self.weight[experts, : router.weight.shape[1]])
            router.bias.copy_(self.bias[experts, : router.bias.shape[1]])
        if self.factor is not None:
            router.set_quadratic(self.factor[experts], self.offset[experts])
        return router
