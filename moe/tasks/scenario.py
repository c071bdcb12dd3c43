"""`run(cfg)`: the continual experiment from a composed `conf/scenario.yaml`."""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from moe.evaluation.accuracies import Accuracies, accuracy_metrics
from moe.evaluation.reference import fit_metrics, joint_linear_reference
from moe.experiments.baselines import joint_pathway_retrain, joint_retrain, sequential_run
from moe.experiments.plots import accuracy_heatmaps, accuracy_over_events
from moe.experiments.scenario import Event, Record, Scenario, continual_metrics
from moe.inference import GateSettings
from moe.lifecycle.operations import Lifecycle
from moe.paths import cache_dir
from moe.progress import bar as progress_bar
from moe.store import ExpertStore
from moe.tasks.base import start_run, task
from moe.tasks.lifecycle import growth_config
from moe.trunk import FeatureCache, Trunk

log = logging.getLogger(__name__)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def pooled(final: Record, names: list[str], counts: dict[str, int]) -> Accuracies:
    """The final accuracies of tenants `names`, pooled over their test queries."""
    return Accuracies.micro(Accuracies(final.routed[t], final.given[t], final.routing[t], counts[t]) for t in names)


def compare_groups(cfg: DictConfig, tenants: dict[str, object]) -> dict[str, list[str]]:
    """`compare_groups` ({group: [tenant, ...]}, or null for none), checked against the data's tenants."""
    groups = {str(g): [str(t) for t in members] for g, members in (cfg.get("compare_groups") or {}).items()}
    for group, members in groups.items():
        if not members:
            raise ValueError(f"compare_groups.{group} names no tenant")
        if unknown := [t for t in members if t not in tenants]:
            raise KeyError(f"compare_groups.{group} names unknown tenants {unknown}; known: {sorted(tenants)}")
    return groups


def compare_group_metrics(final: Record, groups: dict[str, list[str]], counts: dict[str, int]) -> dict[str, float]:
    """The mixture's final accuracies per group of tenants (`compare_groups`), pooled over the group's test queries."""
    metrics: dict[str, float] = {}
    for group, members in groups.items():
        if missing := [t for t in members if t not in counts]:
            log.warning("compare_groups.%s: %s have no expert at the end; left out", group, missing)
        present = [t for t in members if t in counts]
        metrics |= accuracy_metrics(pooled(final, present, counts), "final", f"_{group}")
    return metrics


