"""The trunk-upgrade experiment's parts; `moe.tasks.trunk_upgrade.run` (`scripts/trunk_upgrade.py`,
conf/trunk_upgrade.yaml) runs it:

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
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moe.data import Tenant
from moe.evaluation import accuracy
from moe.experiments.scenario import split_outcome
from moe.inference import PagedMixture
from moe.model.bridge import AffineMap
from moe.store import ExpertStore, TrunkVersions

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
