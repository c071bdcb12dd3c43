"""The one way to build a mixture from expert shards: `load_mixture(store)`, a `PagedMixture` with the gate settings of
the run that made the store.

Training's final evaluation, `scripts/evaluate.py`, export, the lifecycle's scenario and the serving runtime all build
their inference model here, the same way (tenants in sorted order), so that they compute the same predictions to the
last bit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from moe.inference.index import IndexSettings, RowIndex
from moe.inference.paged import PagedMixture, ShardLoader
from moe.inference.pager import ExpertPager
from moe.model import ExpertInfo, RowSource, TopKRouter, check_choice
from moe.model.bridge import AffineMap, Bridge
from moe.model.kinds import Architecture
from moe.model.router import GATE_BIAS, GATE_WEIGHT, ROUTING
from moe.model.stats import (
    COUNT,
    MEAN,
    OWN_COVARIANCE,
    SHRINKAGE,
    STATISTICS,
    PooledScatter,
    fill_statistics_rows,
    fill_tenant_rows,
)
from moe.store import ExpertMeta, ExpertStore, RemoteStore, ShardError, TrunkVersions, open_store, tensor_bytes
from moe.store.bundle import Verify  # each shard's checksum: when the mixture is built, or at first page-in
from moe.store.store import common_architecture

if TYPE_CHECKING:
    from moe.trunk import Trunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateSettings:
    top_k: int = 2
    normalize_weights: bool = True
    source: RowSource = "trained"  # the gate rows stored in each shard, or rows derived from its statistics
    shrinkage: float = SHRINKAGE  # of the pooled covariance, for source="statistics"
    own_covariance: float = OWN_COVARIANCE  # source="statistics": each expert's own covariance's share (0: linear)

    def __post_init__(self):
        check_choice(self.source, RowSource, "gate source")
        if not 0.0 <= self.own_covariance <= 1.0:
            raise ValueError(f"own_covariance must lie in [0, 1], got {self.own_covariance}")
        if self.own_covariance and self.source != "statistics":
            raise ValueError("own_covariance needs source='statistics': trained rows have no covariance to mix")

    def with_routing(self, routing: Mapping[str, Any]) -> GateSettings:
        """These settings with a `conf/routing/` group's: its source, and its shrinkage and (for the statistics gate)
        own_covariance where it names them (not null)."""
        own = routing.get("own_covariance") if routing["source"] == "statistics" else 0.0
        own = self.own_covariance if own is None else own
        return replace(
            self,
            source=routing["source"],
            shrinkage=float(routing.get("shrinkage", self.shrinkage)),
            own_covariance=float(own),
        )


def read_gate_settings(path: str | Path) -> GateSettings:
    """Top-k and weight normalisation from a gate file's metadata (`moe.store.save_gate`)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        return GateSettings(int(meta["top_k"]), bool(json.loads(meta.get("normalize_weights", "true"))))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"gate file {path}: unreadable ({error})") from None
    except (KeyError, ValueError) as error:
        raise ValueError(f"gate file {path}: metadata lacks a valid top_k ({error})") from None


