"""`run(cfg)`: the trunk-upgrade experiment (`moe.experiments.trunk_upgrade`) from a composed
conf/trunk_upgrade.yaml."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe.data import read_tenant_file
from moe.experiments.trunk_upgrade import (
    Encoder,
    batch1_latency_ms,
    group_metrics,
    keep_old_trunk,
    parameter_bytes,
    store_bytes,
    tenant_figures,
    write_tenant_files,
)
from moe.inference import GateSettings, PagedMixture, load_mixture
from moe.lifecycle.adapt import AdaptConfig, adapt_trunk
from moe.lifecycle.operations import Lifecycle
from moe.lifecycle.upgrade import upgrade_store
from moe.paths import cache_dir
from moe.store import ExpertStore, TrunkVersions
from moe.tasks.base import start_run
from moe.tasks.lifecycle import growth_config
from moe.trunk import FeatureCache, Trunk

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, float]:
    out = start_run(cfg)
    split, gate = cfg.eval_split, GateSettings(cfg.top_k).with_routing(cfg.routing)
    tenants = {t.name: t for t in instantiate(cfg.data.tenants, _convert_="all")}
    names = sorted(tenants)
    dormant = sorted(cfg.dormant)
    if unknown := [n for n in dormant if n not in tenants]:
        raise KeyError(f"dormant names unknown tenants {unknown}; known: {names}")
    awake = [n for n in names if n not in dormant]
    if "keep" in cfg.strategies and "bridge" not in cfg.strategies:
        raise ValueError("strategy keep is measured on the bridged store: list bridge too (strategies=[bridge, keep])")
    everyone = [tenants[n] for n in names]
    metrics: dict[str, float] = {}

    # 1. every tenant grown on the shipped trunk, from its own file
    files = write_tenant_files(everyone, out / "data")
    old_trunk: Trunk = instantiate(cfg.trunk)
    root = Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else cache_dir()
    old_encode = FeatureCache(root / "features", old_trunk).encode
    store = ExpertStore(out / "experts")
    growth = growth_config(cfg)
    lifecycle = Lifecycle(store, old_trunk, old_encode, growth)
    start = time.perf_counter()
    for name in names:
        lifecycle.grow(read_tenant_file(name, files[name], split_column="split"))
    metrics["time/grow_all_s"] = time.perf_counter() - start
    old_model = load_mixture(store, names, gate, old_trunk.fingerprint)  # every expert on the shipped trunk
    figures = {"old": tenant_figures(old_model, everyone, old_encode, split)}
    metrics |= group_metrics(figures["old"], awake, dormant, "old")

    # 2. the dormant tenants hibernate, and their data files are deleted
    for name in dormant:
        lifecycle.hibernate(name)
        files.pop(name).unlink()

    # 3. a new trunk version, adapted on the awake tenants' files
    awake_data = [read_tenant_file(n, files[n], split_column="split") for n in awake]
    new_trunk, adapt_figures = adapt_trunk(old_trunk, awake_data, AdaptConfig(**cfg.adapt), reference=old_encode)
    TrunkVersions(store.root).record(new_trunk, parent=old_trunk.fingerprint, note=f"adapted on {awake}", weights=True)
    metrics |= adapt_figures
    new_encode = FeatureCache(root / "features", new_trunk).encode
    calibration = list(instantiate(cfg.calibration)) if cfg.get("calibration") else []

    # 4. each strategy on its own copy of the store
    models: dict[str, PagedMixture] = {}
    for strategy in [s for s in cfg.strategies if s != "keep"]:
        copy = ExpertStore(shutil.copytree(store.root, out / strategy / "experts"))
        start = time.perf_counter()
        report = upgrade_store(
            Lifecycle(copy, new_trunk, new_encode, growth), old_trunk, awake_data, strategy, calibration
        )
        metrics[f"{strategy}/upgrade_s"] = time.perf_counter() - start
        metrics |= {f"{strategy}/bridge/{k}": v for k, v in report.bridge.items() if isinstance(v, (int, float))}
        models[strategy] = load_mixture(copy, names, gate, new_trunk.fingerprint)
        figures[strategy] = tenant_figures(models[strategy], everyone, new_encode, split)
        metrics |= group_metrics(figures[strategy], awake, dormant, strategy)
        metrics[f"{strategy}/trunks"] = 1
        metrics[f"{strategy}/memory_bytes"] = parameter_bytes(new_trunk) + store_bytes(copy, models[strategy])

    # 5. keep the old trunk for the dormant experts (the exact reference), on the bridged store
    if "keep" in cfg.strategies:
        both: Encoder = lambda texts: torch.cat([new_encode(texts), old_encode(texts)], dim=1)  # noqa: E731
        kept = keep_old_trunk(
            load_mixture(out / "bridge" / "experts", names, gate, new_trunk.fingerprint),
            old_trunk.fingerprint,
            new_trunk.dim,
            old_trunk.dim,
        )
        models["keep"] = kept
        figures["keep"] = tenant_figures(kept, everyone, both, split)
        metrics |= group_metrics(figures["keep"], awake, dormant, "keep")
        metrics["keep/trunks"] = 2
        shards = store_bytes(ExpertStore(out / "bridge" / "experts"))  # its experts; no bridge used
        metrics["keep/memory_bytes"] = parameter_bytes(new_trunk) + parameter_bytes(old_trunk) + shards

    # batch-1 latency, text to answer, tenant given: a dormant tenant's queries (what each strategy changes)
    sample = [(e.text, n) for n in dormant for e in tenants[n].split(split)[:20]]
    latency_encoders = {"old": old_trunk.encode, "bridge": new_trunk.encode, "transport": new_trunk.encode}
    latency_encoders["keep"] = lambda texts: torch.cat([new_trunk.encode(texts), old_trunk.encode(texts)], dim=1)
    for name, model in {"old": old_model, **models}.items():
        batch1_latency_ms(model, latency_encoders[name], sample[:5])  # warm-up
        metrics[f"{name}/latency_ms_batch1"] = batch1_latency_ms(model, latency_encoders[name], sample)
    metrics["old/memory_bytes"] = parameter_bytes(old_trunk) + store_bytes(store, old_model)
    metrics["old/trunks"] = 1

    for strategy in models:
        metrics[f"{strategy}/dormant/delta_tenant_given"] = (
            metrics[f"{strategy}/dormant/acc_tenant_given"] - metrics["old/dormant/acc_tenant_given"]
        )
        metrics[f"{strategy}/all/delta_routed"] = metrics[f"{strategy}/all/acc_routed"] - metrics["old/all/acc_routed"]
    one_trunk = [s for s in models if s != "keep"]
    if one_trunk:
        best = max(one_trunk, key=lambda s: metrics[f"{s}/dormant/acc_tenant_given"])
        metrics["best_one_trunk/strategy"] = best  # type: ignore[assignment]
        metrics["best_one_trunk/dormant/delta_tenant_given"] = metrics[f"{best}/dormant/delta_tenant_given"]
        metrics["best_one_trunk/all/delta_routed"] = metrics[f"{best}/all/delta_routed"]

    # 6. newcomers: each dormant domain grown afresh on the adapted trunk (a store of its own), tenant given
    if cfg.newcomers:
        fresh = {}
        for name in dormant:
            alone = Lifecycle(ExpertStore(out / "newcomers" / name), new_trunk, new_encode, growth)
            alone.grow(tenants[name])
            model = load_mixture(alone.store, [name], gate, new_trunk.fingerprint)
            fresh[name] = tenant_figures(model, [tenants[name]], new_encode, split)[name]
        figures["newcomer_new_trunk"] = fresh
        total = sum(f["queries"] for f in fresh.values())
        new_given = sum(f["acc_tenant_given"] * f["queries"] for f in fresh.values()) / total
        metrics["newcomer/acc_tenant_given_old_trunk"] = metrics["old/dormant/acc_tenant_given"]
        metrics["newcomer/acc_tenant_given_new_trunk"] = new_given
        metrics["newcomer/delta_tenant_given"] = new_given - metrics["old/dormant/acc_tenant_given"]

    metrics |= {"split": split, "awake": awake, "dormant": dormant}  # type: ignore[dict-item]
    metrics["trunk/old"], metrics["trunk/new"] = old_trunk.fingerprint, new_trunk.fingerprint  # type: ignore[assignment]
    settings = {"adapt": OmegaConf.to_container(cfg.adapt, resolve=True), "top_k": cfg.top_k}
    settings |= {"transport_per_class": growth.transport_per_class, "latency_queries": len(sample)}
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    (out / "per_tenant.json").write_text(json.dumps(figures, indent=1) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics
