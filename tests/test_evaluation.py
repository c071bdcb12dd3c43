"""Evaluation: the training run's figures are scripts/evaluate.py's to the last digit; metrics, calibration and the
out-of-scope threshold on toy cases computed by hand; sources stream files row by row."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from moe.data import Example, Tenant, TenantDataError, TenantFile
from moe.evaluation.calibration import expected_calibration_error, reliability
from moe.evaluation.collect import collect
from moe.evaluation.metrics import confusion_matrix, macro_f1
from moe.evaluation.oos import operating_point, rejection
from moe.evaluation.sources import Query, file_queries, tenant_sources
from moe.model import ExpertInfo, build_mixture
from tests.helpers import THRESHOLD, THRESHOLD_SCORE, compose_config, synthetic_data

FIGURES = ("acc_routed", "acc_tenant_given", "routing_acc", "macro_f1", "macro_f1_tenant_given", "ece")


@pytest.mark.slow  # builds the session's tiny run
@pytest.mark.subprocess  # its evaluation is scripts/evaluate.py's
def test_evaluate_script_reproduces_the_training_figures_exactly(tiny_run):
    trained = json.loads((tiny_run.run / "metrics.json").read_text())
    evaluated = json.loads((tiny_run.evaluation / "metrics.json").read_text())
    for split in ("val", "test"):
        for figure in FIGURES:
            key = f"{split}/{figure}"
            assert evaluated[key] == trained[key], key  # equal, not approximately
    assert 50 < trained["test/acc_routed"] < 100, "a run that is neither perfect nor chance makes equality telling"
    assert evaluated["oos/threshold"] == THRESHOLD and evaluated["eval/top_k"] == 2


@pytest.mark.slow  # builds the session's tiny run
@pytest.mark.subprocess  # its evaluation is scripts/evaluate.py's
def test_evaluating_a_bundle_keeps_its_rule_unless_oos_names_another(tiny_run, tmp_path):
    from moe.tasks import evaluate

    common = [*synthetic_data(tmp_path / "data"), f"bundle_dir={tiny_run.bundle}", "logger=none", "splits=[test]"]
    own = evaluate.run(compose_config("evaluate", common, tmp_path / "own"))
    assert (own["oos/score"], own["oos/threshold"]) == (THRESHOLD_SCORE, THRESHOLD)
    named = evaluate.run(
        compose_config("evaluate", [*common, "oos.score=max_score", "oos.threshold=0.3"], tmp_path / "x")
    )
    assert (named["oos/score"], named["oos/threshold"]) == ("max_score", 0.3)


def test_evaluate_script_writes_per_tenant_rows_plots_and_an_offline_wandb_run(tiny_run):
    with (tiny_run.evaluation / "per_tenant.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["split"], r["tenant"]) for r in rows] == [
        (s, t) for s in ("val", "test") for t in ("bank", "music", "weather")
    ]
    assert all(int(r["queries"]) == 16 for r in rows)
    for name in ("routing_confusion_test.png", "reliability_test.png", "routing_confusion_val.png"):
        assert (tiny_run.evaluation / name).stat().st_size > 1000
    assert list((tiny_run.evaluation / "wandb").glob("offline-run-*")), "no offline wandb run"
    lines = (tiny_run.evaluation / "predictions_test.jsonl").read_text().splitlines()
    assert len(lines) == 48 and {"tenant", "intent", "score", "out_of_scope", "experts"} <= set(json.loads(lines[0]))


def test_expected_calibration_error_by_hand():
    confidence = torch.tensor([0.1, 0.4, 0.45, 0.9, 0.95])
    correct = torch.tensor([False, True, False, True, True])
    # 2 bins: (0, .5] holds .1 .4 .45 (mean .3167, 1/3 right); (.5, 1] holds .9 .95 (mean .925, all right)
    # ECE = 3/5 * |1/3 - 0.95/3| + 2/5 * |1 - .925| = .01 + .03 = .04
    assert expected_calibration_error(confidence, correct, bins=2) == pytest.approx(4.0)
    r = reliability(confidence, correct, bins=2)
    assert r.count.tolist() == [3, 2] and r.accuracy[1] == 1
    assert expected_calibration_error(torch.tensor([0.0, 1.0]), torch.tensor([False, True]), bins=10) == 0


def test_threshold_selection_by_hand():
    in_score = torch.tensor([0.9, 0.8, 0.6, 0.3])
    in_correct = torch.tensor([True, True, True, False])
    oos_score = torch.tensor([0.2, 0.5, 0.7])
    # a cut c rejects the scores below it:        .2   .3   .5   .6   .7   .8   .9   above all
    #   in-scope accuracy with rejection (%)      75   75   75   75   50   50   25   0
    #   out-of-scope recall (%)                    0   33   33   67   67  100  100   100
    #   queries right (of 7)                       3    4    4    5    4    5    4    3
    # thresholds lie midway between the chosen cut and the score below it
    cases = {
        ("sum", 1.0): 0.75,  # 50 + 100 is the largest sum
        ("overall", 1.0): 0.55,  # 5 right, first reached at .6
        ("in_scope_cost", 0.0): 0.55,  # accuracy must stay 75: the most recall is 67, at .6
        ("in_scope_cost", 25.0): 0.75,  # accuracy may fall to 50: recall 100 at .8
    }
    for (criterion, cost), expected in cases.items():
        threshold, _ = operating_point(in_score, in_correct, oos_score, criterion, cost)
        assert threshold == pytest.approx(expected), criterion
    r = rejection(in_score, in_correct, oos_score, 0.75)
    assert r.oos_recall == 100 and r.acc_in_scope_with_rejection == 50
    assert r.oos_precision == pytest.approx(60) and r.in_scope_rejected == 50  # 3 of the 5 rejected are out of scope
    # rejecting is never worth it: the lowest cut, which rejects nothing
    never = (torch.tensor([0.1, 0.2]), torch.tensor([True, True]), torch.tensor([0.8]))
    for criterion in ("sum", "overall", "in_scope_cost"):
        assert rejection(*never, operating_point(*never, criterion)[0]).in_scope_rejected == 0
    with pytest.raises(ValueError, match="criterion"):
        operating_point(in_score, in_correct, oos_score, criterion="nonsense")


def test_macro_f1_and_confusion_by_hand():
    predicted, target = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 2])
    # F1: class 0 = 2*1/(2+1) = 2/3, class 1 = 2*1/(1+2) = 2/3, class 2 = 1; class 3 never occurs
    assert macro_f1(predicted, target, num_classes=4) == pytest.approx(100 * 7 / 9)
    assert confusion_matrix(target, predicted, 3).tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_tenant_files_are_read_row_by_row(tmp_path):
    path = tmp_path / "acme.csv"
    path.write_text("text,label,split\nhello there,greet,test\nbye now,leave,test\n,greet,test\n")
    queries = file_queries([TenantFile("acme", str(path), split_column="split")], "test")
    assert next(queries) == Query("hello there", "acme", "greet", f"{path}, row 2")
    assert next(queries).label == "leave"  # read before the bad row is reached
    with pytest.raises(TenantDataError, match=r"acme.csv, row 4: blank text"):
        next(queries)


def test_out_of_scope_queries_never_share_a_batch_with_in_scope_ones():
    tenant = Tenant("t", ("a", "b"), {"test": [Example(f"q{i}", "ab"[i % 2]) for i in range(5)]})
    with_oos = tenant_sources([tenant], ["test"], {"test": ["x", "y", "z"]})["test"]
    without = tenant_sources([tenant], ["test"])["test"]
    batches = list(with_oos.batches(4))
    assert [[q.tenant is None for q in b] for b in batches] == [[False] * 4, [False], [True] * 3]
    assert batches[:2] == list(without.batches(4)) and with_oos.size == 8


def test_a_label_the_expert_lacks_is_named_with_its_source():
    model = build_mixture([ExpertInfo("t", ("a", "b"))], dim=8, rank=4)
    batch = [Query("hello", "t", "zzz", "acme.csv, row 7")]
    with pytest.raises(TenantDataError, match=r"acme.csv, row 7: label 'zzz' is not a label of tenant 't'"):
        collect(model, [batch], lambda texts: torch.zeros(len(texts), 8))
    with pytest.raises(KeyError, match=r"unknown tenant 'nobody'; known tenants: \['t'\]"):
        collect(model, [[Query("hi", "nobody", "a")]], lambda texts: torch.zeros(len(texts), 8))
