"""Figures of an evaluation: the routing confusion between tenants and the reliability diagram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from moe.evaluation.calibration import Reliability  # noqa: E402


def routing_confusion_plot(confusion: torch.Tensor, tenants: list[str], path: Path, title: str) -> Path:
    """Rows: the query's tenant; columns: the tenant of the gate's top expert; cells: share of the row (percent)."""
    share = 100.0 * confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.5 * len(tenants) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(tenants)), tenants, rotation=60, ha="right")
    ax.set_yticks(range(len(tenants)), tenants)
    ax.set_xlabel("routed to (top expert's tenant)")
    ax.set_ylabel("query's tenant")
    ax.set_title(title)
    if len(tenants) <= 30:
        for i in range(len(tenants)):
            for j in range(len(tenants)):
                if confusion[i, j]:
                    color = "white" if share[i, j] > 50 else "black"
                    ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="% of the tenant's queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
