"""Learning curves of growth: each tenant grown into a store of the others with k examples per intent, by each growth
method (`moe.lifecycle.few_shot`), beside a logistic-regression probe on the frozen trunk's features at the same k.

The store of the others is the store of every tenant grown on all its data (`Lifecycle.grow`, today's growth) with
that tenant deleted: every expert is trained on its own tenant's data only and the statistics gate is rebuilt from
the shards at load, so it is exactly the store the others would have grown. Each grow starts from a fresh copy of it.
Draws are shared by every method: draw j of tenant t at k is the same k examples per intent for all of them.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from moe.data import Tenant
from moe.evaluation.accuracies import Accuracies
from moe.evaluation.reference import fit_joint_linear
from moe.experiments.scenario import split_outcome
from moe.inference import GateSettings, load_mixture
from moe.lifecycle.growth import GrowthConfig
from moe.lifecycle.operations import Lifecycle
from moe.store import ExpertStore
from moe.trunk import Trunk

PROBE = "probe"  # the logistic-regression reference's name among the methods


def draw(tenant: Tenant, k: int | None, index: int) -> Tenant:
    """The tenant with `k` train examples per intent drawn at random (draw `index`, the same for every method), its val
    and test splits whole; `k` None: all its examples."""
    if k is None:
        return tenant
    if k < 1:
        raise ValueError(f"k is a number of examples per intent, at least 1: got {k}")
    chooser = random.Random(f"{tenant.name}/{k}/{index}")  # str seeds are stable across processes
    by_label: dict[str, list] = {label: [] for label in tenant.labels}
    for example in tenant.split("train"):
        by_label[example.label].append(example)
    if short := [label for label, rows in by_label.items() if len(rows) < k]:
        raise ValueError(f"tenant {tenant.name!r} has fewer than {k} train examples of {short}")
    train = [example for label in tenant.labels for example in chooser.sample(by_label[label], k)]
    return replace(tenant, splits=tenant.splits | {"train": train})


@dataclass
class Row:
    """One grow (or probe fit) and its figures in percent: on the new tenant's queries of `split` (`given`, `routed`,
    `routing`: the share the gate sends to it among its top choice), and routed over every tenant's (`store_routed`,
    NaN where not measured)."""

    tenant: str
    split: str
    k: int | None
    draw: int
    method: str
    setting: str
    given: float
    routed: float
    routing: float
    store_routed: float
    seconds: float


class LearningCurves:
    """Grows into copies of `base` (every tenant of `tenants` grown on all its data), `work` a scratch folder."""

    def __init__(
        self,
        base: ExpertStore,
        trunk: Trunk,
        encode: Callable[[list[str]], torch.Tensor],
        growth: GrowthConfig,
        tenants: dict[str, Tenant],
        gate: GateSettings,
        work: Path,
    ):
        self.base, self.trunk, self.encode = base, trunk, encode
        self.growth = replace(growth, few_shot_below=0)  # each method as named: no choice by size here
        self.tenants, self.gate, self.work = tenants, gate, work

    def grow_base(self, progress=None) -> None:
        """Every tenant grown on all its data (today's growth), those already in the base store kept."""
        lifecycle = Lifecycle(self.base, self.trunk, self.encode, replace(self.growth, method="full"))
        for name, tenant in self.tenants.items():
            if name not in self.base.tenants():
                lifecycle.grow(tenant)
            if progress:
                progress(name)

    def without(self, name: str) -> Path:
        """A store of every tenant but `name` (made once, then reused)."""
        folder = self.work / f"without_{name}"
        if not folder.exists():
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(self.base.root, partial)
            ExpertStore(partial).delete(name)
            partial.rename(folder)
        return folder

    def measure(self, store: ExpertStore, tenant: Tenant, split: str, whole: bool) -> tuple[Accuracies, float]:
        """The new tenant's accuracies on its `split` queries, and routed accuracy over every tenant's (if `whole`)."""
        model = load_mixture(store, gate=self.gate, trunk_fingerprint=self.trunk.fingerprint, trunk=self.trunk)
        own = Accuracies.of(split_outcome(model, [tenant], self.encode, split, batch_size=1024))
        if not whole:
            return own, float("nan")
        everyone = [tenant if name == tenant.name else t for name, t in self.tenants.items()]
        return own, Accuracies.of(split_outcome(model, everyone, self.encode, split, batch_size=1024)).acc_routed

    def grow(
        self, name: str, k: int | None, index: int, method: str, setting: str, overrides: dict, split: str, whole: bool
    ) -> Row:
        """Tenant `name`, draw `index` of `k` examples per intent, grown as `overrides` (GrowthConfig fields) say."""
        tenant = draw(self.tenants[name], k, index)
        cfg = replace(self.growth, seed=self.growth.seed + index, **overrides)
        if k is None and index == 0 and cfg == replace(self.growth, method="full"):
            # the base store's own expert: grown by the same method on the same rows with the same seed
            store, seconds = self.base, float(self.base.meta(name).metrics["grow_s"])
        else:
            scratch = self.work / "scratch"
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(self.without(name), scratch)
            store = ExpertStore(scratch)
            start = time.perf_counter()
            Lifecycle(store, self.trunk, self.encode, cfg, overlap_warn=math.inf).grow(tenant)  # warnings: not measured
            seconds = time.perf_counter() - start
        own, whole_routed = self.measure(store, tenant, split, whole)
        return Row(
            name,
            split,
            k,
            index,
            method,
            setting,
            own.acc_tenant_given,
            own.acc_routed,
            own.routing_acc,
            whole_routed,
            seconds,
        )

    def probe(self, name: str, k: int | None, index: int, weight_decay: float, split: str) -> Row:
        """The logistic-regression probe on the trunk's features of the same draw (`fit_joint_linear` over this one
        tenant, its weight decay given: no choice made here), scored on `split` with the tenant given."""
        tenant = draw(self.tenants[name], k, index)
        start = time.perf_counter()
        reference = fit_joint_linear([tenant], self.encode, weight_decays=(weight_decay,), steps=(40,))
        seconds = time.perf_counter() - start
        given = reference.evaluate([tenant], self.encode, split).overall.acc_tenant_given
        nan = float("nan")
        return Row(name, split, k, index, PROBE, f"weight_decay={weight_decay:g}", given, nan, nan, nan, seconds)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(row) for row in rows]
