"""The trunk-upgrade experiment (`scripts/trunk_upgrade.py`, conf/trunk_upgrade.yaml):

    1. every tenant grown on the shipped trunk, from its own data file; every tenant evaluated (the old figures)
    2. the `dormant` tenants hibernated and their data files deleted
    3. a new trunk version adapted on the awake tenants' files (`moe.lifecycle.adapt`), recorded in the store
    4. for each strategy, a copy of the store upgraded (`moe.lifecycle.upgrade`): awake tenants retrained on the new
       trunk, the dormant ones kept through their shards (bridge, or transport); every tenant evaluated again
    5. keep (the exact reference): each expert fed its own trunk's features, two trunks run per query
    6. newcomers: each dormant domain, whose data the adapted trunk never saw, grown afresh on it, against the same
       grow on the old trunk: does a trunk adapted on other tenants help a tenant that comes later?

Dormant tenants are evaluated on the data set's evaluation split, which the experiment keeps apart from the tenants'
data files; the upgrade itself never reads a dormant tenant's data (tests/test_trunk_versions.py).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from moe.config import start_run
from moe.data import Tenant, read_tenant_file
from moe.evaluation import accuracy
from moe.inference import GateSettings, PagedMixture, load_mixture
from moe.lifecycle.adapt import AdaptConfig, adapt_trunk
from moe.lifecycle.config import growth_config
from moe.lifecycle.operations import Lifecycle
from moe.lifecycle.scenario import split_outcome
from moe.lifecycle.upgrade import upgrade_store
from moe.model.bridge import AffineMap
from moe.paths import cache_dir
from moe.store import ExpertStore, TrunkVersions
from moe.trunk import FeatureCache, Trunk

log = logging.getLogger(__name__)
Encoder = Callable[[list[str]], torch.Tensor]


def write_tenant_files(tenants: list[Tenant], folder: Path) -> dict[str, Path]:
    """Each tenant's examples as `<folder>/<tenant>.csv` (text, label, split): the data files a user would hold."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for tenant in tenants:
        paths[tenant.name] = path = folder / f"{tenant.name}.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label", "split"])
            for split, examples in tenant.splits.items():
                writer.writerows([e.text, e.label, split] for e in examples)
    return paths


def tenant_figures(model: PagedMixture, tenants: list[Tenant], encode: Encoder, split: str) -> dict[str, dict]:
    """Per tenant: routed, tenant-given and routing accuracy (%) and its query count, every tenant's queries routed
    among every expert of `model`."""
    outcome = split_outcome(model, tenants, encode, split, batch_size=1024)
    figures = {}
    for tenant in tenants:
        mine = outcome.tenant == model.tenant_index(tenant.name)
        figures[tenant.name] = {
            "acc_routed": accuracy(outcome.routed[mine], outcome.label[mine]),
            "acc_tenant_given": accuracy(outcome.given[mine], outcome.label[mine]),
            "routing_acc": accuracy(outcome.routed_tenant[mine], outcome.tenant[mine]),
            "queries": int(mine.sum()),
        }
    return figures


def pooled(figures: dict[str, dict], names: list[str], prefix: str) -> dict[str, float]:
    """Accuracies pooled over the queries of `names` (micro averages)."""
    total = sum(figures[n]["queries"] for n in names)
    keys = ("acc_routed", "acc_tenant_given", "routing_acc")
    return {f"{prefix}/{k}": sum(figures[n][k] * figures[n]["queries"] for n in names) / total for k in keys}


def group_metrics(figures: dict[str, dict], awake: list[str], dormant: list[str], prefix: str) -> dict[str, float]:
    return (
        pooled(figures, awake + dormant, f"{prefix}/all")
        | pooled(figures, awake, f"{prefix}/awake")
        | pooled(figures, dormant, f"{prefix}/dormant")
    )


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@torch.no_grad()
def batch1_latency_ms(model: PagedMixture, encode: Encoder, queries: list[tuple[str, str]], repeats: int = 1) -> float:
    """Median milliseconds of one tenant-given query, text to answer (encoding included, no feature cache)."""
    times = []
    for _ in range(repeats):
        for text, tenant in queries:
            start = time.perf_counter()
            features = encode([text])
            model(features, torch.tensor([model.tenant_index(tenant)]))
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def keep_old_trunk(model: PagedMixture, old: str, new_dim: int, old_dim: int) -> PagedMixture:
    """The reference strategy on a bridged mixture: its inputs are both trunks' features side by side (new, then
    old); the gate reads the new ones (its rows padded with zeros), each expert its own trunk's (a selection map)."""
    with torch.no_grad():
        model.router.weight = nn.Parameter(nn.functional.pad(model.router.weight, (0, old_dim)))
    eye = torch.eye(new_dim + old_dim)
    select_new = AffineMap(eye[:, :new_dim].contiguous(), torch.zeros(new_dim))
    select_old = AffineMap(eye[:, new_dim:].contiguous(), torch.zeros(old_dim))
    model.input_maps = {key: select_old if model.expert_trunks[key[0]] == old else select_new for key in model.keys}
    return model


def run_trunk_upgrade(cfg: DictConfig) -> dict[str, float]:
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


def store_bytes(store: ExpertStore, model: PagedMixture | None = None) -> int:
    """Bytes of the latest live version of every tenant, and of the bridge files `model` reads through (what serving
    holds)."""
    latest = sum(store.path(t, store.latest(t)).stat().st_size for t in store.tenants(dormant=True))
    if model is None or not model.input_maps:
        return latest
    versions = TrunkVersions(store.root)
    current = versions.current()
    olds = {model.expert_trunks[tenant] for tenant, _ in model.input_maps}
    return latest + sum(versions.bridge_path(old, current).stat().st_size for old in olds)