def load_mixture(
    store: ExpertStore | str | Path,
    tenants: list[str] | None = None,
    gate: GateSettings | None = None,
    trunk_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
    budget_bytes: int = 256 << 20,
    host_budget_bytes: int = 0,
    skip_failed: bool = False,
    verify: Verify = "full",
    index: IndexSettings | None = None,
    trunk: Trunk | None = None,
) -> PagedMixture:
    """The latest version of each tenant (all awake ones by default, in sorted order), paged under `budget_bytes`.
    A store with generations is read at its latest one (`ExpertStore.at(store.state())`): a reader loading while a
    trunk upgrade or any lifecycle write runs gets the store as it was before it or after it, never between.

    Every shard is verified in full (checksums, trunk fingerprint, architecture, and the store's rule that a shard
    lives in its own tenant's folder: `ExpertStore.check_shard`). A shard that fails is an error
    naming it, since a partial model would be evaluated or served silently; with `skip_failed` it is left out
    instead, logged, and listed in the model's `left_out`, and it never stops the others.

    `verify="lazy"` registers each expert from its header and its stored gate rows alone (what thousands of tenants
    need: the weights are not read); its checksum is verified in full when it is first paged in, and a shard that
    fails then is a ShardError naming it, for the batch that chose it. The statistics gate pools every expert's
    statistics into every expert's rows, so with `gate.source="statistics"` every shard is verified in full anyway.

    `trunk`: the trunk whose top layers pathway experts adapt (`moe.model.pathway`); a store of pathway experts needs
    it, and its fingerprint is then the one every shard must name.

    `index`: batches that name no tenant are routed through an approximate index over the gate's rows
    (`moe.inference.index.RowIndex`, linear gates only) instead of a scan of every row.

    `gate.source`: "trained" scores with the gate rows stored in each shard; "statistics" derives them from each
    expert's class means and the covariance pooled over every expert loaded (the statistics gate), mixed with each
    expert's own covariance when `gate.own_covariance` > 0 (which holds a d x d matrix per expert in the gate)."""
    check_choice(verify, Verify, "verify")
    if trunk is not None:
        trunk_fingerprint = trunk_fingerprint or trunk.fingerprint
        if trunk.fingerprint != trunk_fingerprint:
            given, wanted = trunk.fingerprint[:12], trunk_fingerprint[:12]
            raise ValueError(f"trunk {given}… given, but the mixture is to load on trunk {wanted}…")
    store = store if isinstance(store, ExpertStore) else open_store(store)
    if store.pinned is None and store.generation() > 0:  # one generation whole: never half of a change in flight
        store = store.at(store.state())
    gate = gate or GateSettings()
    names = sorted(tenants if tenants is not None else store.tenants())
    if repeated := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"tenants {repeated} are listed more than once: list each tenant once")
    if not names:
        raise ValueError(f"expert store {store.root} holds no live expert")
    candidates: list[tuple[tuple[str, int], ExpertMeta]] = []
    failed: dict[str, Exception] = {}
    for tenant in names:
        try:
            key = (tenant, store.latest(tenant))
            candidates.append((key, store.meta(*key)))  # header only: sizes the gate before any tensor is read
        except (ShardError, KeyError, ValueError) as error:
            failed[tenant] = error
    if not candidates:
        raise ValueError(f"no expert could be loaded from {store.root}: {failed}")
    bridges = BridgeCache(store, trunk_fingerprint)
    for _, meta in candidates:
        try:
            bridges.served(meta)
        except ShardError as error:
            failed[meta.tenant] = error
    candidates = [(key, meta) for key, meta in candidates if key[0] not in failed]
    if not candidates:
        raise ValueError(f"no expert could be loaded from {store.root}: {failed}")
    arch = common_architecture([served_architecture(meta, bridges) for _, meta in candidates])  # odd ones refused
    forward = arch.expert_kind.forward(arch, trunk, bridged=bridges.any())  # the kind's forward, chosen once
    statistics = gate.source == "statistics"
    per_label = arch.gate_rows == "labels" or statistics
    rows = [len(meta.labels) if per_label else 1 for _, meta in candidates]
    dtype = arch.torch_dtype  # the gate is held in the experts' own precision
    # filled in place, expert by expert: no per-expert copies linger
    router = TopKRouter(arch.dim, rows, gate.top_k, gate.normalize_weights, random_init=False, dtype=dtype)
    means = torch.zeros(len(candidates), max(rows), arch.dim) if statistics else None
    remote = isinstance(store, RemoteStore)  # its cache may evict a shard: fetched again when paged in
    loader = ShardLoader(trunk_fingerprint, locate=(lambda key: store.path(*key)) if remote else None)
    routing_tensors = STATISTICS if statistics else ROUTING
    pager = ExpertPager(loader, device, budget_bytes, host_budget_bytes)
    pooled = PooledScatter.of([], arch.dim)  # only the aggregate stays resident; the rest stays in the shards
    own: list[dict[str, torch.Tensor]] = []  # each expert's statistics, when its own covariance enters its rows
    infos, keys, kept = [], [], []
    input_maps: dict[tuple[str, int], AffineMap] = {}
    expert_trunks: dict[str, str] = {}  # tenant -> the trunk version its expert was trained on
    with torch.no_grad():
        for i, (key, header) in enumerate(candidates):
            bridge = bridges.get(header)  # None: on the model's own trunk
            old_trunk = bridge.old if bridge else None
            try:
                if served_architecture(header, bridges) != arch:
                    raise ShardError(store.path(*key), f"architecture {header.architecture} differs from {arch}")
                if verify == "lazy" and not statistics:  # the header was read and checked by store.meta
                    path, tensors = store.read_tensors(*key, routing_tensors)  # from an object store: ranged reads
                    tensors = loader.register_header(key, path, header, tensors, old_trunk)
                    meta = header
                else:
                    tensors, meta = loader.register(key, path := store.path(*key), old_trunk)
                try:  # the file read in full is checked too: it may not be the one whose header was read
                    store.check_shard(path, meta)
                    if meta != header:
                        raise ShardError(path, "changed while the mixture was being built")
                    if statistics and not tensors[COUNT].sum() > 0:
                        raise ShardError(path, "holds no feature statistics, which statistics rows need")
                except ShardError:
                    loader.forget(key)
                    raise
            except (ShardError, KeyError, ValueError) as error:
                failed[key[0]] = error
                continue
            if bridge is not None:  # its routing entry, as it scores the model's trunk's features
                tensors = bridge.entry_to_new(tensors, arch.input_scale)
                input_maps[key] = bridge.to_old
            if means is not None:  # turned into gate rows once the pooled covariance is known
                means[i, : rows[i]] = tensors[MEAN]
            else:
                router.weight[i, : rows[i]] = tensors[GATE_WEIGHT]
                router.bias[i, : rows[i]] = tensors[GATE_BIAS]
            if statistics:
                pooled.add(tensors)
            if statistics and gate.own_covariance:
                own.append({name: tensors[name] for name in STATISTICS})
            pager.register(key, tensor_bytes(meta, meta.architecture.weight_names()))
            infos.append(ExpertInfo(meta.tenant, meta.labels))
            expert_trunks[meta.tenant] = meta.trunk_fingerprint
            keys.append(key)
            kept.append(i)
    if failed and not skip_failed:
        raise ValueError(f"expert store {store.root}: " + "; ".join(f"{t}: {e}" for t, e in sorted(failed.items())))
    for tenant, problem in failed.items():
        log.warning("expert %s left out: %s", tenant, problem)
    if not infos:
        raise ValueError(f"no expert could be loaded from {store.root}: {failed}")
    if len(kept) < len(candidates):
        router = router.subset(kept)
        means = means[kept, : router.weight.shape[1]] if means is not None else None
    tenants_loaded = [info.tenant for info in infos]
    if means is not None and own:
        fill_tenant_rows(
            router, own, pooled.covariance(), gate.own_covariance, gate.shrinkage, arch.input_scale, tenants_loaded
        )
    elif means is not None:
        fill_statistics_rows(router, means, pooled.precision(gate.shrinkage), arch.input_scale, tenants_loaded)
    model = PagedMixture(router, infos, keys, pager, arch.input_scale, "labels" if per_label else "one")
    model.left_out = failed
    model.input_maps = input_maps
    model.expert_trunks = expert_trunks
    model.forward_kind = forward
    model.index = RowIndex.build(router, index) if index is not None else None
    return model.to(device).eval()


