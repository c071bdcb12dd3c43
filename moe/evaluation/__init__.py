"""Batch evaluation of a mixture: streamed sources, per-query outcomes, metrics (accuracy routed and with the
tenant given, macro-F1, routing and its confusion, out-of-scope rejection, calibration, throughput) and reports."""

from moe.evaluation.evaluate import Evaluation, evaluate_mixture, evaluate_store
from moe.evaluation.sources import Query, SplitSource, TenantFile

__all__ = ["Evaluation", "Query", "SplitSource", "TenantFile", "evaluate_mixture", "evaluate_store"]
