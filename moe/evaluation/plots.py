"""Figures of an evaluation: the routing confusion between tenants and the reliability diagram."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from moe.evaluation.calibration import Reliability  # noqa: E402


def tenant_matrix_plot(
    values: np.ndarray,
    tenants: list[str],
    path: Path,
    title: str,
    colorbar: str,
    cmap: str,
    fmt: str,
    dark: Callable[[float], bool],
    axes: tuple[str, str] | None = None,
    limits: tuple[float, float] | None = None,
) -> Path:
    """A tenant x tenant matrix: NaN cells blank, the others annotated with `fmt` (up to 30 tenants), in white
    where `dark(value)`; `axes` names the columns and rows."""
    size = max(4.0, 0.5 * len(tenants) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    vmin, vmax = limits or (None, None)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(tenants)), tenants, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(tenants)), tenants, fontsize=8)
    if axes:
        ax.set_xlabel(axes[0])
        ax.set_ylabel(axes[1])
    ax.set_title(title)
    if len(tenants) <= 30:
        for (row, col), value in np.ndenumerate(values):
            if not np.isnan(value):
                color = "white" if dark(value) else "black"
                ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def routing_confusion_plot(confusion: torch.Tensor, tenants: list[str], path: Path, title: str) -> Path:
    """Rows: the query's tenant; columns: the tenant of the gate's top expert; cells: share of the row (percent)."""
    share = 100.0 * confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    values = share.masked_fill(confusion == 0, float("nan")).numpy()  # cells no query reached stay blank
    axes = ("routed to (top expert's tenant)", "query's tenant")
    return tenant_matrix_plot(
        values, tenants, path, title, "% of the tenant's queries", "Blues", ".0f", lambda v: v > 50, axes, (0, 100)
    )


def reliability_plot(r: Reliability, ece: float, path: Path, title: str) -> Path:
    """Accuracy per confidence bin against the diagonal of perfect calibration; bar width = bin width."""
    edges = r.edges.numpy()
    width = edges[1:] - edges[:-1]
    filled = (r.count > 0).numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    top.bar(
        edges[:-1][filled],
        100 * r.accuracy.numpy()[filled],
        width[filled],
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    top.plot([0, 1], [0, 100], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy (%)")
    top.set_title(f"{title} (ECE {ece:.2f} %)")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], r.count.numpy(), width, align="edge", color="gray")
    bottom.set_yscale("symlog")
    bottom.set_xlabel("confidence (combined score of the prediction)")
    bottom.set_ylabel("queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
