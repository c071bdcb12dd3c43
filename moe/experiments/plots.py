"""Plots of the experiments: a continual run's accuracy matrix as heatmaps and accuracy over events; learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def accuracy_heatmaps(matrices: dict[str, list[list[float]]], events: list[str], tenants: list[str], path: Path):
    fig, axes = plt.subplots(1, len(matrices), figsize=(5 + 4 * len(matrices), 0.35 * len(events) + 2.5))
    for ax, (title, matrix) in zip(np.atleast_1d(axes), matrices.items(), strict=True):
        values = np.array(matrix, dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), vmin=80, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(tenants)), tenants, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(events)), events, fontsize=8)
        ax.set_title(f"{title} accuracy (%) after each event")
        for (row, col), value in np.ndenumerate(values):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=6, color="w")
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_over_events(
    curves: dict[str, list[float]], events: list[str], path: Path, references: dict[str, float] | None = None
) -> Path:
    """One curve per entry of `curves`; each of `references` (e.g. the joint linear reference on the final
    tenants) a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(events)), 4))
    for name, values in curves.items():
        ax.plot(range(len(events)), values, marker="o", label=name)
    for i, (name, value) in enumerate((references or {}).items(), start=len(curves)):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{i % 10}", label=f"{name} ({value:.1f})")
    ax.set_xticks(range(len(events)), events, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean accuracy over tenants seen (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curves(table: list[dict], path: Path) -> Path:
    """Accuracy against examples per intent, one line per method with its spread over draws (min to max of the
    draws' means), tenant given and routed side by side. `table`: rows of {method, k ("all" or a number), given,
    given_min, given_max, routed, ...}."""
    ks = sorted({row["k"] for row in table}, key=lambda k: (k == "all", int(k) if k != "all" else 0))
    position = {k: i for i, k in enumerate(ks)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, field, title in (
        (axes[0], "given", "tenant given"),
        (axes[1], "routed", "routed (the new tenant's queries)"),
    ):
        for i, method in enumerate(dict.fromkeys(row["method"] for row in table)):
            rows = sorted(
                (r for r in table if r["method"] == method and not np.isnan(r[field])), key=lambda r: position[r["k"]]
            )
            if not rows:
                continue
            x = [position[r["k"]] for r in rows]
            ax.plot(x, [r[field] for r in rows], marker="o", color=f"C{i}", label=method)
            ax.fill_between(
                x, [r[f"{field}_min"] for r in rows], [r[f"{field}_max"] for r in rows], color=f"C{i}", alpha=0.15
            )
        ax.set_xticks(range(len(ks)), ks)
        ax.set_xlabel("train examples per intent")
        ax.set_title(f"{title} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (%), mean over report domains")
    axes[0].legend(fontsize=8)  # every method (the probe has no routed line)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
