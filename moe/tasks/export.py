"""`run(cfg)`: a trained store -> a serving bundle under `paths.output_dir` (scripts/export.py calls this).

The float32 model is evaluated first (its out-of-scope threshold chosen on validation only); a lower-precision
bundle is evaluated again from its own rewritten shards, and the accuracy it costs is printed and recorded in
the manifest.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe.evaluation.evaluate import Evaluation, evaluate_mixture
from moe.inference import UNSURE_MARGIN, check_oos_rule, load_mixture
from moe.inference.answers import resolve_oos_rule
from moe.store.bundle import (
    check_target,
    clear_target,
    publish_bundle,
    staging_folder,
    write_bundle_manifest,
    write_files,
)
from moe.tasks.base import task
from moe.tasks.inputs import feature_encoder, open_trained_store, sources_from_config

log = logging.getLogger(__name__)

COST_KEYS = (
    "acc_routed",
    "acc_tenant_given",
    "routing_acc",
    "macro_f1",
    "ece",
    "oos_recall",
    "oos_precision",
    "acc_in_scope_with_rejection",
)


def accuracy_cost(full: Evaluation, lowered: Evaluation, dtype: str) -> dict[str, Any]:
    """Each metric in float32 and in `dtype`, and the points lost (float32 - dtype); plus how many routed
    predictions changed."""
    cost: dict[str, Any] = {"reference": "float32", "dtype": dtype, "metrics": {}}
    for key, value in full.metrics.items():
        if key.split("/")[-1] in COST_KEYS and key in lowered.metrics:
            cost["metrics"][key] = {"float32": value, dtype: lowered.metrics[key], "cost": value - lowered.metrics[key]}
    for split, outcome in full.outcomes.items():
        changed = (outcome.routed != lowered.outcomes[split].routed).sum().item()
        cost[f"{split}/changed_predictions"] = changed
        cost[f"{split}/changed_predictions_pct"] = 100.0 * changed / len(outcome)
    return cost


@task
def run(cfg: DictConfig) -> dict[str, Any]:
    """The bundle of `store_dir` in `paths.output_dir`: a folder away from the store and its run (checked first)."""
    out = Path(cfg.paths.output_dir)
    if cfg.get("store_dir"):
        check_target(out, cfg.store_dir, cfg.get("run_dir") or Path(cfg.store_dir).parent)
    dtype = cfg.export.dtype
    trained = open_trained_store(cfg)
    trunk = trained.trunk
    names = list(cfg.tenants) if cfg.get("tenants") else None
    model = load_mixture(trained.store_dir, names, trained.gate, trunk.fingerprint, trunk=trunk)
    check_oos_rule(cfg.oos.score, cfg.oos.threshold)  # what is given checked before a file is written (or cleared)
    sources = sources_from_config(cfg.data, list(cfg.export.splits)) if cfg.export.measure else {}
    if not cfg.export.overwrite:
        clear_target(out, overwrite=False)  # refuses a folder holding a bundle, before anything is written
    staging = staging_folder(out)  # written whole there, moved into `out` at the end: an export fails leaving none
    try:
        manifest = _export(cfg, out, staging, trained, trunk, model, sources, dtype)
        publish_bundle(staging, out, cfg.export.overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"bundle": str(out), "dtype": dtype, "trunk": cfg.export.trunk, "experts": len(model.keys)}
    summary["threshold"] = manifest["gate"]["oos"]["threshold"]
    if precision := manifest.get("precision"):
        summary["accuracy_cost"] = {k: round(v["cost"], 4) for k, v in precision["metrics"].items()}
        summary |= {k: v for k, v in precision.items() if k.endswith("changed_predictions")}
    print(json.dumps(summary, indent=2))
    log.info("exported %s", json.dumps(summary))
    return manifest


def _export(cfg, out: Path, staging: Path, trained, trunk, model, sources, dtype: str) -> dict[str, Any]:
    """The bundle of `model`, written into `staging` (the same files as in `out`), evaluated first; its manifest."""
    files, trunk_entry = write_files(
        staging, trained.store_dir, model, trunk, dtype, cfg.export.trunk, trained.trained_trunk, cfg.export.overwrite
    )
    encode = feature_encoder(trunk, cfg.paths.get("cache_dir"), cfg.cache_features and not trained.trained_trunk)
    settings = dict(
        oos_score=cfg.oos.score,
        criterion=cfg.oos.criterion,
        max_cost=cfg.oos.max_cost,
        threshold=cfg.oos.threshold,
        threshold_split=cfg.oos.threshold_split,
    )
    full = evaluate_mixture(model, sources, encode, trained.batch_size, **settings) if sources else None
    bundled, precision = full, None
    if dtype != "float32" and full is not None:  # the bundle's own shards, as serving will load them
        keys = [t for t, _ in model.keys]
        lowered = load_mixture(staging / "experts", keys, trained.gate, trunk.fingerprint, trunk=trunk)
        settings["oos_score"] = full.score  # the score float32 chose: the cost compares like with like
        bundled = evaluate_mixture(lowered, sources, encode, trained.batch_size, **settings)
        precision = accuracy_cost(full, bundled, dtype)
    threshold = bundled.threshold if bundled else cfg.oos.threshold
    chosen = threshold is not None and cfg.oos.threshold is None
    score = resolve_oos_rule(cfg.oos.score, cfg.oos.threshold)[0]  # unmeasured: nothing to choose on
    oos = {
        "score": bundled.score if bundled else score,
        "score_chosen_on": (full.metrics.get("oos/score_chosen_on") if full else None) or "given",
        "threshold": threshold,
        "criterion": cfg.oos.criterion if chosen else "given",
        "max_cost": cfg.oos.max_cost,
        "chosen_on": cfg.oos.threshold_split if chosen else None,
    }
    return write_bundle_manifest(
        staging,
        files,
        model,
        trunk_entry,
        dtype,
        oos,
        trained.gate,
        bundled.unsure_margin if bundled else UNSURE_MARGIN,
        evaluation={
            "batch_size": trained.batch_size,
            "metrics": bundled.metrics if bundled else {},
            "float32_metrics": full.metrics if full else {},
        },
        precision=precision,
        config={
            "export": OmegaConf.to_container(cfg, resolve=True),
            "training": OmegaConf.to_container(trained.run_config, resolve=True) if trained.run_config else None,
        },
    )
