"""The evaluation: a mixture over split sources -> flat metrics, per-tenant rows and what the plots need.

Training (`moe.tasks.train`), `scripts/evaluate.py` and `scripts/export.py` all report what this computes on a
`PagedMixture` loaded from the shards, so their figures agree to the last digit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe.data import Tenant
from moe.evaluation.calibration import Reliability, expected_calibration_error, reliability
from moe.evaluation.collect import Encoder, Outcome, Sink, collect
from moe.evaluation.metrics import accuracy, confusion_matrix, macro_f1, per_class_f1
from moe.evaluation.oos import CRITERIA, operating_point, rejection
from moe.evaluation.sources import SplitSource, tenant_sources
from moe.inference import (
    AUTO,
    DEFAULT_OOS_SCORE,
    OOS_SCORES,
    UNSURE_MARGIN,
    GateSettings,
    check_oos_rule,
    load_mixture,
    read_gate_settings,
)
from moe.model import Mixture
from moe.trunk import Trunk


@dataclass
class Evaluation:
    metrics: dict[str, float | str] = field(default_factory=dict)
    per_tenant: list[dict] = field(default_factory=list)  # one row per (split, tenant)
    confusion: dict[str, torch.Tensor] = field(default_factory=dict)  # split -> (t, t) routing confusion
    reliability: dict[str, Reliability] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    threshold: float | None = None
    score: str = DEFAULT_OOS_SCORE  # the kind of out-of-scope score the threshold applies to
    unsure_margin: float = UNSURE_MARGIN  # routed answers list the experts within this gate-logit margin as runners-up
    tenants: list[str] = field(default_factory=list)
    oos_compare: list[dict] = field(default_factory=list)  # every score kind x criterion, each chosen alike


def in_scope_metrics(model: Mixture, outcome: Outcome, split: str, bins: int = 15) -> dict[str, float]:
    s = outcome.in_scope
    label, routed, given = outcome.label[s], outcome.routed[s], outcome.given[s]
    correct = routed == label
    n_labels = len(model.labels)
    return {
        f"{split}/acc_routed": accuracy(routed, label),
        f"{split}/acc_tenant_given": accuracy(given, label),
        f"{split}/routing_acc": accuracy(outcome.routed_tenant[s], outcome.tenant[s]),
        f"{split}/macro_f1": macro_f1(routed, label, n_labels),
        f"{split}/macro_f1_tenant_given": macro_f1(given, label, n_labels),
        f"{split}/ece": expected_calibration_error(outcome.confidence[s], correct, bins),
        f"{split}/queries": float(len(outcome)),
        f"{split}/out_of_scope_queries": float((~s).sum().item()),
        f"{split}/queries_per_s": len(outcome) / max(outcome.model_seconds, 1e-9),  # gate + experts, features given
        f"{split}/queries_per_s_with_encoding": len(outcome)
        / max(outcome.model_seconds + outcome.encode_seconds, 1e-9),
        f"{split}/encode_s": outcome.encode_seconds,
    }


def per_tenant_rows(model: Mixture, outcome: Outcome, split: str, threshold: float | None, score: str) -> list[dict]:
    f1, _ = per_class_f1(outcome.routed[outcome.in_scope], outcome.label[outcome.in_scope], len(model.labels))
    index = {name: i for i, name in enumerate(model.tenants)}
    label_tenant = torch.tensor([index[tenant] for tenant, _ in model.labels])  # (labels,) owner of each label
    rows = []
    for t, name in enumerate(model.tenants):
        mask = outcome.tenant == t
        if not mask.any():
            continue
        label = outcome.label[mask]
        own = (label_tenant == t).nonzero().squeeze(1)
        row = {
            "split": split,
            "tenant": name,
            "queries": int(mask.sum()),
            "acc_routed": accuracy(outcome.routed[mask], label),
            "acc_tenant_given": accuracy(outcome.given[mask], label),
            "routing_acc": accuracy(outcome.routed_tenant[mask], outcome.tenant[mask]),
            "macro_f1": 100.0 * f1[own].mean().item(),
        }
        if threshold is not None:
            kept = outcome.oos_scores[score][mask].double() >= threshold
            row["acc_in_scope_with_rejection"] = (
                100.0 * ((outcome.routed[mask] == label) & kept).sum().item() / len(kept)
            )
            row["rejected"] = 100.0 * (~kept).sum().item() / len(kept)
        rows.append(row)
    return rows


MAX_UNSURE = 5.0  # percent of in-scope validation queries whose routed answers may list runners-up


def choose_unsure_margin(outcome: Outcome, max_unsure: float = MAX_UNSURE) -> float:
    """The gate-logit margin within which an answer lists runners-up: the largest that flags at most `max_unsure`
    percent of this outcome's in-scope queries (a store's gate is as confident as its rows make it)."""
    margins = outcome.gate_margin[outcome.in_scope].double().sort().values
    k = int(len(margins) * max_unsure / 100.0)
    if len(margins) == 0:
        return UNSURE_MARGIN
    return float(margins[k]) if k < len(margins) else float("inf")  # margins strictly below it: at most k


def unsure_metrics(outcome: Outcome, split: str, unsure_margin: float) -> dict[str, float]:
    """How many in-scope answers list runners-up, and how many of the misrouted ones do (percent; NaN: none)."""
    s = outcome.in_scope
    unsure = outcome.gate_margin[s].double() < unsure_margin  # exactly the answers whose `runners_up` is not empty
    misrouted = outcome.routed_tenant[s] != outcome.tenant[s]
    share = lambda flags: 100.0 * flags.double().mean().item() if len(flags) else float("nan")  # noqa: E731
    return {f"{split}/unsure": share(unsure), f"{split}/misrouted_unsure": share(unsure[misrouted])}


def oos_metrics(outcome: Outcome, split: str, score: str, threshold: float) -> dict[str, float]:
    s = outcome.in_scope
    values = outcome.oos_scores[score]
    r = rejection(values[s], outcome.routed[s] == outcome.label[s], values[~s], threshold)
    return {f"{split}/{name}": value for name, value in r._asdict().items()}


def choose_threshold(outcome: Outcome, score: str, criterion: str, max_cost: float = 1.0) -> tuple[float, float]:
    """The threshold on `score` that meets `criterion` on this outcome's queries, and the criterion's value."""
    s = outcome.in_scope
    values = outcome.oos_scores[score]
    return operating_point(values[s], outcome.routed[s] == outcome.label[s], values[~s], criterion, max_cost)


def choose_score(outcome: Outcome, criterion: str, max_cost: float = 1.0) -> tuple[str, float]:
    """The kind of out-of-scope score whose own best threshold meets `criterion` best on this outcome's queries
    (ties: the first in `OOS_SCORES`), and that threshold."""
    points = {kind: choose_threshold(outcome, kind, criterion, max_cost) for kind in OOS_SCORES}
    kind = max(points, key=lambda k: points[k][1])  # max keeps the first of equal values
    return kind, points[kind][0]


def evaluate_mixture(
    model: Mixture,
    sources: Mapping[str, SplitSource],
    encode: Encoder,
    batch_size: int,
    oos_score: str = AUTO,
    criterion: str = "in_scope_cost",
    max_cost: float = 1.0,
    threshold: float | None = None,
    threshold_split: str = "val",
    compare_scores: bool = False,
    unsure_margin: float | None = None,
    bins: int = 15,
    sink: Callable[[str], Sink] | None = None,
) -> Evaluation:
    """Every split of `sources`; an out-of-scope threshold (unless given) is chosen on `threshold_split` when it
    has out-of-scope queries, and applied to every split that has them. `oos_score="auto"` chooses the kind of
    score there too: the one whose threshold meets `criterion` best (`choose_score`); the choice is `oos/score` in
    the metrics. The runners-up margin (unless given) is chosen on `threshold_split` too (`choose_unsure_margin`).
    `compare_scores` adds, for every kind of out-of-scope score and every criterion, the same choice and measurement
    (`oos_compare`). `sink(split)` may return a callback that sees each batch's routed results."""
    check_oos_rule(oos_score, threshold)
    result = Evaluation(tenants=list(model.tenants))
    for split, source in sources.items():
        outcome = collect(
            model, source.batches(batch_size), encode, f"evaluating {split}", source.size, sink(split) if sink else None
        )
        result.outcomes[split] = outcome
        result.metrics |= in_scope_metrics(model, outcome, split, bins)
        s = outcome.in_scope
        result.confusion[split] = confusion_matrix(outcome.tenant[s], outcome.routed_tenant[s], len(model.tenants))
        result.reliability[split] = reliability(outcome.confidence[s], outcome.routed[s] == outcome.label[s], bins)
    with_oos = [split for split, outcome in result.outcomes.items() if (~outcome.in_scope).any()]
    chosen_on = threshold_split if threshold_split in with_oos else None
    _choose_oos(result, with_oos, chosen_on, oos_score, threshold, criterion, max_cost)
    _choose_unsure(result, threshold_split, unsure_margin)
    if compare_scores and chosen_on:
        for kind in OOS_SCORES:
            for rule in CRITERIA:
                cut = choose_threshold(result.outcomes[chosen_on], kind, rule, max_cost)[0]
                row = {"score": kind, "criterion": rule, "threshold": cut, "chosen_on": chosen_on}
                for split in with_oos:
                    row |= oos_metrics(result.outcomes[split], split, kind, cut)
                result.oos_compare.append(row)
    for split, outcome in result.outcomes.items():
        result.per_tenant += per_tenant_rows(model, outcome, split, result.threshold, result.score)
    return result


