"""The sparse mixture: gate -> top-k dispatch -> experts -> gate-weighted union of their labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn

from moe.model.dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from moe.model.evidence import reweigh
from moe.model.experts import ExpertBank
from moe.model.router import GateRows, RouterOutput, TopKRouter, check_choice

UNKNOWN_TENANT = -1


@dataclass(frozen=True)
class ExpertInfo:
    """What an expert answers for: its tenant and that tenant's labels, in output order."""

    tenant: str
    labels: tuple[str, ...]


class MixtureOutput(NamedTuple):
    log_probs: torch.Tensor  # (b, k, c) each chosen expert's log-probabilities over its labels
    weights: torch.Tensor  # (b, k) gate weights
    experts: torch.Tensor  # (b, k) chosen experts
    label_ids: torch.Tensor  # (b, k, c) global label id of each candidate, -1 on padding
    router: RouterOutput

    @property
    def scores(self) -> torch.Tensor:
        """(b, k, c) gate-weighted probabilities of every candidate label."""
        return self.weights[..., None] * self.log_probs.exp()


def union_scores(scores: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Sum the scores of candidates that name the same label (two chosen experts may share labels).

    Returns (b, k*c) where each candidate holds the total score of its label."""
    # b: batch, n = k*c candidates
    ids = rearrange(label_ids, "b k c -> b (k c)")
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    return torch.einsum("b n m, b m -> b n", same.to(scores.dtype), rearrange(scores, "b k c -> b (k c)"))


def best_labels(output: MixtureOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """The highest-scoring label of the union for each input: global label ids (b,) and their scores (b,)."""
    best_score, best = union_scores(output.scores, output.label_ids).max(dim=-1)
    return rearrange(output.label_ids, "b k c -> b (k c)").gather(1, best[:, None]).squeeze(1), best_score


def mixture_nll(output: MixtureOutput, target: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """-log sum_k w_k p_k(target) over the chosen experts; `target` holds global label ids (b,)."""
    hit = output.label_ids == target[:, None, None]
    likelihood = (output.scores * hit).sum(dim=(1, 2))
    return -torch.log(likelihood + eps).mean()


class Mixture(nn.Module):
    """Routes each input to its top-k experts among those allowed (a query's tenant restricts the choice),
    and combines their answers. Subclasses say how the chosen experts are computed."""

    def __init__(
        self, router: TopKRouter, experts: list[ExpertInfo], input_scale: float = 1.0, gate_rows: GateRows = "labels"
    ):
        super().__init__()
        if router.num_experts != len(experts):
            raise ValueError(f"the router scores {router.num_experts} experts, but {len(experts)} are listed")
        check_choice(gate_rows, GateRows, "gate_rows")
        self.router, self.experts = router, list(experts)
        self.input_scale, self.gate_rows = input_scale, gate_rows
        self.tenants = sorted({info.tenant for info in experts})
        self.labels = sorted({(info.tenant, label) for info in experts for label in info.labels})
        self.width = max(len(info.labels) for info in experts)
        label_id = {pair: i for i, pair in enumerate(self.labels)}
        ids = [[label_id[(info.tenant, lab)] for lab in info.labels] for info in experts]
        self.register_buffer("label_ids", torch.tensor([row + [-1] * (self.width - len(row)) for row in ids]), False)
        self._tenant_index = {name: i for i, name in enumerate(self.tenants)}  # by name: thousands of tenants
        self.register_buffer("expert_tenant", torch.tensor([self._tenant_index[i.tenant] for i in experts]), False)
        # each tenant's one expert, where every tenant has one: a query with its tenant given then scores no other
        one_each = len(self.tenants) == len(experts)
        tenant_expert = torch.empty(len(self.tenants), dtype=torch.long).scatter_(
            0, self.expert_tenant, torch.arange(len(experts))
        )
        self.register_buffer("tenant_expert", tenant_expert if one_each else None, False)
        # how much the chosen experts' own evidence weighs against the gate among a routed query's candidates
        # (`decide`); 0: the gate's weights as they are (chosen on val; `moe.model.evidence`)
        self.evidence_weight = 0.0

    def tenant_index(self, name: str) -> int:
        try:
            return self._tenant_index[name]
        except KeyError:
            raise KeyError(f"unknown tenant {name!r}; known tenants: {self.tenants}") from None

    def tenant_ids(self, names: list[str | None]) -> torch.Tensor:
        """Tenant indices for a batch of requests; None (tenant unknown) lets the gate choose."""
        return torch.tensor([UNKNOWN_TENANT if n is None else self.tenant_index(n) for n in names], dtype=torch.long)

    def experts_among(self, tenants: Iterable[str]) -> torch.Tensor:
        """(e,) True for the experts of these tenants (names not served are ignored)."""
        ids = torch.tensor([self._tenant_index[t] for t in tenants if t in self._tenant_index], dtype=torch.long)
        return torch.isin(self.expert_tenant, ids.to(self.expert_tenant.device))

    def label_id(self, tenant: str, label: str) -> int:
        return self.labels.index((tenant, label))

    def group_logits(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """(g, capacity, width) logits of the planned groups, -inf on labels an expert lacks."""
        raise NotImplementedError

    def group_log_probs(self, x: torch.Tensor, plan: DispatchPlan, hidden=None) -> torch.Tensor:
        """(g, capacity, width) log-probabilities of each group over its expert's labels, -inf on the others.
        `hidden`: the batch's token states, for experts that read them (`moe.model.pathway`)."""
        return self.group_logits(x, plan).log_softmax(dim=-1)

    def group_outputs(
        self, x: torch.Tensor, plan: DispatchPlan, hidden=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`group_log_probs`, and (g, capacity) each group's evidence for its expert where the experts keep any
        (`moe.model.evidence`; NaN for an expert without), else None. This one: no evidence."""
        return self.group_log_probs(x, plan, hidden), None

    def decide(
        self, routed: RouterOutput, evidence: torch.Tensor | None, tenant: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The routed queries' decision among their candidates: the gate's weights reweighed by the candidates'
        evidence (b, k) (`reweigh`), candidates re-ordered best first -> (weights (b, k), order (b, k) of the
        gate's candidates, or None: the gate's order). With `evidence_weight` 0 or no evidence: the gate's weights,
        untouched; queries whose tenant is given keep theirs too (bit for bit)."""
        # b: batch, k: candidates
        if evidence is None or self.evidence_weight == 0:
            return routed.weights, None
        keep = torch.arange(routed.weights.shape[1], device=routed.weights.device).expand_as(routed.weights)
        weights = reweigh(routed.weights, evidence, self.evidence_weight)
        order = weights.argsort(dim=-1, descending=True, stable=True)
        weights = weights.gather(1, order)
        if tenant is not None:  # a tenant given: its one candidate, as the gate gave it
            given = (tenant != UNKNOWN_TENANT)[:, None]
            weights, order = torch.where(given, routed.weights, weights), torch.where(given, keep, order)
        return weights, order

    def hidden_states(self, texts: list[str]):
        """What the experts read of a batch besides its features (None: features only)."""
        return None

    def route(
        self, x: torch.Tensor, tenant: torch.Tensor | None, keep_rows: bool = False, among: torch.Tensor | None = None
    ) -> RouterOutput:
        """The gate's choice for scaled inputs. An input whose tenant is known scores that tenant's rows only
        (`TopKRouter.given`), whatever else is in its batch; the others are routed by `route_unknown`. With row
        logits kept (the supervised gate loss), or tenants owning several experts, the whole gate is scored, each
        known tenant's input restricted to its own experts. `among` (b, e): the experts each input without a known
        tenant may be routed to (`TopKRouter.among`; a row of all True: any, as without `among`)."""
        if among is not None:
            restricted = ~among.all(dim=-1)
            if tenant is not None:
                restricted &= tenant == UNKNOWN_TENANT
            if restricted.any():
                if keep_rows:
                    raise ValueError("routing among a subset of experts is for inference: no row logits kept")
                own = self.router.among(x[restricted], among[restricted])
                if restricted.all():
                    return own
                rest = self.route(x[~restricted], tenant[~restricted] if tenant is not None else None)
                return RouterOutput.merged(restricted, own, rest)
        if keep_rows or self.tenant_expert is None:
            allowed = None
            if tenant is not None:
                given = tenant[:, None] != UNKNOWN_TENANT
                allowed = ~given | (self.expert_tenant[None, :] == tenant[:, None])
            return self.router(x, allowed, keep_rows)
        known = tenant >= 0 if tenant is not None else torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if not known.any():
            return self.route_unknown(x)
        if known.all():
            return self.router.given(x, self.tenant_expert[tenant])
        own = self.router.given(x[known], self.tenant_expert[tenant[known]])
        return RouterOutput.merged(known, own, self.route_unknown(x[~known]))

    def route_unknown(self, x: torch.Tensor) -> RouterOutput:
        """The gate's choice for inputs whose tenant is not known: every expert's rows scored."""
        return self.router(x)

    def forward(
        self,
        features: torch.Tensor,
        tenant: torch.Tensor | None = None,
        keep_rows: bool = False,
        hidden=None,
        among: torch.Tensor | None = None,
    ) -> MixtureOutput:
        """`keep_rows`: keep the gate's (b, e, m) row logits in the output (for the supervised gate loss);
        `hidden`: the batch's `hidden_states`, for experts that read them; `among`: as for `route`."""
        # b: batch, k: chosen experts, c: labels per expert (padded), d: features
        x = features * self.input_scale
        routed = self.route(x, tenant, keep_rows, among)
        plan = plan_dispatch(routed.experts, routed.weights)
        group_log_probs, group_evidence = self.group_outputs(x, plan, hidden)
        log_probs = combine(group_log_probs, plan, fill=float("-inf"))
        evidence = None if group_evidence is None else combine(group_evidence[..., None], plan, float("nan"))[..., 0]
        weights, order = self.decide(routed, evidence, tenant)
        if order is not None:  # candidates re-ordered by the decision
            log_probs = log_probs.gather(1, order[..., None].expand_as(log_probs))
            experts = routed.experts.gather(1, order)
        else:
            experts = routed.experts
        return MixtureOutput(log_probs, weights, experts, self.label_ids[experts], routed)


class MixtureOfExperts(Mixture):
    """The trainable mixture: every expert resident in one stacked bank, groups computed as batched einsums."""

    def __init__(
        self,
        router: TopKRouter,
        bank: ExpertBank,
        experts: list[ExpertInfo],
        input_scale: float = 1.0,
        gate_rows: GateRows = "labels",
    ):
        super().__init__(router, experts, input_scale, gate_rows)
        if bank.num_experts != len(experts) or bank.head.shape[-1] != self.width:
            raise ValueError("the expert bank does not match the expert list")
        self.bank = bank

    def group_logits(self, x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return self.bank(dispatch(x, plan), plan.experts)


def build_mixture(
    experts: list[ExpertInfo],
    dim: int,
    gate_rows: GateRows = "labels",
    top_k: int = 2,
    normalize_weights: bool = True,
    rank: int = 64,
    dropout: float = 0.0,
    input_scale: float = 8.0,
) -> MixtureOfExperts:
    """A fresh trainable mixture over `experts` (a mixture from stored shards comes from `moe.inference`)."""
    rows = [len(info.labels) if gate_rows == "labels" else 1 for info in experts]
    router = TopKRouter(dim, rows, top_k=top_k, normalize_weights=normalize_weights)
    bank = ExpertBank(dim, [len(info.labels) for info in experts], rank=rank, dropout=dropout)
    return MixtureOfExperts(router, bank, experts, input_scale=input_scale, gate_rows=gate_rows)
