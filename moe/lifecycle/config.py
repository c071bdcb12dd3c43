"""Building a Lifecycle from a composed `conf/lifecycle.yaml` (what the scripts in scripts/ call)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from moe.data import Tenant, read_tenant_file
from moe.lifecycle.growth import GrowthConfig
from moe.lifecycle.operations import Lifecycle
from moe.paths import cache_dir
from moe.store import ExpertStore
from moe.trunk import FeatureCache, Trunk


def growth_config(cfg: DictConfig) -> GrowthConfig:
    """`growth` with the routing group's settings (`routing.rows` says where a new expert's rows come from)."""
    routing = {k: v for k, v in cfg.routing.items() if k in GrowthConfig.__dataclass_fields__}
    return GrowthConfig(**cfg.growth, **routing, routing=cfg.routing.rows)


def build_lifecycle(cfg: DictConfig) -> Lifecycle:
    trunk: Trunk = instantiate(cfg.trunk)
    if not trunk.frozen:
        raise ValueError("lifecycle operations need a frozen trunk (the one the store's experts were trained on)")
    root = Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else cache_dir()
    return Lifecycle(
        ExpertStore(cfg.store_dir), trunk, FeatureCache(root / "features", trunk).encode, growth_config(cfg)
    )


def tenant_from_config(cfg: DictConfig) -> Tenant:
    spec = cfg.tenant
    if not spec.files:
        raise ValueError("this operation needs the tenant's data: set tenant.files=PATH (CSV or JSONL)")
    files = dict(spec.files) if isinstance(spec.files, DictConfig) else spec.files
    return read_tenant_file(spec.name, files, spec.text_column, spec.label_column, spec.split_column)
