"""`run(cfg)`: scripts/overlap.py, the overlap report (`moe.lifecycle.overlap`) from a composed conf/overlap.yaml."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moe.lifecycle.overlap import OverlapReport, overlap_report, write_overlap_report
from moe.tasks.lifecycle import open_store


def run(cfg: DictConfig) -> tuple[OverlapReport, dict[str, Path]]:
    """scripts/overlap.py: the report of the store at `store_dir`, written under `paths.output_dir`."""
    report = overlap_report(
        open_store(cfg),
        shrinkage=float(cfg.shrinkage),
        min_confusion=float(cfg.min_confusion),
        top=cfg.top,
        within=bool(cfg.within),
    )
    return report, write_overlap_report(report, cfg.paths.output_dir)