class BridgeCache:
    """The bridges into trunk `trunk_fingerprint`'s features from the other trunk versions a store's experts are on,
    each read from the store's trunk registry once, however many experts it serves (the builder's and the lifecycle's
    one lookup)."""

    def __init__(self, store: ExpertStore, trunk_fingerprint: str | None):
        self.store, self.trunk_fingerprint = store, trunk_fingerprint
        self.bridges: dict[str, Bridge] = {}  # older trunk version -> its bridge
        self.missing: dict[str, str] = {}  # older trunk version -> why it has none

    def any(self) -> bool:
        return bool(self.bridges)

    def get(self, meta: ExpertMeta) -> Bridge | None:
        """The bridge from the trunk `meta`'s expert was trained on to the trunk's features (None: it is on that
        trunk); a ShardError naming its shard and both fingerprints where the store has none."""
        old = meta.trunk_fingerprint
        if self.trunk_fingerprint is None or old == self.trunk_fingerprint:
            return None
        path = self.store.path(meta.tenant, meta.version)  # here only: from an object store, `path` downloads
        if old not in self.bridges and old not in self.missing:
            try:
                self.bridges[old] = TrunkVersions(self.store.root).require_bridge(old, self.trunk_fingerprint, path)
            except ShardError as error:
                self.missing[old] = error.reason
            except ValueError as error:  # an unreadable bridge file
                self.missing[old] = str(error)
        if old in self.missing:
            raise ShardError(path, self.missing[old])
        return self.bridges[old]

    def served(self, meta: ExpertMeta) -> Bridge | None:
        """`get`, for an expert to serve: one whose kind can not be carried onto another trunk is a ShardError."""
        kind, old = meta.architecture.expert_kind, meta.trunk_fingerprint
        if kind.carry_problem is not None and self.trunk_fingerprint not in (None, old):
            raise ShardError(  # e.g. rolled back to a version from before an upgrade
                self.store.path(meta.tenant, meta.version),
                f"a {kind.name} expert on trunk {old[:12]}…, not on {self.trunk_fingerprint[:12]}…: "
                f"{kind.carry_problem}, so no bridge carries it; restore its version on the current trunk, or "
                "retrain it",
            )
        return self.get(meta)


def served_architecture(meta: ExpertMeta, bridges: BridgeCache) -> Architecture:
    """An expert's architecture as the mixture sees it: a bridged expert takes the model's trunk's features."""
    bridge = bridges.get(meta)
    return meta.architecture.on(bridge.new_dim) if bridge else meta.architecture
