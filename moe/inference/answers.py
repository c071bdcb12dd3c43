"""The one decoder: what one forward pass says about each query (its best label and score, how in-scope it looks),
and the `Answer` that evaluation writes and serving returns.

Every out-of-scope score is computed from outputs the mixture already has (no extra model); higher means more
in-scope, and a query is rejected when its score falls below a threshold chosen on validation data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

from moe.model import Mixture, MixtureOutput, best_labels


def _max_score(output: MixtureOutput, best_score: torch.Tensor) -> torch.Tensor:
    return best_score


def _gate_max_prob(output: MixtureOutput, best_score: torch.Tensor) -> torch.Tensor:
    return output.router.probs.max(dim=-1).values


def _gate_energy(output: MixtureOutput, best_score: torch.Tensor) -> torch.Tensor:
    return output.router.energy


def _gate_max_row(output: MixtureOutput, best_score: torch.Tensor) -> torch.Tensor:
    return output.router.max_row


OOS_SCORES = {  # in order of preference: where two do equally well on validation, the first is chosen
    "gate_energy": _gate_energy,  # logsumexp of all gate logits: how close the query is to any prototype
    "gate_max_row": _gate_max_row,  # the single best prototype row's logit
    "gate_max_prob": _gate_max_prob,  # the gate's probability of its top expert
    "max_score": _max_score,  # the prediction's combined probability (gate weight x expert probability)
}
AUTO = "auto"  # evaluation and export: choose the kind of score, as the threshold, on validation queries


def oos_score(output: MixtureOutput, best_score: torch.Tensor, kind: str) -> torch.Tensor:
    """(b,) score of kind `kind` (see `OOS_SCORES`); higher means more in-scope."""
    if kind not in OOS_SCORES:
        raise ValueError(f"unknown out-of-scope score {kind!r}; choose one of {sorted(OOS_SCORES)}")
    return OOS_SCORES[kind](output, best_score)


class Decoded(NamedTuple):
    """Per-query results of one forward pass, as tensors: what evaluation counts and serving answers."""

    label: torch.Tensor  # (b,) global label id of the best label
    score: torch.Tensor  # (b,) its combined score
    top_tenant: torch.Tensor  # (b,) tenant index of the top-1 expert
    experts: torch.Tensor  # (b, k) chosen experts, best first
    weights: torch.Tensor  # (b, k) their gate weights (0: not consulted)
    gate_probs: torch.Tensor  # (b, r) the gate's r highest probabilities over experts, best first
    gate_experts: torch.Tensor  # (b, r) their experts


# A routed answer whose top expert has less gate probability than `unsure_below` lists its runners-up. Evaluation
# and export choose the cut per store on validation (`moe.evaluation.evaluate.choose_unsure_below`): a statistics
# gate is far more confident than a trained one. UNSURE_BELOW is the cut where none was chosen.
UNSURE_BELOW = 0.9
RUNNERS_UP = 2  # at most this many, each with at least MIN_RUNNER_UP of the gate's probability
MIN_RUNNER_UP = 0.01


def decode(model: Mixture, output: MixtureOutput) -> Decoded:
    label, score = best_labels(output)
    gate_probs, gate_experts = output.router.probs.topk(min(RUNNERS_UP + 1, output.router.probs.shape[-1]), dim=-1)
    top_tenant = model.expert_tenant[output.experts[:, 0]]
    return Decoded(label, score, top_tenant, output.experts, output.weights, gate_probs, gate_experts)


def runners_up(
    model: Mixture, probs: list[float], experts: list[int], unsure_below: float = UNSURE_BELOW
) -> tuple[tuple[str, float], ...]:
    """The other experts' tenants and gate probabilities, when the gate is not sure of its first choice."""
    if probs[0] >= unsure_below:
        return ()
    pairs = zip(probs[1:], experts[1:], strict=True)
    return tuple((model.experts[e].tenant, p) for p, e in pairs if p >= MIN_RUNNER_UP)


@dataclass(frozen=True)
class Answer:
    """One query's prediction. `tenant` and `intent` are the best guess even when `out_of_scope` is set."""

    tenant: str
    intent: str
    score: float  # combined score of the prediction (gate weight x expert probability, summed over experts)
    out_of_scope: bool | None  # the out-of-scope score fell below the threshold; None: no threshold known
    experts: tuple[str, ...]  # tenants of the experts consulted, best first
    runners_up: tuple[tuple[str, float], ...] = ()  # (tenant, gate probability) of the next experts, when the gate
    # gave its first choice less than `unsure_below`: an application may ask its user, or fall back to a tenant id

    def to_dict(self) -> dict:
        runners = [{"tenant": tenant, "gate_prob": p} for tenant, p in self.runners_up]
        return asdict(self) | {"experts": list(self.experts), "runners_up": runners}


def answers(
    model: Mixture,
    decoded: Decoded,
    oos: torch.Tensor | None = None,
    threshold: float | None = None,
    unsure_below: float = UNSURE_BELOW,
) -> list[Answer]:
    """`oos`: (b,) out-of-scope scores of the same pass; a query is out of scope when below `threshold`.
    An answer lists its runners-up when its top expert's gate probability is below `unsure_below`."""
    unknown = threshold is None or oos is None
    flags = [None] * len(decoded.label) if unknown else (oos.double() < threshold).tolist()  # as chosen: float64
    rows = zip(
        decoded.label.tolist(),
        decoded.score.tolist(),
        decoded.experts.tolist(),
        decoded.weights.tolist(),
        flags,
        decoded.gate_probs.tolist(),
        decoded.gate_experts.tolist(),
        strict=True,
    )
    return [
        Answer(
            *model.labels[label],
            score,
            flag,
            tuple(model.experts[e].tenant for e, w in zip(es, ws, strict=True) if w > 0),
            runners_up(model, probs, gate_experts, unsure_below),
        )
        for label, score, es, ws, flag, probs, gate_experts in rows
    ]


@torch.no_grad()
def predict(
    model: Mixture,
    features: torch.Tensor,
    tenant: torch.Tensor | None = None,
    oos_kind: str = "gate_energy",
    threshold: float | None = None,
    unsure_below: float = UNSURE_BELOW,
) -> list[Answer]:
    """Answers for trunk features `(b, d)`; `tenant` (b,) restricts each query to its tenant's experts
    (`model.tenant_ids`; -1 lets the gate choose)."""
    output = model(features, tenant)
    decoded = decode(model, output)
    return answers(model, decoded, oos_score(output, decoded.score, oos_kind).cpu(), threshold, unsure_below)
