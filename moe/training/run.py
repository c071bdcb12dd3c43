"""`train(cfg)`: the whole training run from a composed Hydra config. Scripts and tests call this."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from moe.data import Tenant, TenantDataModule
from moe.evaluation import evaluate_store
from moe.model import ExpertInfo, build_mixture
from moe.model.stats import class_statistics
from moe.paths import cache_dir
from moe.serving.trunks import encode_texts
from moe.store import ExpertStore, expert_shards, save_gate
from moe.training.module import MixtureClassifier
from moe.trunk import FeatureCache, Trunk

log = logging.getLogger(__name__)


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """A config group of named components (loggers, callbacks): instantiate each; None gives none."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def build_data(cfg: DictConfig, trunk: Trunk) -> TenantDataModule:
    tenants: list[Tenant] = list(instantiate(cfg.data.tenants, _convert_="all"))
    encoder = None
    if trunk.frozen:
        root = Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else cache_dir()
        encoder = FeatureCache(root / "features", trunk).encode
    return TenantDataModule(tenants, encoder, cfg.data.batch_size, cfg.data.eval_batch_size)


def build_classifier(cfg: DictConfig, tenants: list[Tenant], trunk: Trunk) -> MixtureClassifier:
    model = build_mixture(
        [ExpertInfo(t.name, t.labels) for t in tenants],
        trunk.dim,
        gate_rows=cfg.gate.rows,
        top_k=cfg.gate.top_k,
        normalize_weights=cfg.gate.normalize_weights,
        rank=cfg.expert.rank,
        dropout=cfg.expert.dropout,
        input_scale=cfg.expert.input_scale,
    )
    return MixtureClassifier(
        model,
        tenants,
        trunk=None if trunk.frozen else trunk,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        gate_weight=1.0 if cfg.gate.supervised else 0.0,
        routed_weight=cfg.gate.routed_weight,
        load_balance_weight=cfg.gate.load_balance_weight,
        z_loss_weight=cfg.gate.z_loss_weight,
    )


@torch.no_grad()
def training_statistics(data: TenantDataModule, trunk: Trunk) -> dict[str, dict[str, torch.Tensor]]:
    """Class means, counts and scatter of each tenant's training features, for its shard."""
    train = data.datasets["train"]
    features = train.features if train.features is not None else trunk.eval()(train.texts)
    return {
        tenant.name: class_statistics(features[train.tenant == t], train.label[train.tenant == t], len(tenant.labels))
        for t, tenant in enumerate(data.tenants)
    }


def train(cfg: DictConfig) -> dict[str, float]:
    """Train gate and experts, test them, and write config, shards, gate and metrics under `paths.output_dir`."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    trunk: Trunk = instantiate(cfg.trunk)
    data = build_data(cfg, trunk)
    data.setup()
    classifier = build_classifier(cfg, data.tenants, trunk)

    loggers: list[Logger] = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=_instantiate_group(cfg.get("callbacks"))
    )
    if trainer.is_global_zero:
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    trainer.fit(classifier, datamodule=data)
    train_s = time.perf_counter() - start
    val = trainer.validate(classifier, datamodule=data, verbose=False)[0]
    test = trainer.test(classifier, datamodule=data, verbose=False)[0]

    metrics = {**val, **test, "time/encode_s": data.encode_seconds, "time/train_s": train_s}
    metrics |= {"data/tenants": len(data.tenants), "data/train_examples": len(data.datasets["train"])}
    if trainer.is_global_zero:
        fingerprint = trunk.fingerprint
        store = ExpertStore(cfg.paths.experts_dir)
        run_metrics = {t.name: test for t in data.tenants}  # recorded in each shard's metadata
        for tensors, meta in expert_shards(
            classifier.model, fingerprint, training_statistics(data, trunk), run_metrics
        ):
            path = store.save(tensors, meta)
            log.info("saved expert %s v%d to %s", meta.tenant, meta.version, path)
        save_gate(out / "gate.safetensors", classifier.model, fingerprint)
        if not trunk.frozen:  # the trunk trained with the experts: keep the weights their shards were made on
            save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, out / "trunk.safetensors")
        # val/* and test/* as scripts/evaluate.py computes them: the shards just written, paged, same batches
        encoder = data.encoder or (lambda texts: encode_texts(trunk.eval(), texts))
        splits = [split for split in ("val", "test") if len(data.datasets[split])]
        metrics |= evaluate_store(
            store.root, data.tenants, splits, encoder, cfg.data.eval_batch_size, out / "gate.safetensors", fingerprint
        ).metrics
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for logger in loggers:
        logger.log_metrics({k: v for k, v in metrics.items() if k.startswith(("time/", "data/"))})
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics
