"""`run(cfg)`: scripts/wake.py, from a composed conf/lifecycle.yaml."""

from __future__ import annotations

from omegaconf import DictConfig

from moe.tasks.lifecycle import open_store, tenant_name


def run(cfg: DictConfig) -> None:
    """scripts/wake.py."""
    name = tenant_name(cfg)
    open_store(cfg).wake(name)
