"""The one decoder: what one forward pass says about each query (its best label and score, how in-scope it looks),
and the `Answer` that evaluation writes and serving returns.

Every out-of-scope score is computed from outputs the mixture already has (no extra model); higher means more
in-scope, and a query is rejected when its score falls below a threshold chosen on validation data.
"""

from __future__ import annotations

import math
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
GATE_FREE_SCORES = ("max_score",)  # with the tenant given (one candidate expert), these do not read the gate
AUTO = "auto"  # evaluation and export: choose the kind of score, as the threshold, on validation queries
DEFAULT_OOS_SCORE = next(iter(OOS_SCORES))  # where nothing was chosen (no threshold: it only describes answers)


def check_oos_rule(score: str, threshold: float | None) -> None:
    """A ValueError naming the problem with an out-of-scope rule: an unknown score, or a fixed threshold on `auto`."""
    if score != AUTO and score not in OOS_SCORES:
        raise ValueError(f"unknown out-of-scope score {score!r}; choose {AUTO!r} or one of {list(OOS_SCORES)}")
    if score == AUTO and threshold is not None:
        raise ValueError(f"a fixed out-of-scope threshold needs a named score, not {AUTO!r}: one of {list(OOS_SCORES)}")


def resolve_oos_rule(
    score: str, threshold: float | None, default_score: str = DEFAULT_OOS_SCORE, default_threshold: float | None = None
) -> tuple[str, float | None]:
    """The out-of-scope rule in force, where one is given (`score`, `threshold`) over a default (a bundle's own rule,
    or the default score with no threshold): the score named, else (`auto`) the default's; the threshold given, else
    the default's when the score is the default's (a threshold belongs to its score). The one place evaluation,
    export and the evaluation of a bundle settle it."""
    chosen = default_score if score == AUTO else score
    if threshold is None and chosen == default_score:
        threshold = default_threshold
    return chosen, threshold


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
    gate_experts: torch.Tensor  # (b, r) the gate's r best experts, best first
    gate_probs: torch.Tensor  # (b, r) their gate probabilities
    gate_gaps: torch.Tensor  # (b, r) how far each one's gate logit lies below the best's (0 first; inf: not allowed)

    @property
    def gate_margin(self) -> torch.Tensor:
        """(b,) the gate's lead of its first choice over its second, in logits (inf with one expert allowed)."""
        return self.gate_gaps[:, 1] if self.gate_gaps.shape[1] > 1 else torch.full_like(self.score, float("inf"))


# A routed answer lists as runners-up the next experts whose gate logit is within `unsure_margin` of the best's: the
# gate was not sure. Evaluation and export choose the margin per store on validation
# (`moe.evaluation.evaluate.choose_unsure_margin`); a margin in logits, unlike a probability, does not saturate for
# a confident gate. UNSURE_MARGIN is the margin where none was chosen (the first choice under 3x as likely).
UNSURE_MARGIN = math.log(3.0)
RUNNERS_UP = 2  # at most this many


def decode(model: Mixture, output: MixtureOutput) -> Decoded:
    # b: batch, e: experts, r: the gate's best experts kept
    label, score = best_labels(output)
    logits, experts = output.router.logits.topk(min(RUNNERS_UP + 1, output.router.logits.shape[-1]), dim=-1)  # (b, r)
    gaps = (logits[:, :1] - logits).nan_to_num(nan=float("inf"))  # a disallowed expert (-inf) lies infinitely below
    top_tenant = model.expert_tenant[output.experts[:, 0]]
    gate_probs = output.router.probs.gather(1, experts)
    return Decoded(label, score, top_tenant, output.experts, output.weights, experts, gate_probs, gaps)


def close_runners_up(
    model: Mixture, experts: list[int], probs: list[float], gaps: list[float], unsure_margin: float = UNSURE_MARGIN
) -> tuple[tuple[str, float], ...]:
    """(tenant, gate probability) of the experts after the first whose gate logit lies within `unsure_margin` of it."""
    rows = zip(experts[1:], probs[1:], gaps[1:], strict=True)
    return tuple((model.experts[e].tenant, p) for e, p, gap in rows if gap < unsure_margin)


@dataclass(frozen=True)
class Answer:
    """One query's prediction. `tenant` and `intent` are the best guess even when `out_of_scope` is set."""

    tenant: str
    intent: str
    score: float  # combined score of the prediction (gate weight x expert probability, summed over experts)
    out_of_scope: bool | None  # the out-of-scope score fell below the threshold; None: no threshold known
    experts: tuple[str, ...]  # tenants of the experts consulted, best first
    runners_up: tuple[tuple[str, float], ...] = ()  # (tenant, gate probability) of the next experts, when the gate
    # was not sure (`close_runners_up`): an application may ask its user, or fall back to a tenant id

    def to_dict(self) -> dict:
        runners = [{"tenant": tenant, "gate_prob": p} for tenant, p in self.runners_up]
        return asdict(self) | {"experts": list(self.experts), "runners_up": runners}


def answers(
    model: Mixture,
    decoded: Decoded,
    oos: torch.Tensor | None = None,
    threshold: float | None = None,
    unsure_margin: float = UNSURE_MARGIN,
) -> list[Answer]:
    """`oos`: (b,) out-of-scope scores of the same pass; a query is out of scope when below `threshold`.
    An answer lists the experts within `unsure_margin` of its first as runners-up (`close_runners_up`)."""
    flags: list = [None] * len(decoded.label)
    if threshold is not None and oos is not None:
        flags = (oos.double() < threshold).tolist()  # as the threshold was chosen: in float64
    rows = zip(
        decoded.label.tolist(),
        decoded.score.tolist(),
        decoded.experts.tolist(),
        decoded.weights.tolist(),
        flags,
        decoded.gate_experts.tolist(),
        decoded.gate_probs.tolist(),
        decoded.gate_gaps.tolist(),
        strict=True,
    )
    return [
        Answer(
            *model.labels[label],
            score,
            flag,
            tuple(model.experts[e].tenant for e, w in zip(es, ws, strict=True) if w > 0),
            close_runners_up(model, gate_experts, probs, gaps, unsure_margin),
        )
        for label, score, es, ws, flag, gate_experts, probs, gaps in rows
    ]


@torch.no_grad()
def predict(
    model: Mixture,
    features: torch.Tensor,
    tenant: torch.Tensor | None = None,
    oos_kind: str = DEFAULT_OOS_SCORE,
    threshold: float | None = None,
    unsure_margin: float = UNSURE_MARGIN,
    hidden=None,
    among: torch.Tensor | None = None,
) -> list[Answer]:
    """Answers for trunk features `(b, d)`; `tenant` (b,) restricts each query to its tenant's experts
    (`model.tenant_ids`; -1 lets the gate choose); `hidden`: the queries' `model.hidden_states` (pathway experts);
    `among` (b, e): the experts a query without a tenant may be routed to (`Mixture.route`)."""
    output = model(features, tenant, hidden=hidden, among=among)
    decoded = decode(model, output)
    return answers(model, decoded, oos_score(output, decoded.score, oos_kind).cpu(), threshold, unsure_margin)
