"""`run(cfg)`: evaluate a trained store or an exported bundle from a composed Hydra config, write metrics.json,
per_tenant.csv and plots under `paths.output_dir`, and log them. scripts/evaluate.py and tests call this."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe.evaluation.evaluate import Evaluation, evaluate_mixture
from moe.evaluation.report import PredictionWriter, write_report
from moe.inference import AUTO, load_mixture, open_bundle
from moe.tasks.base import instantiate_group
from moe.tasks.inputs import feature_encoder, open_trained_store, sources_from_config

log = logging.getLogger(__name__)


def log_evaluation(loggers: list[Any], cfg: DictConfig, evaluation: Evaluation, files: dict[str, Path]) -> None:
    """Numbers as metrics; with wandb also the plots as images and the per-tenant rows as a table."""
    from lightning.pytorch.loggers import WandbLogger

    numbers = {k: v for k, v in evaluation.metrics.items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        logger.log_metrics(numbers)
        if isinstance(logger, WandbLogger):
            for key, path in files.items():
                if path.suffix == ".png":
                    logger.log_image(key=f"plots/{key}", images=[str(path)])
            for name, rows in (("per_tenant", evaluation.per_tenant), ("oos_compare", evaluation.oos_compare)):
                if rows:
                    columns = list(dict.fromkeys(k for row in rows for k in row))
                    logger.log_table(name, columns, [[row.get(c) for c in columns] for row in rows])
            logger.experiment.finish()
        else:
            logger.save()


def run(cfg: DictConfig) -> dict[str, float | str]:
    """A store (`store_dir`, trained with the run's trunk and gate settings) or a bundle (`bundle_dir`, checked and
    loaded as serving loads it), on the configured data's splits."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = int(float(cfg.budget_mb) * 2**20)
    if cfg.get("bundle_dir"):
        bundle = open_bundle(cfg.bundle_dir, cfg.device, budget)
        model, trunk = bundle.model, bundle.trunk
        # as served by default: the bundle's score and threshold; a score named in `oos` replaces the bundle's rule
        score = bundle.oos_score if cfg.oos.score == AUTO else cfg.oos.score
        own = bundle.threshold if score == bundle.oos_score else None  # chosen on threshold_split when not its own
        threshold = own if cfg.oos.threshold is None else cfg.oos.threshold
        unsure_margin: float | None = bundle.unsure_margin  # and its runners-up margin
        made_with = (bundle.bundle.manifest.get("evaluation") or {}).get("batch_size")
        batch_size = int(cfg.batch_size or made_with or cfg.data.eval_batch_size)
        source = {"bundle_dir": str(cfg.bundle_dir)}
    else:
        trained = open_trained_store(cfg)
        trunk, batch_size, threshold, score = trained.trunk, trained.batch_size, cfg.oos.threshold, cfg.oos.score
        unsure_margin = None  # chosen on val
        names = list(cfg.tenants) if cfg.get("tenants") else None
        model = load_mixture(trained.store_dir, names, trained.gate, trunk.fingerprint, cfg.device, budget, trunk=trunk)
        source = {"store_dir": str(trained.store_dir), "run_dir": str(trained.run_dir) if trained.run_dir else None}
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    # a trunk trained with the experts is run directly, as training evaluated it
    use_cache = cfg.cache_features and not (cfg.get("bundle_dir") is None and trained.trained_trunk)
    encode = feature_encoder(trunk, cfg.paths.get("cache_dir"), use_cache)
    writer = PredictionWriter(out, model) if cfg.write_predictions else None
    evaluation = evaluate_mixture(
        model,
        sources_from_config(cfg.data, list(cfg.splits)),
        encode,
        batch_size,
        oos_score=score,
        criterion=cfg.oos.criterion,
        max_cost=cfg.oos.max_cost,
        threshold=threshold,
        threshold_split=cfg.oos.threshold_split,
        compare_scores=cfg.oos.compare,
        unsure_margin=unsure_margin,
        sink=writer,
    )
    if writer is not None:
        writer.finish(evaluation.score, evaluation.threshold, evaluation.unsure_margin)
    evaluation.metrics |= {"eval/batch_size": batch_size, "eval/top_k": model.router.top_k}
    bridged = {t: fp for t, fp in model.expert_trunks.items() if fp != trunk.fingerprint}  # experts of older trunks
    evaluation.metrics |= {"trunk/fingerprint": trunk.fingerprint, "trunk/bridged_experts": len(bridged)}
    if bridged:
        log.info("experts on older trunk versions, through bridges: %s", {t: fp[:12] for t, fp in bridged.items()})
    if OmegaConf.select(cfg, "reference.joint_linear"):  # the joint linear reference, on the same features
        from moe.evaluation.reference import store_reference_metrics

        evaluation.metrics |= store_reference_metrics(cfg.data, model.labels, encode, list(cfg.splits))
    files = write_report(evaluation, out)
    log_evaluation(instantiate_group(cfg.get("logger")), cfg, evaluation, files)
    log.info("evaluated %s: %s", source, json.dumps(evaluation.metrics, sort_keys=True))
    return evaluation.metrics