def _choose_oos(
    result: Evaluation,
    with_oos: list[str],
    chosen_on: str | None,
    score: str,
    threshold: float | None,
    criterion: str,
    max_cost: float,
) -> None:
    """The out-of-scope score and threshold: as given, or chosen on `chosen_on`; measured on `with_oos`."""
    score_chosen = score == AUTO
    origin = chosen_on if threshold is None else None  # where the threshold (and an `auto` score) is chosen
    if origin is not None:
        if score_chosen:
            score, threshold = choose_score(result.outcomes[origin], criterion, max_cost)
        else:
            threshold = choose_threshold(result.outcomes[origin], score, criterion, max_cost)[0]
    result.score = DEFAULT_OOS_SCORE if score == AUTO else score  # AUTO left: nothing to choose on, no threshold
    if threshold is None:
        return
    result.threshold = threshold
    result.metrics |= {"oos/threshold": threshold, "oos/score": result.score}
    if origin is not None:
        result.metrics |= {"oos/criterion": criterion, "oos/max_cost": max_cost, "oos/chosen_on": origin}
        result.metrics["oos/score_chosen_on"] = origin if score_chosen else "given"
    else:
        result.metrics["oos/chosen_on"] = "given"
    for split in with_oos:
        result.metrics |= oos_metrics(result.outcomes[split], split, result.score, threshold)


