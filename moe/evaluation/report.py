"""Writing an evaluation down: metrics.json, a per-tenant CSV, plots, and (optionally) every prediction."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from moe.evaluation.collect import Sink
from moe.evaluation.evaluate import Evaluation
from moe.evaluation.plots import reliability_plot, routing_confusion_plot
from moe.evaluation.sources import Query
from moe.inference import UNSURE_MARGIN, Decoded, answers
from moe.model import Mixture


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_metrics(metrics: dict, path: Path) -> Path:
    """JSON with NaN written as null (strict JSON has no NaN)."""
    path.write_text(json.dumps({k: _finite(v) for k, v in metrics.items()}, indent=2, sort_keys=True) + "\n")
    return path


def write_rows(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})
    return path


def write_confusion(confusion: torch.Tensor, tenants: list[str], path: Path) -> Path:
    """Counts: a row per query tenant, a column per tenant of the gate's top expert."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tenant \\ routed to", *tenants])
        for name, row in zip(tenants, confusion.tolist(), strict=True):
            writer.writerow([name, *row])
    return path


def write_plots(evaluation: Evaluation, folder: Path) -> dict[str, Path]:
    plots = {}
    for split, confusion in evaluation.confusion.items():
        write_confusion(confusion, evaluation.tenants, folder / f"routing_confusion_{split}.csv")
        plots[f"{split}/routing_confusion"] = routing_confusion_plot(
            confusion, evaluation.tenants, folder / f"routing_confusion_{split}.png", f"routing confusion, {split}"
        )
        plots[f"{split}/reliability"] = reliability_plot(
            evaluation.reliability[split],
            float(evaluation.metrics[f"{split}/ece"]),
            folder / f"reliability_{split}.png",
            f"reliability, {split}",
        )
    return plots


def write_report(evaluation: Evaluation, folder: str | Path, extra: dict | None = None) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": write_metrics(evaluation.metrics | (extra or {}), folder / "metrics.json"),
        "per_tenant": write_rows(evaluation.per_tenant, folder / "per_tenant.csv"),
    }
    if evaluation.oos_compare:
        files["oos_compare"] = write_rows(evaluation.oos_compare, folder / "oos_compare.csv")
    return files | write_plots(evaluation, folder)


class PredictionWriter:
    """Every routed prediction as a JSON line (`predictions_<split>.jsonl`): the answer serving would give, and
    the query's text and truth. The out-of-scope score and flag, and the runners-up, are filled in by `finish`, once
    the rules are chosen; until then lines go to a `.partial` file, one at a time, with every kind of score."""

    def __init__(self, folder: str | Path, model: Mixture):
        self.folder, self.model = Path(folder), model
        self.partials: list[Path] = []

    def __call__(self, split: str) -> Sink:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"predictions_{split}.jsonl.partial"
        path.write_text("")
        self.partials.append(path)

        def sink(batch: list[Query], decoded: Decoded, scores: dict[str, torch.Tensor]) -> None:
            kinds, values = list(scores), torch.stack(list(scores.values()), dim=1).tolist()  # (b, kinds)
            with path.open("a") as handle:
                listed = answers(self.model, decoded, unsure_margin=float("inf"))  # runners-up kept until `finish`
                gaps = [[g for g in row[1:] if math.isfinite(g)] for row in decoded.gate_gaps.tolist()]
                for query, answer, row, gap in zip(batch, listed, values, gaps, strict=True):
                    record = answer.to_dict() | {"oos_scores": dict(zip(kinds, row, strict=True)), "text": query.text}
                    record["gate_gaps"] = gap  # of each runner-up listed
                    record |= {"true_tenant": query.tenant, "true_intent": query.label}
                    handle.write(json.dumps(record) + "\n")

        return sink

    def finish(self, score: str, threshold: float | None, unsure_margin: float = UNSURE_MARGIN) -> list[Path]:
        done = []
        for partial in self.partials:
            final = partial.with_suffix("")
            with partial.open() as source, final.open("w") as target:
                for line in source:
                    record = json.loads(line)
                    record["oos_score"] = record.pop("oos_scores")[score]
                    gaps = record.pop("gate_gaps")  # as `runners_up` keeps them: within the margin
                    record["runners_up"] = [
                        r for r, g in zip(record["runners_up"], gaps, strict=True) if g < unsure_margin
                    ]
                    record["out_of_scope"] = None if threshold is None else record["oos_score"] < threshold
                    target.write(json.dumps(record) + "\n")
            partial.unlink()
            done.append(final)
        return done
