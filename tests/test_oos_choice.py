"""What evaluation chooses on validation, per store: the kind of out-of-scope score with its threshold, and the gate
probability under which a routed answer lists its runners-up."""

import pytest
import torch

from moe.evaluation.collect import Outcome
from moe.evaluation.evaluate import choose_score, choose_unsure_below, unsure_metrics
from moe.inference import OOS_SCORES


def outcome(scores: dict[str, list[float]], in_scope: list[bool], misrouted: list[bool] | None = None) -> Outcome:
    n = len(in_scope)
    tenant = torch.tensor([0 if s else -1 for s in in_scope])
    label = torch.tensor([0 if s else -1 for s in in_scope])
    routed_tenant = torch.tensor([1 if m else 0 for m in (misrouted or [False] * n)])
    full = {kind: torch.tensor(scores.get(kind, [0.0] * n)) for kind in OOS_SCORES}
    zeros = torch.zeros(n)
    return Outcome(tenant, label, label.clone(), label.clone(), routed_tenant, zeros, zeros, full, 0.0, 0.0)


def test_the_score_that_separates_best_on_validation_is_chosen_with_its_threshold():
    in_scope = [True] * 6 + [False] * 4
    energy = [5.0, 6, 7, 8, 9, 10, 1, 2, 3, 4]  # separates in-scope from out-of-scope perfectly
    max_prob = [0.9, 0.5, 0.8, 0.7, 0.95, 0.6, 0.85, 0.55, 0.2, 0.1]  # does not
    kind, threshold = choose_score(outcome({"gate_energy": energy, "gate_max_prob": max_prob}, in_scope), "sum")
    assert kind == "gate_energy" and 4.0 < threshold < 5.0
    kind, _ = choose_score(outcome({"gate_energy": max_prob, "gate_max_prob": energy}, in_scope), "sum")
    assert kind == "gate_max_prob"  # the same data under the other name: the choice follows the figures


def test_a_tie_goes_to_the_first_kind_listed():
    in_scope = [True] * 3 + [False] * 2
    same = [3.0, 4, 5, 1, 2]
    kind, _ = choose_score(outcome({k: same for k in OOS_SCORES}, in_scope), "in_scope_cost")
    assert kind == next(iter(OOS_SCORES))


def test_the_runners_up_cut_flags_at_most_the_share_asked_for_and_is_measured():
    probs = [0.3, 0.5, 0.6, 0.9, 0.95, 0.99, 1.0, 1.0, 1.0, 1.0]
    result = outcome({"gate_max_prob": probs}, [True] * 10, misrouted=[True, True] + [False] * 8)
    cut = choose_unsure_below(result, max_unsure=20.0)
    assert cut == pytest.approx(0.6)  # 0.3 and 0.5 fall below it: 20 %
    metrics = unsure_metrics(result, "val", cut)
    assert metrics == {"val/unsure": pytest.approx(20.0), "val/misrouted_unsure": pytest.approx(100.0)}
    assert choose_unsure_below(result, max_unsure=0.0) == pytest.approx(0.3)  # nothing below the smallest
