"""Batch evaluation of a mixture: streamed sources, per-query outcomes, metrics (accuracy routed and with the
tenant given, macro-F1, routing and its confusion, out-of-scope rejection, calibration, throughput) and reports."""

from moe.evaluation.collect import Outcome, collect
from moe.evaluation.evaluate import Evaluation, evaluate_mixture, evaluate_store
from moe.evaluation.metrics import accuracy
from moe.evaluation.sources import Query, SplitSource, tenant_sources

__all__ = [
    "Evaluation",
    "Outcome",
    "Query",
    "SplitSource",
    "accuracy",
    "collect",
    "evaluate_mixture",
    "evaluate_store",
    "tenant_sources",
]
