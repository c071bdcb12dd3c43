"""`run(cfg)`: scripts/retire.py, from a composed conf/lifecycle.yaml."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moe.tasks.lifecycle import open_store, tenant_name


def run(cfg: DictConfig) -> Path | None:
    """scripts/retire.py: the tenant's folder moved to `archive_dir` (its new place returned), or deleted (null)."""
    name = tenant_name(cfg)
    store = open_store(cfg)
    if cfg.archive_dir:
        return store.archive(name, cfg.archive_dir)
    store.delete(name)
    return None
