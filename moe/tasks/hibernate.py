"""`run(cfg)`: scripts/hibernate.py, from a composed conf/lifecycle.yaml."""

from __future__ import annotations

from omegaconf import DictConfig

from moe.tasks.lifecycle import open_store, tenant_name


def run(cfg: DictConfig) -> None:
    """scripts/hibernate.py."""
    name = tenant_name(cfg)
    open_store(cfg).hibernate(name)
