"""Macro-F1, per-class F1, the confusion matrix and ECE (torchmetrics underneath) against figures worked out by hand,
including the edge cases where libraries differ: classes that never occur or are never predicted, and confidences
exactly on a bin edge or at 1."""

from __future__ import annotations

import math

import pytest
import torch

from moe.evaluation.calibration import expected_calibration_error, reliability
from moe.evaluation.metrics import confusion_matrix, macro_f1, per_class_f1

PREDICTED = torch.tensor([0, 0, 1, 1, 2, 2, 2])
TARGET = torch.tensor([0, 1, 1, 1, 2, 2, 0])
# class 0: 1 hit, 2 predicted, 2 true -> F1 = 2*1/(2+2) = 1/2
# class 1: 2 hits, 2 predicted, 3 true -> 4/5;  class 2: 2 hits, 3 predicted, 2 true -> 4/5
# macro = (1/2 + 4/5 + 4/5) / 3 = 7/10


def test_macro_f1_by_hand():
    assert macro_f1(PREDICTED, TARGET, num_classes=3) == pytest.approx(70.0)
    # classes 3 and 4 occur neither as a target nor as a prediction: left out of the mean, not counted as 0
    assert macro_f1(PREDICTED, TARGET, num_classes=5) == pytest.approx(70.0)
    f1, present = per_class_f1(PREDICTED, TARGET, num_classes=5)
    assert f1.tolist() == pytest.approx([0.5, 0.8, 0.8, 0, 0]) and present.tolist() == [True] * 3 + [False] * 2
    assert macro_f1(PREDICTED, TARGET, 5, classes=torch.tensor([1, 2, 4])) == pytest.approx(80.0)
    assert math.isnan(macro_f1(PREDICTED, TARGET, 5, classes=torch.tensor([3, 4])))


def test_a_class_never_predicted_counts_as_zero_and_one_never_true_too():
    # class 2 is true once and never predicted: F1 0; class 1: 1 hit, 2 predicted, 1 true -> 2/3
    assert macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 4) == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    # class 3 is predicted once and never true: F1 0, and it is in the mean
    assert macro_f1(torch.tensor([0, 3]), torch.tensor([0, 0]), 4) == pytest.approx(100 * (2 / 3 + 0) / 2)


def test_no_examples_and_a_single_class():
    none = torch.tensor([], dtype=torch.long)
    assert math.isnan(macro_f1(none, none, 3))
    assert per_class_f1(none, none, 3)[0].tolist() == [0, 0, 0]
    assert confusion_matrix(none, none, 2).tolist() == [[0, 0], [0, 0]]
    assert math.isnan(expected_calibration_error(torch.tensor([]), torch.tensor([], dtype=torch.bool)))
    one = torch.tensor([0, 0])  # a one-tenant mixture routes everything to its only tenant
    assert confusion_matrix(one, one, 1).tolist() == [[2]] and macro_f1(one, one, 1) == 100


def test_confusion_matrix_rows_are_true_columns_predicted():
    assert confusion_matrix(TARGET, PREDICTED, 4).tolist() == [[1, 0, 1, 0], [1, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]


def test_ece_bins_hold_their_upper_edge_and_one_joins_the_last_bin():
    # 2 bins (0, .5] and (.5, 1]: .5 (wrong) is in the first: 1/2 * |0 - .5| + 1/2 * |1 - .6| = .45
    # (with [0, .5), [.5, 1) it would share a bin with .6: |1/2 - .55| = .05)
    assert expected_calibration_error(torch.tensor([0.5, 0.6]), torch.tensor([False, True]), bins=2) == pytest.approx(
        45.0
    )
    # 1.0 shares the last of 15 bins with .95: |1/2 - .975| = .475 (in a bin of its own: 1/2 * 1 + 1/2 * .05 = .525)
    assert expected_calibration_error(torch.tensor([1.0, 0.95]), torch.tensor([False, True])) == pytest.approx(47.5)
    # 4 bins; .25 | .3 .5 | .55 .75 | .8 with right/wrong as below:
    # 1/6 * |0 - .25| + 2/6 * |1/2 - .4| + 2/6 * |1 - .65| + 1/6 * |0 - .8| = (.25 + .2 + .7 + .8) / 6 = .325
    confidence = torch.tensor([0.25, 0.3, 0.5, 0.55, 0.75, 0.8])
    correct = torch.tensor([False, True, False, True, True, False])
    assert expected_calibration_error(confidence, correct, bins=4) == pytest.approx(32.5)
    assert reliability(confidence, correct, bins=4).count.tolist() == [1, 2, 2, 1]


def test_ece_is_what_the_reliability_plot_shows():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(5000, generator=g) ** 0.3
    correct = torch.rand(5000, generator=g) < confidence**0.5  # underconfident...
    confidence[:200], correct[:100] = 1.0, False  # ...but for some sure and wrong: a bin's errors of both signs
    r = reliability(confidence, correct)
    by_bins = 100 * ((r.count / r.count.sum()) * (r.accuracy - r.confidence).abs()).sum().item()
    assert expected_calibration_error(confidence, correct) == pytest.approx(by_bins, abs=1e-9)
    assert by_bins == pytest.approx(11.959, abs=1e-3)  # torchmetrics with a bin of its own for 1: 12.274
