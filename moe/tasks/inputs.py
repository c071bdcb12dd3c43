"""What an evaluation or an export reads, from its Hydra config: the trained store with the trunk and gate
settings of the run that made it, and the data to measure on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from moe.evaluation.collect import Encoder
from moe.evaluation.sources import SplitSource, tenant_sources
from moe.inference import GateSettings, read_gate_settings
from moe.paths import cache_dir
from moe.store import TrunkVersions
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
    config.yaml. Trunk: `cfg.trunk` when chosen, else the store's current trunk version (after an upgrade), else the
    run's. Top-k: `cfg.top_k` when set, else the run's gate
    file, else its config. Routing rows (`routing=trained|statistics`): the gate rows stored in each shard, or rows
    derived from each shard's statistics (the lifecycle's statistics gate). Batch size: `cfg.batch_size`, else the run's
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
    versions = TrunkVersions(store_dir)
    if not cfg.get("trunk") and (current := versions.current()) is not None:  # an upgraded store's trunk version
        trunk, trained = versions.rebuild(current), bool(versions.describe(current).get("weights"))
    else:
        trunk_cfg = cfg.get("trunk") or (run_config.get("trunk") if run_config else None) or DEFAULT_TRUNK
        trunk = instantiate(trunk_cfg)
        trained = run_config is not None and (run_dir / "trunk.safetensors").is_file()
        if trained:
            trunk.load_state_dict(load_file(run_dir / "trunk.safetensors"))
        trunk.freeze()
    gate_file = run_dir / "gate.safetensors"
    if gate_file.is_file():
        gate = read_gate_settings(gate_file)
    elif run_config is not None:  # a training run's config names its gate; a scenario's its top_k
        top_k = OmegaConf.select(run_config, "gate.top_k") or OmegaConf.select(run_config, "top_k") or 2
        normalize = OmegaConf.select(run_config, "gate.normalize_weights", default=True)
        gate = GateSettings(int(top_k), bool(normalize))
    else:  # a store no run wrote (grown by scripts/grow.py, or written by a program): the defaults
        gate = GateSettings()
    if cfg.get("top_k"):
        gate = replace(gate, top_k=int(cfg.top_k))
    ran = OmegaConf.select(run_config, "routing") if run_config is not None else None
    if ran is not None and ran.get("source") == cfg.routing.source:  # as the run routed, unless told otherwise
        gate = gate.with_routing(ran)
    gate = gate.with_routing(cfg.routing)
    run_batch = OmegaConf.select(run_config, "data.eval_batch_size") if run_config is not None else None
    batch_size = int(cfg.get("batch_size") or run_batch or cfg.data.eval_batch_size)
    return TrainedStore(store_dir, run_dir if run_config else None, run_config, trunk, trained, gate, batch_size)


def feature_encoder(trunk: Trunk, cache_root: str | Path | None = None, use_cache: bool = True) -> Encoder:
    """Features through the on-disk `FeatureCache` (each text encoded once per trunk) when the trunk is frozen,
    else straight from the trunk, 64 texts at a time."""
    if use_cache and trunk.frozen:
        return FeatureCache(Path(cache_root or cache_dir()) / "features", trunk).encode
    return trunk.encode


def sources_from_config(data: DictConfig, splits: Sequence[str]) -> dict[str, SplitSource]:
    """The data config's `queries` (called with the splits: CLINC150 with its out-of-scope queries, tenant files
    streamed row by row), else its tenants, held in memory."""
    if data.get("queries") is not None:
        return instantiate(data.queries)(list(splits))
    return tenant_sources(list(instantiate(data.tenants, _convert_="all")), splits)
