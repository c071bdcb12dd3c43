"""`run(cfg)`: scripts/adapt_trunk.py, from a composed conf/adapt_trunk.yaml (see `moe.tasks.upgrade`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moe.lifecycle.adapt import AdaptConfig, adapt_trunk
from moe.store import TrunkVersions
from moe.tasks.base import instantiate_group
from moe.tasks.lifecycle import current_trunk, open_store
from moe.tasks.upgrade import awake_tenants

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """A new trunk version, recorded in `store_dir` (not served until an upgrade moves the store onto it)."""
    store = open_store(cfg)
    tenants = awake_tenants(store, cfg.tenants)
    if not tenants:
        raise ValueError("adapting a trunk needs the files of at least one awake tenant (tenants=[...])")
    trunk = current_trunk(store, cfg.trunk)
    versions = TrunkVersions(store.root)
    versions.record(trunk)
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    adapted, metrics = adapt_trunk(trunk, tenants, AdaptConfig(**cfg.adapt), loggers)
    note = cfg.note or f"adapted on {', '.join(t.name for t in tenants)}"
    versions.record(adapted, parent=trunk.fingerprint, note=note, weights=True)
    summary = {"fingerprint": adapted.fingerprint, "parent": trunk.fingerprint, "tenants": [t.name for t in tenants]}
    summary |= metrics
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapt.json").write_text(json.dumps(summary, indent=1) + "\n")
    for logger in loggers:
        logger.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.finalize("success")
    log.info("new trunk version %s… (from %s…): %s", adapted.fingerprint[:12], trunk.fingerprint[:12], metrics)
    return summary
