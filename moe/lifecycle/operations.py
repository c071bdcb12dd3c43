"""The lifecycle of a tenant in an expert store: grow, update, hibernate, wake, retire.

Every operation touches one tenant's folder only (and the store's lock and tombstone files); the trunk and every
other expert stay bit for bit as they were, and no other tenant's data is read (there is none to read): only their
shards, each verified in full as loading verifies it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from moe.data import Tenant
from moe.inference.build import BridgeCache
from moe.lifecycle.few_shot import Neighbours, method_for, next_method
from moe.lifecycle.growth import GROWERS, Grower, GrowthConfig, expert_tensors, routing_entry, statistics_samples
from moe.lifecycle.selection import grow_selected
from moe.lifecycle.stream import EncodedRows
from moe.model.bridge import Bridge
from moe.model.kinds import Architecture
from moe.model.overlap import ExpertStatistics, OverlapPair, closest_intents
from moe.model.router import ROUTING
from moe.model.stats import COUNT, MEAN, SCATTER, STATISTICS, PooledScatter, class_statistics, merge_statistics
from moe.store import ExpertMeta, ExpertStore, TrunkVersions
from moe.trunk import Trunk

log = logging.getLogger(__name__)
ROUTING_TENSORS = ROUTING + STATISTICS  # what growth knows of every other expert
# A grow (or an update's new intents) warns of an intent whose estimated pairwise confusion with an existing tenant's
# intent, sampling noise taken out (`moe.model.overlap`), is at least this. On CLINC150's MiniLM statistics no two
# distinct intents come near it (the closest pair, meta/user_name and small_talk/what_is_your_name, is at 0.033 %:
# scripts/results/clinc150_incremental/overlap.json), while one intent under two names is at 50 %; 1 % is a rate of
# misroutes worth a look.
OVERLAP_WARN = 0.01
OVERLAP_SHOWN = 5  # pairs named in the one warning


def few_shot_metrics(method: str, stats: dict[str, torch.Tensor]) -> dict[str, int | str]:
    """What a version's shard records of how it was grown: the method, and its smallest intent's rows (so far)."""
    return {"growth_method": method, "examples_per_intent_min": int(stats[COUNT].min().item())}


def check_spread(name: str, stats: dict[str, torch.Tensor], others: list[dict[str, torch.Tensor]], evidence: str):
    """The minimums a grow keeps, both for a covariance that rows of one per intent (or repeated texts) can not
    estimate, having no within-class spread: routing's, pooled over the store's experts and the new tenant's rows, so
    that a store's first tenant needs two distinct train rows of one intent (into a store with other experts any
    tenant grows from one example per intent); and Mahalanobis evidence's, of the tenant's own rows in its expert's
    own feature space, where no other expert's statistics can stand in."""
    if stats[SCATTER].any():
        return
    if not any(entry[SCATTER].any() for entry in others):
        raise ValueError(
            f"tenant {name!r}: its train rows have no within-class spread (one distinct text per intent) and the "
            "store has no other expert to pool a covariance with; routing needs one. Give at least two different "
            "examples of one intent, or grow it into a store that holds other tenants"
        )
    if evidence == "mahalanobis":
        raise ValueError(
            f"tenant {name!r}: its train rows have no within-class spread (one distinct text per intent), and this "
            "store's experts keep Mahalanobis evidence, a covariance of the tenant's own rows in its expert's feature "
            "space. Give at least two different examples of one intent"
        )


