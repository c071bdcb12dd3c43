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


OOS_SCORES = {
    "max_score": _max_score,  # the prediction's combined probability (gate weight x expert probability)
    "gate_max_prob": _gate_max_prob,  # the gate's probability of its top expert
    "gate_energy": _gate_energy,  # logsumexp of all gate logits: how close the query is to any prototype
    "gate_max_row": _gate_max_row,  # the single best prototype row's logit
}


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


def decode(model: Mixture, output: MixtureOutput) -> Decoded:
    label, score = best_labels(output)
    return Decoded(label, score, model.expert_tenant[output.experts[:, 0]], output.experts, output.weights)


@dataclass(frozen=True)
class Answer:
    """One query's prediction. `tenant` and `intent` are the best guess even when `out_of_scope` is set."""

    tenant: str
    intent: str
    score: float  # combined score of the prediction (gate weight x expert probability, summed over experts)
    out_of_scope: bool | None  # the out-of-scope score fell below the threshold; None: no threshold known
    experts: tuple[str, ...]  # tenants of the experts consulted, best first

    def to_dict(self) -> dict:
        return asdict(self) | {"experts": list(self.experts)}


def answers(model: Mixture, decoded: Decoded, oos: torch.Tensor, threshold: float | None) -> list[Answer]:
    """`oos`: (b,) out-of-scope scores of the same pass; a query is out of scope when below `threshold`."""
    flags = [None] * len(oos) if threshold is None else (oos.double() < threshold).tolist()  # as chosen: float64
    rows = zip(
        decoded.label.tolist(),
        decoded.score.tolist(),
        decoded.experts.tolist(),
        decoded.weights.tolist(),
        flags,
        strict=True,
    )
    return [
        Answer(
            *model.labels[label],
            score,
            flag,
            tuple(model.experts[e].tenant for e, w in zip(es, ws, strict=True) if w > 0),
        )
        for label, score, es, ws, flag in rows
    ]


@torch.no_grad()
def predict(
    model: Mixture,
    features: torch.Tensor,
    tenant: torch.Tensor | None = None,
    oos_kind: str = "max_score",
    threshold: float | None = None,
) -> list[Answer]:
    """Answers for trunk features `(b, d)`; `tenant` (b,) restricts each query to its tenant's experts
    (`model.tenant_ids`; -1 lets the gate choose)."""
    output = model(features, tenant)
    decoded = decode(model, output)
    return answers(model, decoded, oos_score(output, decoded.score, oos_kind).cpu(), threshold)
