"""What an evaluation or an export reads, from its Hydra config: the trained store with the trunk and gate
settings of the run that made it, and the data to measure on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file

from moe.evaluation.collect import Encoder
from moe.evaluation.sources import SplitSource, TenantFile, clinc150_sources, file_sources, tenant_sources
from moe.paths import cache_dir
from moe.serving.loading import GateSettings, read_gate_settings
from moe.serving.trunks import encode_texts
from moe.trunk import FeatureCache, Trunk

DEFAULT_TRUNK = {"_target_": "moe.trunk.HFEncoderTrunk", "folder": None, "max_length": None, "freeze": True}


@dataclass
class TrainedStore:
    store_dir: Path
    run_dir: Path | None  # the training run's folder (config.yaml, gate.safetensors, trunk.safetensors), if found
    run_config: DictConfig | None
    trunk: Trunk  # frozen; with the run's trained weights when it trained its trunk
    trained_trunk: bool
    gate: GateSettings
    batch_size: int


def open_trained_store(cfg: DictConfig) -> TrainedStore:
    """`cfg.store_dir` (required); the run folder is `cfg.run_dir` or the store's parent when that holds a
    config.yaml. Trunk: `cfg.trunk` when chosen, else the run's. Top-k: `cfg.top_k` when set, else the run's gate
    file, else its config. Routing: the gate rows stored in each shard, or with `routing=stats` (the lifecycle's
    statistics gate) rows derived from each shard's statistics. Batch size: `cfg.batch_size`, else the run's
    `data.eval_batch_size` (the same batches give the same figures to the last bit)."""
    if not cfg.get("store_dir"):
        raise ValueError("store_dir is required: the experts folder of a training run (e.g. outputs/clinc150/experts)")
    store_dir = Path(cfg.store_dir)
    if not store_dir.is_dir():
        raise FileNotFoundError(f"store_dir {store_dir} is not a folder")
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else store_dir.parent
    run_config = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if cfg.get("run_dir") and run_config is None:
        raise FileNotFoundError(f"run_dir {run_dir} holds no config.yaml")
    trunk_cfg = cfg.get("trunk") or (run_config.get("trunk") if run_config else None) or DEFAULT_TRUNK
    trunk: Trunk = instantiate(trunk_cfg)
    trained = run_config is not None and (run_dir / "trunk.safetensors").is_file()
    if trained:
        trunk.load_state_dict(load_file(run_dir / "trunk.safetensors"))
    trunk.freeze()
    gate_file = run_dir / "gate.safetensors"
    if gate_file.is_file():
        gate = read_gate_settings(gate_file)
    elif run_config is not None:
        gate = GateSettings(int(run_config.gate.top_k), bool(run_config.gate.normalize_weights))
    else:
        gate = GateSettings()
    if cfg.get("top_k"):
        gate = replace(gate, top_k=int(cfg.top_k))
    if cfg.get("routing") and cfg.routing.kind == "stats":  # conf/routing/stats.yaml, as the lifecycle routes
        gate = replace(gate, routing="stats", shrinkage=float(cfg.routing.shrinkage))
    run_batch = OmegaConf.select(run_config, "data.eval_batch_size") if run_config is not None else None
    batch_size = int(cfg.get("batch_size") or run_batch or cfg.data.eval_batch_size)
    return TrainedStore(store_dir, run_dir if run_config else None, run_config, trunk, trained, gate, batch_size)


def feature_encoder(trunk: Trunk, cache_root: str | Path | None = None, use_cache: bool = True) -> Encoder:
    """Features through the on-disk `FeatureCache` (each text encoded once per trunk) when the trunk is frozen,
    else straight from the trunk, 64 texts at a time."""
    if use_cache and trunk.frozen:
        return FeatureCache(Path(cache_root or cache_dir()) / "features", trunk).encode
    return lambda texts: encode_texts(trunk, texts)


def _target(node) -> str:
    return str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""


def sources_from_config(data: DictConfig, splits: Sequence[str]) -> dict[str, SplitSource]:
    """CLINC150 (`data=clinc150`, with its out-of-scope queries), tenant files (`data=tenant_files`, streamed row
    by row), or any other tenant list the data config instantiates (held in memory)."""
    tenants = data.tenants
    if _target(tenants).endswith("clinc150_tenants"):
        return clinc150_sources(splits, tenants.get("folder"), tenants.get("domains"))
    if isinstance(tenants, ListConfig) and all(_target(t).endswith("read_tenant_file") for t in tenants):
        entries = [
            TenantFile(
                str(t.name),
                OmegaConf.to_container(t.files) if isinstance(t.files, DictConfig) else str(t.files),
                t.get("text_column", "text"),
                t.get("label_column", "label"),
                t.get("split_column"),
            )
            for t in tenants
        ]
        return file_sources(entries, splits)
    return tenant_sources(list(instantiate(tenants, _convert_="all")), splits)