@dataclass
class Lifecycle:
    """Operations on `store` for experts over `trunk`; `encode` turns texts into trunk features (e.g. a
    FeatureCache's `encode`)."""

    store: ExpertStore
    trunk: Trunk
    encode: Callable[[list[str]], torch.Tensor]
    cfg: GrowthConfig
    overlap_warn: float = OVERLAP_WARN
    warned: dict[str, list[OverlapPair]] = field(default_factory=dict)  # tenant -> overlaps its last grow/update named
    _bridges: BridgeCache | None = field(default=None, repr=False)  # older trunk versions' bridges to this trunk

    def architecture(self) -> Architecture:
        """The store's architecture (the one most of its experts share: `ExpertStore.architecture`), or the
        configured one if empty."""
        if self.store.tenants(dormant=True):  # on this trunk's features (a store's experts may span trunk versions)
            return self.store.architecture(self.trunk.dim)
        return GROWERS[self.cfg.kind].architecture(self.trunk, self.cfg)

    def grower(self, arch: Architecture, method: str | None = None) -> Grower:
        """How experts of `arch` are trained: its kind's `Grower`, with this lifecycle's settings as they are now
        (`method`: the growth method chosen for this tenant, instead of the configured one)."""
        cfg = self._configured(arch)
        return GROWERS[arch.kind](self.trunk, arch, cfg if method is None else replace(cfg, method=method))

    def trains_on_texts(self) -> bool:
        """Whether this store's experts train on a tenant's texts (through the trunk) rather than their features."""
        return self.architecture().expert_kind.trains_on_texts

    def pathway_expert(self, tenant: Tenant) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """An expert trained on `tenant`'s train split, as a grow into this store trains it, not saved: (expert, its
        kind's own tensors; a pathway expert's pathway)."""
        arch = self.architecture()
        features, labels = self._features(tenant, tenant.labels)
        return self.grower(arch).train(tenant, None, features, labels)

    def _others(self, exclude: str) -> list[tuple[ExpertMeta, dict[str, torch.Tensor]]]:
        """Metadata, routing entries and statistics of every other live expert, awake or dormant (read, never
        changed), each verified as loading verifies it: a damaged shard, or one of another trunk, is a ShardError
        naming it."""
        others = []
        for tenant in self.store.tenants(dormant=True):
            if tenant == exclude:
                continue
            bridge = self._bridge(tenant)
            tensors, meta = self.store.load(tenant, trunk_fingerprint=bridge.old if bridge else self.trunk.fingerprint)
            entry = {name: tensors[name].clone() for name in ROUTING_TENSORS}  # not the weights
            others.append((meta, bridge.entry_to_new(entry, meta.architecture.input_scale) if bridge else entry))
        return others

    def _neighbours(self, others: list[tuple[ExpertMeta, dict[str, torch.Tensor]]]) -> Neighbours:
        """What a growing tenant reads of the others (`moe.lifecycle.few_shot`): their entries, and the shards of those
        on this trunk."""
        here = tuple(meta.tenant for meta, _ in others if meta.trunk_fingerprint == self.trunk.fingerprint)

        def load(name: str) -> dict[str, torch.Tensor]:
            return self.store.load(name, trunk_fingerprint=self.trunk.fingerprint)[0]

        return Neighbours({meta.tenant: entry for meta, entry in others}, load, here)

    def _bridge(self, tenant: str) -> Bridge | None:
        """The bridge from the trunk `tenant`'s latest expert was trained on to this trunk, when they differ (an
        expert kept through a trunk upgrade); a ShardError naming both when the store has none."""
        if self._bridges is None or self._bridges.trunk_fingerprint != self.trunk.fingerprint:
            self._bridges = BridgeCache(self.store, self.trunk.fingerprint)
        self._bridges.missing.clear()  # looked for again: an upgrade under way may have saved it since
        return self._bridges.get(self.store.meta(tenant))

    def _warn_overlap(
        self,
        tenant: str,
        labels: tuple[str, ...],
        stats: dict[str, torch.Tensor],
        others: list[tuple[ExpertMeta, dict[str, torch.Tensor]]],
        new: set[str] | None = None,
    ) -> None:
        """One warning naming the tenant's intents (those in `new`, or all) that an existing tenant's intent is likely
        to be confused with (adjusted confusion >= `overlap_warn`), under the covariance pooled over the tenant and
        every other expert, as growth's routing pools it. Reads only; a hibernating tenant counts (it wakes up)."""
        self.warned.pop(tenant, None)  # only the last grow or update of a tenant counts
        kept = [i for i, label in enumerate(labels) if new is None or label in new]
        if not others or not kept:
            return
        pooled = PooledScatter.of([stats]) + PooledScatter.of(entry for _, entry in others)
        ours = ExpertStatistics(tenant, tuple(labels[i] for i in kept), {k: stats[k][kept] for k in (MEAN, COUNT)})
        theirs = [ExpertStatistics(meta.tenant, meta.labels, entry) for meta, entry in others]
        close = closest_intents(ours, theirs, pooled, self.cfg.shrinkage, min_adjusted=self.overlap_warn)
        if not close:
            return
        self.warned[tenant] = close
        dormant = {meta.tenant for meta, _ in others if self.store.is_dormant(meta.tenant)}
        shown = "; ".join(
            f"{p.intent_a} ~ {p.tenant_b}{' (hibernating)' if p.tenant_b in dormant else ''}/{p.intent_b} "
            f"(confusion {p.adjusted:.1%}, Δ {p.distance:.1f})"
            for p in close[:OVERLAP_SHOWN]
        )
        more = f"; and {len(close) - OVERLAP_SHOWN} more" if len(close) > OVERLAP_SHOWN else ""
        log.warning(
            "%s: %d of its intents overlap existing ones (estimated confusion >= %g%%): %s%s. Their queries may be "
            "routed to the other tenant: merge, rename or drop them, or check scripts/overlap.py's report",
            tenant,
            len({p.intent_a for p in close}),
            100 * self.overlap_warn,
            shown,
            more,
        )

    def _features(self, tenant: Tenant, labels: tuple[str, ...], split: str = "train"):
        examples = tenant.split(split)
        if not examples:
            raise ValueError(f"tenant {tenant.name!r} has no {split} examples")
        index = {label: i for i, label in enumerate(labels)}
        features = self.encode([e.text for e in examples])
        return features, torch.tensor([index[e.label] for e in examples])

    def _configured(self, arch: Architecture) -> GrowthConfig:
        if arch.gate_rows != "labels":
            raise ValueError("growing needs a store whose experts have one gate row per label (gate=prototype)")
        return GrowthConfig(**{**self.cfg.__dict__, "rank": arch.rank, "input_scale": arch.input_scale})

    def grow(self, tenant: Tenant, encoded: EncodedRows | None = None) -> Path:
        """A new tenant: trains its expert and routing entry on its own data only. Its name is checked before any
        work (`ExpertStore.check_new_tenant`) and again under the store's lock when saving, so that of two grows
        of one name at once exactly one succeeds. A retired tenant's name may be grown again. `encoded`: its train
        rows already encoded (label ids into `tenant.labels`; e.g. streamed from its file by
        `moe.lifecycle.stream`), instead of encoding the train split `tenant` holds."""
        self.store.check_new_tenant(tenant.name)
        return self._train(tenant, encoded, "grow")

    def retrain(self, tenant: Tenant, encoded: EncodedRows | None = None) -> Path:
        """A new version of an existing, awake tenant trained anew on this trunk from all of its data (`tenant`'s
        labels and train split; `encoded` as for `grow`): what a trunk upgrade does for the tenants whose data is
        at hand. The previous version stays for rollback."""
        meta = self.check_retrain(tenant)
        return self._train(tenant, encoded, "retrain", parent=meta.version)

    def check_retrain(self, tenant: Tenant) -> ExpertMeta:
        """That `tenant` can be retrained: awake, its data holding every intent its expert knows (a ValueError naming
        what is missing, else its current metadata). Reads nothing but the store's headers."""
        self.store.check_awake(tenant.name)
        meta = self.store.meta(tenant.name)
        if lost := [label for label in meta.labels if label not in tenant.labels]:
            raise ValueError(
                f"tenant {tenant.name!r}: its data lacks intents its expert knows, {lost}; a retrained expert would "
                "drop them (give every intent's examples)"
            )
        return meta

    def _train(self, tenant: Tenant, encoded: EncodedRows | None, how: str, parent: int | None = None) -> Path:
        """Train an expert and its routing entry on the tenant's data and save it: its first version (`parent`
        None), or the version after `parent`."""
        start = time.perf_counter()
        arch = self.architecture()
        cfg = self._configured(arch)
        features, labels = self._features(tenant, tenant.labels) if encoded is None else encoded
        stats = class_statistics(features, labels, len(tenant.labels))
        others = self._others(tenant.name)
        check_spread(tenant.name, stats, [entry for _, entry in others], arch.evidence)
        self._warn_overlap(tenant.name, tenant.labels, stats, others)  # before training: read only
        method = method_for(stats[COUNT], cfg, GROWERS[arch.kind].FEW_SHOT)  # by the smallest intent's rows
        grower, neighbours = self.grower(arch, method), self._neighbours(others)  # `select`: chosen on held out
        expert, own, chosen = grow_selected(grower, tenant, encoded, features, labels, stats, neighbours)
        routing = routing_entry(features, labels, stats, [entry for _, entry in others], cfg)
        seconds = time.perf_counter() - start
        metrics = {"train_examples": len(labels), f"{how}_s": seconds} | few_shot_metrics(method, stats) | chosen
        meta = ExpertMeta(tenant.name, tenant.labels, self.trunk.fingerprint, arch, metrics=metrics)
        tensors = expert_tensors(expert, routing, stats) | own
        if parent is None:
            path = self.store.save(tensors, meta, new_tenant=True)
        else:
            path = self.store.save(tensors, meta, allow_dormant=False, parent=parent)
        TrunkVersions(self.store.root).record(self.trunk)  # once: what rebuilds the trunk it was trained on
        log.info(
            "%s %s (%d labels) in %.1f s: %s", how, tenant.name, len(tenant.labels), time.perf_counter() - start, path
        )
        return path

    def transport(self, name: str) -> Path:
        """A new version of `name` on this trunk made from its shard alone, with none of its data: its statistics
        moved through the bridge from the trunk it was trained on (`Bridge.statistics_to_new`), its expert trained on
        `transport_per_class` samples per class drawn from them, its routing entry rebuilt from them. Works on a
        hibernating tenant (it wakes up as this version); the previous version stays for rollback."""
        start = time.perf_counter()
        kind = self.store.meta(name).architecture.expert_kind
        if kind.carry_problem is not None:
            raise ValueError(f"tenant {name!r} is a {kind.name} expert: {kind.carry_problem} (not transportable)")
        bridge = self._bridge(name)
        if bridge is None:
            raise ValueError(
                f"tenant {name!r} is on trunk {self.trunk.fingerprint[:12]}… already: nothing to transport"
            )
        old, meta = self.store.load(name, trunk_fingerprint=bridge.old)
        stats = bridge.statistics_to_new({k: old[k] for k in STATISTICS})
        if not (stats[COUNT] > 0).any():
            raise ValueError(f"tenant {name!r}'s shard holds no feature statistics: it can not be transported")
        arch = self.architecture()
        cfg = self._configured(arch)
        peers = [entry for _, entry in self._others(name)]
        x, y = statistics_samples(stats, cfg.transport_per_class, cfg, peers)
        expert, own = self.grower(arch).train(Tenant(name, meta.labels), None, x, y)
        routing = routing_entry(x, y, stats, peers, cfg)
        new_meta = ExpertMeta(
            name,
            meta.labels,
            self.trunk.fingerprint,
            arch,
            metrics={"train_examples": 0, "samples": len(y), "transport_s": time.perf_counter() - start},
        )
        path = self.store.save(expert_tensors(expert, routing, stats) | own, new_meta, parent=meta.version)
        log.info(
            "transported %s to trunk %s… in %.1f s: %s",
            name,
            self.trunk.fingerprint[:12],
            new_meta.metrics["transport_s"],
            path,
        )
        return path

    def update(self, tenant: Tenant, allow_dormant: bool = False, encoded: EncodedRows | None = None) -> Path:
        """More data, or new intents, for an existing tenant: a new version whose head grows for the new
        intents. The earlier intents are rehearsed from the expert's own stored statistics (their data is
        gone); the previous version stays for rollback. A hibernating tenant is refused (it would wake up as
        another version) unless `allow_dormant`. `encoded`: the new train rows already encoded, as for `grow`.
        An expert still on an older trunk version (bridged since an upgrade) is trained anew on this trunk, its earlier
        intents rehearsed from its statistics moved through the bridge. A tenant grown from few examples stays with its
        method until every intent has `few_shot_below` rows seen so far, then moves to the full method
        (`few_shot.next_method`, `Grower.next_version`)."""
        if not allow_dormant:
            self.store.check_awake(tenant.name)
        start = time.perf_counter()
        bridge = self._bridge(tenant.name)  # an expert kept through a trunk upgrade: its statistics move to this trunk
        old, meta = self.store.load(tenant.name, trunk_fingerprint=bridge.old if bridge else self.trunk.fingerprint)
        if bridge is not None:
            old = bridge.statistics_to_new({name: old[name] for name in STATISTICS})
        labels = meta.labels + tuple(sorted(set(tenant.labels) - set(meta.labels)))
        arch = meta.architecture.on(self.trunk.dim)  # a bridged expert's new version reads this trunk
        cfg = self._configured(arch)
        if encoded is None:
            features, y = self._features(tenant, labels)
        else:  # label ids into tenant.labels -> into the merged labels
            merged_ids = torch.tensor([labels.index(label) for label in tenant.labels])
            features, y = encoded.features, merged_ids[encoded.labels]
        old_stats = {k: old[k] for k in STATISTICS}
        others = self._others(tenant.name)
        peers = [entry for _, entry in others]  # their covariance, where a few-example tenant's has none of its own
        rehearsal, rehearsal_y = statistics_samples(old_stats, cfg.rehearsal_per_class, cfg, peers)
        merged = Tenant(tenant.name, labels)
        x, x_y = torch.cat([features, rehearsal]), torch.cat([y, rehearsal_y])  # one copy for both
        stats = merge_statistics(old_stats, class_statistics(features, y, len(labels)))
        self._warn_overlap(tenant.name, labels, stats, others, new=set(labels) - set(meta.labels))
        kind = arch.expert_kind
        if bridge is not None and kind.carry_problem is not None:
            raise ValueError(
                f"tenant {tenant.name!r}: a {kind.name} expert of another trunk can not be updated here "
                f"({kind.carry_problem})"
            )
        before = str(meta.metrics.get("growth_method", "full"))  # a shard from before growth methods: full
        method = next_method(
            before, stats[COUNT], cfg, GROWERS[arch.kind].FEW_SHOT
        )  # full once every intent has enough
        grower = self.grower(arch, method)
        expert, own = grower.next_version(
            old, merged, tenant, encoded, y, x, x_y, bridge is not None, before, stats, self._neighbours(others)
        )
        routing = routing_entry(x, x_y, stats, peers, cfg)
        seconds = time.perf_counter() - start
        metrics = {"train_examples": len(y), "update_s": seconds} | few_shot_metrics(method, stats)
        new_meta = ExpertMeta(tenant.name, labels, self.trunk.fingerprint, arch, metrics=metrics)
        path = self.store.save(
            expert_tensors(expert, routing, stats) | own, new_meta, allow_dormant=allow_dormant, parent=meta.version
        )
        log.info("updated %s to %d labels in %.1f s: %s", tenant.name, len(labels), time.perf_counter() - start, path)
        return path

    def hibernate(self, name: str) -> None:
        self.store.hibernate(name)

    def wake(self, name: str) -> None:
        self.store.wake(name)

    def retire(self, name: str, archive_dir: str | Path | None = None) -> Path | None:
        """Out of routing for good: its folder is moved to `archive_dir`, or deleted when that is None. A tombstone
        stays in the store, so that later operations on the name say it was retired, until it is grown again."""
        return self.store.remove(name, archive_dir)