@task
def run(cfg: DictConfig) -> dict[str, float]:
    out = start_run(cfg)
    trunk: Trunk = instantiate(cfg.trunk)
    tenants = {t.name: t for t in instantiate(cfg.data.tenants, _convert_="all")}
    store = ExpertStore(cfg.store_dir)
    if store.records():
        raise FileExistsError(f"the scenario starts from an empty store, but {store.root} has experts")
    root = Path(cfg.paths.cache_dir) if cfg.paths.get("cache_dir") else cache_dir()
    encode = FeatureCache(root / "features", trunk).encode
    growth = growth_config(cfg)
    events = [Event(**event) for event in cfg.events]
    groups = compare_groups(cfg, tenants)
    for event in events:
        if event.tenant not in tenants:
            raise KeyError(f"event {event.op} names unknown tenant {event.tenant!r}; known: {sorted(tenants)}")

    split = cfg.get("eval_split", "test")
    if split != "test" and any(cfg.baselines.values()):
        raise ValueError(f"eval_split={split}: the baselines are measured on test; turn them off to choose settings")
    gate = GateSettings(cfg.top_k).with_routing(cfg.routing)
    scenario = Scenario(Lifecycle(store, trunk, encode, growth), tenants, gate, split=split)
    bar = progress_bar(desc="events", unit="event", total=len(events))
    scenario.run(events, progress=lambda i, r: (bar.update(), bar.set_postfix_str(f"{r.event.op} {r.event.tenant}")))
    bar.close()
    records, names = scenario.records, list(scenario.known)
    final = records[-1]
    counts = {name: len(scenario.known_tenant(name).split(split)) for name in names}

    metrics: dict[str, float] = accuracy_metrics(pooled(final, names, counts), "final") | {
        "final/tenants": len(names),
        "time/grow_mean_s": statistics.mean(r.seconds for r in records if r.event.op == "grow"),
        "time/events_s": sum(r.seconds for r in records),
        "memory/peak_rss_bytes": max(r.rss_bytes for r in records),
        "wake/identical": float(all(scenario.wake_identical.values())) if scenario.wake_identical else math.nan,
    }
    metrics |= compare_group_metrics(final, groups, counts)
    warned = scenario.lifecycle.warned  # the tenants whose last grow or update warned of overlapping intents
    metrics["overlap/warned_tenants"] = len(warned)
    if updates := [r.seconds for r in records if r.event.op == "update"]:
        metrics["time/update_mean_s"] = statistics.mean(updates)
    for key, name in (("routed", "routed"), ("given", "tenant_given")):
        for stat, value in continual_metrics(records, key, scenario.last_trained).items():
            metrics[f"final/{stat}_{name}"] = value

    matrix = {
        "split": split,  # where the accuracies below were measured (config.yaml's eval_split)
        "events": [f"{r.event.op} {r.event.tenant}" for r in records],
        "tenants": names,
        "routed": [[r.routed.get(t, math.nan) for t in names] for r in records],
        "tenant_given": [[r.given.get(t, math.nan) for t in names] for r in records],
        "routing": [[r.routing.get(t, math.nan) for t in names] for r in records],
        "seconds": [r.seconds for r in records],
        "rss_bytes": [r.rss_bytes for r in records],
        "overlap_warnings": {t: [f"{p.intent_a} ~ {p.tenant_b}/{p.intent_b}" for p in ps] for t, ps in warned.items()},
        "compare_groups": groups,
    }
    curves = {
        "mixture routed": [_mean(row) for row in matrix["routed"]],
        "mixture tenant given": [_mean(row) for row in matrix["tenant_given"]],
    }

    if cfg.baselines.sequential:
        rows = sequential_run(events, tenants, names, growth, trunk.dim, encode)
        matrix["sequential_routed"] = [[row.get(t, (math.nan, math.nan))[0] for t in names] for row in rows]
        matrix["sequential_tenant_given"] = [[row.get(t, (math.nan, math.nan))[1] for t in names] for row in rows]
        curves["sequential fine-tuning routed"] = [_mean(row) for row in matrix["sequential_routed"]]
        last = Accuracies.micro(Accuracies(*rows[-1][t], float("nan"), counts[t]) for t in names)
        metrics["baseline/sequential/acc_routed"] = last.acc_routed
        metrics["baseline/sequential/acc_tenant_given"] = last.acc_tenant_given

    final_tenants = [tenants[name].restricted(scenario.known[name]) for name in names]
    references: dict[str, float] = {}
    if cfg.baselines.get("joint_linear"):  # one linear softmax over every (tenant, intent), the same features
        reference, test = joint_linear_reference(final_tenants, encode, "test")
        prefix = "baseline/joint_linear"
        metrics |= accuracy_metrics(test.overall, prefix) | fit_metrics(reference, prefix)
        metrics["time/joint_linear_s"] = reference.seconds
        for group, members in groups.items():
            metrics |= accuracy_metrics(test.group(t for t in members if t in names), prefix, f"_{group}")
        mean_routed = _mean(test.per_tenant[t].acc_routed for t in names)  # over tenants, as the curves
        references["joint linear routed, final tenants"] = mean_routed

    if cfg.baselines.joint and scenario.lifecycle.trains_on_texts():  # the cost of retraining the pathways
        chosen = cfg.baselines.get("joint_tenants") or names
        joint = joint_pathway_retrain([t for t in final_tenants if t.name in chosen], scenario.lifecycle)
        metrics["time/joint_retrain_s"], metrics["baseline/joint/tenants"] = joint["seconds"], joint["tenants"]
        metrics["grow_speedup_over_joint"] = joint["seconds"] / metrics["time/grow_mean_s"]
    elif cfg.baselines.joint:
        joint = joint_retrain(final_tenants, encode, growth, top_k=cfg.top_k)
        metrics["time/joint_retrain_s"] = joint["seconds"]
        metrics["grow_speedup_over_joint"] = joint["seconds"] / metrics["time/grow_mean_s"]
        metrics |= {f"baseline/joint/{k}": v for k, v in joint.items() if k != "seconds"}

    trunk_bytes = sum(p.numel() * p.element_size() for p in trunk.parameters())
    expert_bytes = sum(r.size for r in store.records() if not r.retired)
    metrics["baseline/separate/acc_tenant_given"] = metrics["final/acc_tenant_given"]  # the same experts, alone
    metrics["baseline/separate/memory_bytes"] = len(names) * trunk_bytes + expert_bytes
    metrics["memory/mixture_bytes"] = trunk_bytes + expert_bytes

    (out / "accuracy_matrix.json").write_text(json.dumps(matrix, indent=1) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    heatmaps = {"routed": matrix["routed"], "tenant given": matrix["tenant_given"]}
    accuracy_heatmaps(heatmaps, matrix["events"], names, out / "accuracy_matrix.png")
    accuracy_over_events(curves, matrix["events"], out / "accuracy_over_events.png", references)
    log.info("metrics: %s", json.dumps(metrics, sort_keys=True))
    return metrics
