"""Out-of-scope detection: a rejection threshold on a score, chosen on validation queries, then measured.

A query whose score is below the threshold is rejected (declared out of scope). An in-scope query counts as
right only when it is classified right AND not rejected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CRITERIA = ("in_scope_cost", "overall", "sum")


class Rejection(NamedTuple):
    oos_recall: float  # percent of out-of-scope queries rejected
    oos_precision: float  # percent of rejected queries that are out of scope
    acc_in_scope_with_rejection: float  # percent of in-scope queries right and not rejected
    in_scope_rejected: float  # percent of in-scope queries rejected


def rejection(in_score: torch.Tensor, in_correct: torch.Tensor, oos_score: torch.Tensor, threshold: float) -> Rejection:
    in_rejected, oos_rejected = in_score.double() < threshold, oos_score.double() < threshold  # as chosen
    n_in, n_oos = in_score.numel(), oos_score.numel()
    caught, wrongly = oos_rejected.sum().item(), in_rejected.sum().item()
    return Rejection(
        100.0 * caught / n_oos if n_oos else float("nan"),
        100.0 * caught / (caught + wrongly) if caught + wrongly else 0.0,
        100.0 * (in_correct & ~in_rejected).sum().item() / n_in if n_in else float("nan"),
        100.0 * wrongly / n_in if n_in else float("nan"),
    )


def operating_point(
    in_score: torch.Tensor,
    in_correct: torch.Tensor,
    oos_score: torch.Tensor,
    criterion: str = "in_scope_cost",
    max_cost: float = 1.0,
) -> tuple[float, float]:
    """The threshold that, on these (validation) queries, meets `criterion`, and the criterion's value there
    (comparable across kinds of score, so that the score itself can be chosen by it):

        in_scope_cost  the most out-of-scope recall while in-scope accuracy with rejection stays within
                       `max_cost` points of the accuracy without rejection (an operating point: "reject, but
                       lose at most 1 point of in-scope accuracy")
        overall        the most queries right, out of scope counted as one more class
        sum            the largest in-scope accuracy with rejection + out-of-scope recall (both percent: each
                       kind of query weighs the same, however few out-of-scope queries there are)

    Every distinct score is a candidate cut (a cut rejects the scores below it); the threshold returned lies
    midway between the chosen cut and the next score below, where any value splits these queries alike. Ties
    go to the lower threshold (fewer rejections)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown threshold criterion {criterion!r}; choose one of {CRITERIA}")
    if in_score.numel() == 0 or oos_score.numel() == 0:
        raise ValueError("choosing a threshold needs both in-scope and out-of-scope queries")
    in_score, oos_score = in_score.double(), oos_score.double()
    cuts = torch.unique(torch.cat([in_score, oos_score]))  # sorted ascending
    cuts = torch.cat([cuts, cuts.new_tensor([float("inf")])])
    right_kept = in_correct.sum() - torch.searchsorted(in_score[in_correct].sort().values, cuts)  # counts < cut
    oos_rejected = torch.searchsorted(oos_score.sort().values, cuts)
    accuracy = 100.0 * right_kept / in_score.numel()
    recall = 100.0 * oos_rejected / oos_score.numel()
    if criterion == "in_scope_cost":
        objective = torch.where(accuracy >= accuracy[0] - max_cost, recall, torch.full_like(recall, -1.0))
    elif criterion == "overall":
        objective = (right_kept + oos_rejected).double()
    else:
        objective = accuracy + recall
    best = int(torch.argmax(objective))  # the first maximum: the lowest such cut
    value = float(objective[best])
    if best == 0:
        return float(cuts[0]), value
    if best == len(cuts) - 1:
        return float(cuts[-2]) + 1.0, value  # reject everything seen
    return float((cuts[best - 1] + cuts[best]) / 2), value
