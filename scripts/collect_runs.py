"""Collect the jobs of a multirun folder: one CSV row per job (its overrides and metrics), an aligned table sorted
by a metric, and `metric_vs_params.png` with the metric against each swept parameter.

python scripts/collect_runs.py outputs/clinc150/multiruns/2026-11-27_10-00-00
python scripts/collect_runs.py DIR --metric val/acc_routed --out DIR/summary.csv

A job is a folder with `metrics.json` or `.hydra/overrides.yaml`; a job without metrics (failed, still running)
is listed with empty metrics. Overrides come from `.hydra/overrides.yaml`, else from the job's `config.yaml`
(flattened). The parameters of the table and plot are those whose value differs between jobs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

Row = dict[str, Any]


def job_dirs(root: Path) -> list[Path]:
    """Folders under `root` that hold a job: metrics.json or Hydra's .hydra/overrides.yaml, in job order."""
    found = {p.parent for p in root.rglob("metrics.json")}
    found |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    return sorted(found, key=lambda d: [int(s) if s.isdigit() else s for s in d.relative_to(root).parts])


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    if isinstance(node, dict) and node:
        return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def read_overrides(job: Path) -> dict[str, str]:
    """`key=value` overrides of a job (`+`/`~` prefixes dropped), else every key of its config.yaml."""
    path = job / ".hydra" / "overrides.yaml"
    if path.is_file():
        items = (line.split("=", 1) for line in yaml.safe_load(path.read_text()) or [])
        return {key.lstrip("+~"): value[0] if value else "" for key, *value in items}
    config = job / "config.yaml"
    if config.is_file():
        flat = flatten(yaml.safe_load(config.read_text()))
        return {k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in flat.items()}
    return {}


def collect(root: Path) -> tuple[list[Row], list[str], list[str]]:
    """Rows (job, overrides, metrics), the override columns and the metric columns."""
    rows, params, metrics = [], {}, {}
    for job in job_dirs(root):
        overrides = read_overrides(job)
        path = job / "metrics.json"
        values = json.loads(path.read_text()) if path.is_file() else {}
        params |= dict.fromkeys(overrides)
        metrics |= dict.fromkeys(sorted(values))
        rows.append({"job": str(job.relative_to(root)), **overrides, **values})
    return rows, list(params), list(metrics)


def swept(rows: list[Row], params: list[str]) -> list[str]:
    """Parameters whose value is not the same in every job, but where each job writes (its own folders)."""
    return [p for p in params if len({str(row.get(p)) for row in rows}) > 1 and not is_folder(p)]


def is_folder(param: str) -> bool:
    """Whether a parameter names where a job writes: `paths.*` and `*_dir` keys (e.g. `logger.wandb.save_dir`)."""
    return param.startswith("paths.") or param.endswith("_dir")


def as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def sort_rows(rows: list[Row], metric: str, ascending: bool) -> list[Row]:
    def key(row: Row) -> tuple[bool, float]:
        value = as_number(row.get(metric))
        if value is None or math.isnan(value):
            return True, 0.0  # jobs without the metric go last
        return False, value if ascending else -value

    return sorted(rows, key=key)


def write_csv(rows: list[Row], columns: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def cell(value: Any) -> str:
    if value is None:
        return ""
    number = as_number(value)
    if isinstance(value, float) or (number is not None and "." in str(value)):
        return f"{number:.4g}"  # 0.0074133097 -> 0.007413; integers stay whole
    return str(value)


def format_table(rows: list[Row], columns: list[str]) -> str:
    table = [columns, *[[cell(row.get(c)) for c in columns] for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in table)


def plot(rows: list[Row], params: list[str], metric: str, path: Path) -> None:
    """One subplot per parameter: numbers on a number axis (log when they span 10x or more), others as categories."""
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False, sharey=True)
    for ax, param in zip(axes[0], params, strict=True):
        points = [(row.get(param), as_number(row.get(metric))) for row in rows]
        points = [(x, y) for x, y in points if y is not None and not math.isnan(y)]
        numbers = [as_number(x) for x, _ in points]
        if points and all(n is not None for n in numbers):
            ax.scatter(numbers, [y for _, y in points])
            if min(numbers) > 0 and max(numbers) >= 10 * min(numbers):
                ax.set_xscale("log")
        else:
            categories = sorted({str(x) for x, _ in points})
            ax.scatter([categories.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
            ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_xlabel(param)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun folder (hydra.sweep.dir)")
    parser.add_argument("--metric", default="test/acc_routed", help="sort and plot by this metric")
    parser.add_argument("--out", type=Path, help="CSV path (default DIR/summary.csv)")
    parser.add_argument("--ascending", action="store_true", help="lower is better (default: higher)")
    args = parser.parse_args()

    rows, params, metrics = collect(args.dir)
    if not rows:
        raise SystemExit(f"no runs under {args.dir}: expected job folders holding metrics.json or .hydra/")
    if args.metric not in metrics:
        raise SystemExit(f"no job under {args.dir} has metric {args.metric!r}; found: {', '.join(metrics)}")
    rows = sort_rows(rows, args.metric, args.ascending)
    varying = swept(rows, params)

    out = args.out or args.dir / "summary.csv"
    write_csv(rows, ["job", *params, *metrics], out)
    print(format_table(rows, ["job", *varying, args.metric]))
    plot(rows, varying or ["job"], args.metric, args.dir / "metric_vs_params.png")
    print(f"\n{len(rows)} jobs; wrote {out} and {args.dir / 'metric_vs_params.png'}")


if __name__ == "__main__":
    main()
