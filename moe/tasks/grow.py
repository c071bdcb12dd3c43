"""`run(cfg)`: scripts/grow.py, from a composed conf/lifecycle.yaml."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moe.lifecycle.stream import scan_tenant_file
from moe.tasks.lifecycle import build_lifecycle, open_store, tenant_file, tenant_name, training_data


def run(cfg: DictConfig) -> Path:
    """scripts/grow.py: a new tenant's expert from its file, into `store_dir` (`create_store=true`: a new store)."""
    name = tenant_name(cfg)
    store = open_store(cfg, create=bool(cfg.get("create_store", False)))
    store.check_new_tenant(name)
    entry = tenant_file(cfg, name)
    scanned = scan_tenant_file(entry)  # every row checked, before the trunk loads
    lifecycle = build_lifecycle(cfg, store)
    return lifecycle.grow(*training_data(entry, scanned, lifecycle))
