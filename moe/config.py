"""Hydra glue shared by the entry points: instantiating a group of named components."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """A config group of named components (loggers, callbacks): instantiate each; None or an empty group gives none."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]
