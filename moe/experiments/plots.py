"""Plots of a continual run: the accuracy matrix as heatmaps, and accuracy over events."""

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
