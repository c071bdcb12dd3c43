"""What an evaluation or an export reads, from its Hydra config: the trained store with its own trunk and the gate
settings of the run that made it (when its record is beside it), and the data to measure on."""

from __future__ import annotations

import logging
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
from moe.store.trunks import serving_trunk
from moe.trunk import FeatureCache, Trunk

log = logging.getLogger(__name__)
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
    """`cfg.store_dir` (required), opened from the store alone; the run folder (`cfg.run_dir`, or the store's parent
    when that holds a config.yaml) is a record of the run, read for its settings when it is there. Trunk: `cfg.trunk`
    when chosen, else the store's own (`serving_trunk`: what training, growth or an upgrade recorded). Top-k:
    `cfg.top_k` when set, else the run's gate file, else its config, else the defaults. Routing rows
    (`routing=trained|statistics`): the gate rows stored in each shard, or rows derived from each shard's statistics
    (the lifecycle's statistics gate). Batch size: `cfg.batch_size`, else the run's `data.eval_batch_size` (the same
    batches give the same figures to the last bit)."""
    if not cfg.get("store_dir"):
        raise ValueError("store_dir is required: the experts folder of a training run (e.g. outputs/clinc150/experts)")
    store_dir = Path(cfg.store_dir)
    if not store_dir.is_dir():
        raise FileNotFoundError(f"store_dir {store_dir} is not a folder")
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else store_dir.parent
    run_config = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if cfg.get("run_dir") and run_config is None:
        raise FileNotFoundError(f"run_dir {run_dir} holds no config.yaml")
    if cfg.get("trunk"):  # chosen: with the run's trained weights when they are beside it, as before
        trunk, trained = run_trunk(cfg.trunk, run_dir, run_config)
    else:
        trunk, trained = serving_trunk(store_dir, lambda: old_format_trunk(store_dir, run_dir, run_config))
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


def run_trunk(trunk_cfg: DictConfig | None, run_dir: Path, run_config: DictConfig | None) -> tuple[Trunk, bool]:
    """The trunk `trunk_cfg` names (None: the one the run's config.yaml names, else the default), with the run's
    trained weights when its trunk.safetensors is beside its config; frozen."""
    trunk = instantiate(trunk_cfg or (run_config.get("trunk") if run_config else None) or DEFAULT_TRUNK)
    trained = run_config is not None and (run_dir / "trunk.safetensors").is_file()
    if trained:
        trunk.load_state_dict(load_file(run_dir / "trunk.safetensors"))
    return trunk.freeze(), trained


def old_format_trunk(store_dir: Path, run_dir: Path, run_config: DictConfig | None) -> tuple[Trunk, bool]:
    """OLD FORMAT, the one fallback: a store trained before training recorded its trunk in the store
    (`moe.store.trunks`) has only its run's config.yaml to name it (or, away from its run, the default trunk)."""
    log.warning("%s records no trunk (trained before stores recorded it): the run's config names it", store_dir)
    return run_trunk(None, run_dir, run_config)


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
