"""Moving a store onto a new trunk version without waking anyone's data.

    awake tenants with data   retrained on the new trunk from their data (`Lifecycle.retrain`)
    every other tenant        kept working through what its shard holds, by one strategy:
        bridge      the shard stays as it is; its expert reads the new trunk's features mapped back into its old
                    feature space, and its routing entry is moved into the new one (`moe.model.bridge`)
        transport   a new version on the new trunk, rebuilt from its statistics moved into the new space
                    (`Lifecycle.transport`); nothing of the old trunk is used when serving

The bridge between the two versions is fitted on calibration texts only: the awake tenants' train texts and any
unlabeled texts the user gives, never a sleeping tenant's (their data is gone; the upgrade never reads it). Keeping
the old trunk for the sleeping tenants, the exact reference, costs a second trunk in memory and a second pass per
query; the trunk-upgrade experiment measures it beside these two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from moe.data import Tenant
from moe.lifecycle.operations import Lifecycle
from moe.model import check_choice
from moe.model.bridge import Bridge
from moe.progress import bar
from moe.store import TrunkVersions
from moe.trunk import Trunk

log = logging.getLogger(__name__)

Strategy = Literal["bridge", "transport"]


@dataclass
class UpgradeReport:
    old: str
    new: str
    strategy: str
    bridge: dict  # calibration texts and the bridge's fidelity on held-out ones
    tenants: dict[str, str] = field(default_factory=dict)  # tenant -> retrained | bridged | transported | current
    seconds: dict[str, float] = field(default_factory=dict)


def fit_bridge(
    old_trunk: Trunk, new_trunk: Trunk, texts: Sequence[str], unseen: Sequence[str] = (), batch_size: int = 64
) -> Bridge:
    """The bridge between two trunk versions from calibration `texts` and `unseen` ones (texts the new trunk was not
    trained on: its fidelity is also reported on these alone, as `unseen/r2` and `unseen/cosine`) encoded by each."""
    texts = list(dict.fromkeys([*unseen, *texts]))  # each text once
    old = old_trunk.encode(texts, batch_size, progress=True).cpu()
    new = new_trunk.encode(texts, batch_size, progress=True).cpu()
    unseen_set = set(unseen)
    unseen_rows = torch.tensor([text in unseen_set for text in texts], dtype=torch.bool)
    return Bridge.fit(old_trunk.fingerprint, new_trunk.fingerprint, old, new, groups={"unseen": unseen_rows})


def upgrade_store(
    lifecycle: Lifecycle,
    old_trunk: Trunk,
    awake: Sequence[Tenant],
    strategy: Strategy,
    calibration: Sequence[str] = (),
) -> UpgradeReport:
    """Move `lifecycle.store` from `old_trunk` to `lifecycle.trunk` (the new version): fit and save the bridge between
    them (on `calibration` texts plus the awake tenants' train texts), retrain each tenant of `awake` (awake tenants
    with their data), keep every other expert working by `strategy`, then make the new version the store's current
    one. Only the tenants in `awake` have data; nothing else is read but shards. Published as one store generation
    (`ExpertStore.changes`): a reader following the store sees it before the upgrade or after, never between; a process
    killed inside leaves the previous generation served, and the same call run again completes it (what the killed
    one retrained or transported counts as done: its versions are on the new trunk)."""
    if lifecycle.store.generation() == 0:  # a store from before generations: what readers see until it ends
        lifecycle.store.rescan("before upgrade")
    with lifecycle.store.changes("upgrade", trunk=True):
        return _upgrade_store(lifecycle, old_trunk, awake, strategy, calibration)


def _upgrade_store(
    lifecycle: Lifecycle, old_trunk: Trunk, awake: Sequence[Tenant], strategy: Strategy, calibration: Sequence[str]
) -> UpgradeReport:
    check_choice(strategy, Strategy, "strategy")
    store, new_trunk = lifecycle.store, lifecycle.trunk
    versions = TrunkVersions(store.root)
    if new_trunk.fingerprint == old_trunk.fingerprint:
        raise ValueError(f"the store is on trunk {old_trunk.fingerprint[:12]}… already: nothing to upgrade to")
    # the new one: an upgrade killed after it switched the trunk (before it published), run again to complete it
    if (current := versions.current()) not in (None, old_trunk.fingerprint, new_trunk.fingerprint):
        raise ValueError(
            f"{store.root} serves on trunk {current[:12]}…, not on {old_trunk.fingerprint[:12]}…: upgrade from the "
            "current version"
        )
    if not versions.has(new_trunk.fingerprint):
        raise KeyError(
            f"trunk {new_trunk.fingerprint[:12]}… is not recorded in {store.root}: adapt it into the store first "
            "(scripts/adapt_trunk.py) or record it"
        )
    dormant = set(store.dormant())
    if asleep := sorted(t.name for t in awake if t.name in dormant):
        raise ValueError(f"tenants {asleep} are hibernating: the upgrade keeps them through their shards, not data")
    names = store.tenants(dormant=True)
    if unknown := sorted(t.name for t in awake if t.name not in names):
        raise KeyError(f"tenants {unknown} have no expert in {store.root}; known: {names}")
    metas = {name: store.meta(name) for name in names}
    on = {name: meta.trunk_fingerprint for name, meta in metas.items()}
    retrained = {tenant.name for tenant in awake}
    kept = [name for name in names if on[name] != new_trunk.fingerprint and name not in retrained]
    stuck = {name: metas[name].architecture.expert_kind for name in kept}
    if stuck := {name: kind for name, kind in stuck.items() if kind.carry_problem is not None}:
        kinds = sorted({f"{kind.name} experts ({kind.carry_problem})" for kind in stuck.values()})
        raise ValueError(
            f"tenants {sorted(stuck)} are {', '.join(kinds)}: an upgrade can not {strategy} them onto trunk "
            f"{new_trunk.fingerprint[:12]}…; retrain them from their data (wake them and pass their files), or retire "
            "them, before upgrading"
        )
    for tenant in awake:  # every retrain checked before the first: a refused one must not leave the others moved
        if on[tenant.name] != new_trunk.fingerprint:
            lifecycle.check_retrain(tenant)
    versions.record(old_trunk)
    older = {fp: name for name, fp in on.items() if fp not in (old_trunk.fingerprint, new_trunk.fingerprint)}
    earlier = {  # experts asleep since an earlier upgrade: their bridge into the old trunk, to chain
        fp: versions.require_bridge(fp, old_trunk.fingerprint, store.path(name, store.latest(name)))
        for fp, name in sorted(older.items())
    }
    report = UpgradeReport(old_trunk.fingerprint, new_trunk.fingerprint, strategy, {})
    start = time.perf_counter()
    bridge = fit_bridge(old_trunk, new_trunk, [e.text for tenant in awake for e in tenant.split("train")], calibration)
    versions.save_bridge(bridge)
    for first in earlier.values():  # experts asleep through an earlier upgrade too: their bridges chained
        versions.save_bridge(first.then(bridge))
    report.bridge, report.seconds["bridge"] = bridge.info, time.perf_counter() - start
    log.info("bridge %s… -> %s…: %s", bridge.old[:12], bridge.new[:12], bridge.info)
    data = {tenant.name: tenant for tenant in awake}
    for name in bar(names, f"upgrading ({strategy})", "tenant"):
        start = time.perf_counter()
        if on[name] == new_trunk.fingerprint:
            report.tenants[name] = "current"
        elif name in data:
            lifecycle.retrain(data[name])
            report.tenants[name] = "retrained"
        elif strategy == "transport":
            lifecycle.transport(name)
            report.tenants[name] = "transported"
        else:
            report.tenants[name] = "bridged"
        report.seconds[name] = time.perf_counter() - start
    versions.set_current(new_trunk.fingerprint)
    return report
