"""What evaluation chooses on validation, per store: the kind of out-of-scope score with its threshold, and the gate
probability under which a routed answer lists its runners-up."""

import pytest
import torch

from moe.evaluation.collect import Outcome
from moe.evaluation.evaluate import choose_score, choose_unsure_margin, unsure_metrics
from moe.inference import OOS_SCORES, Decoded, answers
from moe.model import ExpertInfo, Mixture, TopKRouter


def outcome(
    scores: dict[str, list[float]],
    in_scope: list[bool],
    misrouted: list[bool] | None = None,
    margins: list[float] | None = None,
) -> Outcome:
    n = len(in_scope)
    tenant = torch.tensor([0 if s else -1 for s in in_scope])
    label = torch.tensor([0 if s else -1 for s in in_scope])
    routed_tenant = torch.tensor([1 if m else 0 for m in (misrouted or [False] * n)])
    full = {kind: torch.tensor(scores.get(kind, [0.0] * n)) for kind in OOS_SCORES}
    zeros = torch.zeros(n)
    margin = torch.tensor(margins or [0.0] * n)
    return Outcome(tenant, label, label.clone(), label.clone(), routed_tenant, zeros, zeros, margin, full, 0.0, 0.0)


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


def test_the_runners_up_margin_flags_at_most_the_share_asked_for_and_is_measured():
    margins = [0.3, 0.5, 0.6, 2.0, 5.0, 9.0, 30.0, 30.0, float("inf"), float("inf")]
    result = outcome({}, [True] * 10, misrouted=[True, True] + [False] * 8, margins=margins)
    cut = choose_unsure_margin(result, max_unsure=20.0)
    assert cut == pytest.approx(0.6)  # 0.3 and 0.5 lie below it: 20 %
    metrics = unsure_metrics(result, "val", cut)
    assert metrics == {"val/unsure": pytest.approx(20.0), "val/misrouted_unsure": pytest.approx(100.0)}
    assert choose_unsure_margin(result, max_unsure=0.0) == pytest.approx(0.3)  # nothing below the smallest
    assert choose_unsure_margin(result, max_unsure=100.0) == float("inf")  # every answer may list them
    assert unsure_metrics(outcome({}, [True] * 3, margins=[1.0, 2, 3]), "val", 1.5)["val/misrouted_unsure"] != 0.0


class Fixed(Mixture):
    """A mixture of three one-label experts whose gate logits are given as the input itself."""

    def __init__(self):
        router = TopKRouter(3, [1, 1, 1], top_k=1, random_init=False)
        with torch.no_grad():
            router.weight.copy_(torch.eye(3)[:, None, :])
        super().__init__(router, [ExpertInfo(name, ("x",)) for name in ("a", "b", "c")])

    def group_logits(self, x, plan):
        return torch.zeros(plan.experts.numel(), plan.capacity, 1)


def test_an_answer_lists_runners_up_exactly_when_the_metric_counts_it_unsure():
    from moe.inference import decode

    model = Fixed()
    logits = torch.tensor([[5.0, 4.5, 0.0], [5.0, 0.0, -1.0], [30.0, 29.0, 28.9], [50.0, 10.0, 0.0]])
    decoded: Decoded = decode(model, model(logits))
    cut = 1.2
    listed = [answer.runners_up for answer in answers(model, decoded, unsure_margin=cut)]
    assert [tuple(t for t, _ in r) for r in listed] == [("b",), (), ("b", "c"), ()]
    flagged = (decoded.gate_margin < cut).tolist()
    assert flagged == [bool(r) for r in listed]  # what `unsure_metrics` counts is what answers show
    assert listed[2][0][1] == pytest.approx(torch.softmax(logits[2], 0)[1].item())  # with the gate's probability


@pytest.mark.parametrize(
    "given, default, expected",
    [
        (("auto", None), ("gate_energy", 0.4), ("gate_energy", 0.4)),  # nothing named: the default rule whole
        (("auto", 0.3), ("gate_energy", 0.4), ("gate_energy", 0.3)),  # a threshold for the default's score
        (("max_score", None), ("gate_energy", 0.4), ("max_score", None)),  # another score: its threshold to be chosen
        (("max_score", 0.2), ("gate_energy", 0.4), ("max_score", 0.2)),
        (("gate_energy", None), ("gate_energy", 0.4), ("gate_energy", 0.4)),  # its score named: threshold kept
        (("auto", None), ("max_score", None), ("max_score", None)),  # no default threshold: none
    ],
)
def test_an_out_of_scope_rule_given_over_a_default_is_settled_in_one_place(given, default, expected):
    from moe.inference.answers import resolve_oos_rule

    assert resolve_oos_rule(*given, *default) == expected