def _choose_unsure(result: Evaluation, split: str, unsure_margin: float | None) -> None:
    """The runners-up margin: as given, else chosen on `split`'s in-scope queries, else the default; measured on
    every split."""
    if unsure_margin is not None:
        result.unsure_margin, origin = unsure_margin, "given"
    elif split in result.outcomes and result.outcomes[split].in_scope.any():
        result.unsure_margin, origin = choose_unsure_margin(result.outcomes[split]), split
        result.metrics["routing/max_unsure"] = MAX_UNSURE
    else:
        result.unsure_margin, origin = UNSURE_MARGIN, "default"
    result.metrics |= {"routing/unsure_margin": result.unsure_margin, "routing/unsure_chosen_on": origin}
    for name, outcome in result.outcomes.items():
        result.metrics |= unsure_metrics(outcome, name, result.unsure_margin)


def evaluate_store(
    store_dir: str | Path,
    tenants: Sequence[Tenant],
    splits: Sequence[str],
    encode: Encoder,
    batch_size: int,
    gate_file: str | Path | None = None,
    trunk_fingerprint: str | None = None,
    trunk: Trunk | None = None,
) -> Evaluation:
    """The training run's own evaluation: its tenants' latest shards, paged, on its in-memory splits. `trunk`: the
    trunk pathway experts adapt (`load_mixture`)."""
    gate = read_gate_settings(gate_file) if gate_file and Path(gate_file).is_file() else GateSettings()
    model = load_mixture(store_dir, [t.name for t in tenants], gate, trunk_fingerprint, trunk=trunk)
    return evaluate_mixture(model, tenant_sources(tenants, splits), encode, batch_size)
