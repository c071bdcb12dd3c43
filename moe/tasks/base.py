"""Hydra glue shared by the entry points: instantiating a group of named components, starting an experiment's run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """A config group of named components (loggers, callbacks): instantiate each; None or an empty group gives none."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def start_run(cfg: DictConfig) -> Path:
    """An experiment's start: every seed set from `cfg.seed`, its output folder made, its resolved config saved there
    (`config.yaml`); returns the folder."""
    import lightning as L

    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    return out
