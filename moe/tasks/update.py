"""`run(cfg)`: scripts/update.py, from a composed conf/lifecycle.yaml."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moe.lifecycle.stream import scan_tenant_file
from moe.tasks.lifecycle import build_lifecycle, open_store, tenant_file, tenant_name, training_data


def run(cfg: DictConfig) -> Path:
    """scripts/update.py: a new version of a tenant's expert, from its new file (`allow_dormant=true`: even while
    it hibernates)."""
    name = tenant_name(cfg)
    store = open_store(cfg)
    store.latest(name)  # a KeyError for a tenant that is unknown, or retired
    allow_dormant = bool(cfg.get("allow_dormant", False))
    if not allow_dormant:
        store.check_awake(name)
    entry = tenant_file(cfg, name)
    scanned = scan_tenant_file(entry)
    lifecycle = build_lifecycle(cfg, store)
    tenant, encoded = training_data(entry, scanned, lifecycle)
    return lifecycle.update(tenant, allow_dormant=allow_dormant, encoded=encoded)
