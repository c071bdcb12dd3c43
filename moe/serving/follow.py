"""What a server answers from: a bundle, or an expert store followed generation by generation.

A `ServingState` is everything one request is answered by (trunk, mixture, out-of-scope rule, the store's generation);
it is built whole and never changed afterwards. A `StoreSource` builds the state of a store's latest generation
(`ExpertStore.at`: exactly the tenants, versions and trunk that generation names) with the one mixture builder,
`load_mixture`, as a fresh server would, so a server that followed the store answers as a fresh one does, to the bit.
The next generation is carried over from the previous state (`carry_over`) when its gate reads stored rows: only the
tenants whose (tenant, version) changed are read (through `load_mixture`, so checked as a fresh load checks them),
the untouched ones keep their registration (no header re-read), the gate is laid out again in sorted tenant order
from the rows held (a copy: the same tensor a fresh load fills, so the same answers to the bit), the pager and its
resident experts are shared, and the routing index is carried over (`RowIndex.follow`: added rows inserted, removed
ones masked, rebuilt past `moe.inference.index.MAX_MASKED`). The statistics gate pools every expert's statistics into
every row, so that generation is built afresh, its pooled rows computed as a fresh load computes them; so is a
generation on another trunk. A `Follower` polls the store and swaps the new state in (`Server.refresh`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import torch

from moe.inference import GateSettings, IndexSettings, PagedMixture, Verify, load_mixture
from moe.inference.answers import DEFAULT_OOS_SCORE, UNSURE_MARGIN, check_oos_rule
from moe.inference.bundle import open_bundle
from moe.model import TopKRouter
from moe.store import ExpertStore, RemoteStore, ShardError, TrunkVersions, is_url, open_store
from moe.store.bundle import MANIFEST, Bundle
from moe.store.generation import State
from moe.trunk import Trunk

if TYPE_CHECKING:
    from moe.serving.runtime import Server

log = logging.getLogger(__name__)

RETRIES = 3  # builds of a generation that lost a version to a newer one meanwhile, before serving what loaded


@dataclass(frozen=True, eq=False)
class ServingState:
    trunk: Trunk
    model: PagedMixture
    oos_kind: str
    threshold: float | None
    unsure_margin: float
    generation: int | None = None  # the store's generation served; None: a bundle
    store_state: State | None = None  # what that generation names (sleeping tenants included)
    bundle: Bundle | None = None
    applied: float = field(default_factory=time.time)  # when this state began to be served (epoch seconds)

    @cached_property
    def tenant_of(self) -> dict[Hashable, str]:
        """Each expert's pager key and its tenant."""
        ids: list[int] = self.model.expert_tenant.tolist()  # type: ignore[operator]
        return {key: self.model.tenants[t] for key, t in zip(self.model.keys, ids, strict=True)}

    @cached_property
    def keys_of(self) -> dict[str, list[Hashable]]:
        """Each tenant served and the pager keys of its experts."""
        keys: dict[str, list[Hashable]] = {name: [] for name in self.model.tenants}
        for key, tenant in self.tenant_of.items():
            keys[tenant].append(key)
        return keys

    def not_served(self, tenant: str) -> str:
        """Why `tenant` is not answered here: it sleeps at this generation, or the store knows no live version of
        it (never grown, retired, or left out as damaged)."""
        at = f" at generation {self.generation}" if self.generation is not None else ""
        if self.store_state is not None and tenant in self.store_state.dormant:
            return f"tenant {tenant!r} is hibernating{at}: wake it to query it"
        if tenant in self.model.left_out:
            return f"the expert of tenant {tenant!r} is damaged on this server and can not answer"
        return f"unknown tenant {tenant!r}{at}"


def is_bundle(location: str | Path, **options) -> bool:
    """Whether `location` (a folder or an fsspec URL) holds a bundle (its manifest) rather than an expert store.
    `options`: fsspec's, and `open_store`'s own (the cache's folder and budget), which fsspec is not given."""
    if is_url(location):
        options = {k: v for k, v in options.items() if k not in ("cache_dir", "cache_budget_bytes")}
        fs, prefix = fsspec.core.url_to_fs(str(location), **options)
        return fs.exists(f"{prefix.rstrip('/')}/{MANIFEST}")
    return (Path(location) / MANIFEST).is_file()


@dataclass
class BundleSource:
    """A bundle: one state, never followed."""

    bundle: str | Path | Bundle
    device: str
    budget_bytes: int
    host_budget_bytes: int
    verify: Verify
    index: IndexSettings | None

    def build(self, previous: ServingState | None = None) -> ServingState:
        budgets = (self.budget_bytes, self.host_budget_bytes)
        opened = open_bundle(self.bundle, self.device, *budgets, self.verify, self.index)
        return ServingState(
            opened.trunk, opened.model, opened.oos_score, opened.threshold, opened.unsure_margin, bundle=opened.bundle
        )


@dataclass
class StoreSource:
    """An expert store (local or at a URL), served at its latest generation: tenants awake then, each at the version
    that generation names, on its trunk (`trunk`, if given, must be that one). A shard that fails its checks is left
    out (`model.left_out`) and never stops the others."""

    store: ExpertStore
    device: str
    budget_bytes: int
    host_budget_bytes: int
    verify: Verify
    index: IndexSettings | None
    gate: GateSettings = field(default_factory=GateSettings)
    oos_score: str = DEFAULT_OOS_SCORE
    threshold: float | None = None
    unsure_margin: float = UNSURE_MARGIN
    trunk: Trunk | None = None

    def __post_init__(self):
        check_oos_rule(self.oos_score, self.threshold)

    def generation(self) -> int:
        return self.store.generation()

    def build(self, previous: ServingState | None = None) -> ServingState:
        """The latest generation's state. Built again (at most `RETRIES` times) when a version it names vanished
        while it was read (retired by a newer generation): what is served is always one generation whole."""
        for _ in range(RETRIES):
            state = self.store.state()
            view = self.store.at(state)
            if not state.awake:
                raise ValueError(f"expert store {self.store.root} has no awake tenant at generation {state.generation}")
            trunk = self._trunk(state, view, previous)
            model = self.carry_over(previous, view, state, trunk) if previous is not None else None
            model = model or self.load(view, trunk, index=self.index)
            model.pager.load.locate = self.locate
            if not model.left_out or self.store.generation() == state.generation:
                break
            log.info("generation %d of %s moved on while it loaded: loading the latest", state.generation, self.store)
        for tenant, problem in sorted(model.left_out.items()):
            log.error("generation %d: tenant %s left out: %s", state.generation, tenant, problem)
        return ServingState(
            trunk, model, self.oos_score, self.threshold, self.unsure_margin, state.generation, state, bundle=None
        )

    def locate(self, key: tuple[str, int]) -> Path:
        """A version's file for the pager: live, or its retired copy once a newer generation retired it (a rollback),
        so that the generation still served answers with it until the replica moves on, instead of failing."""
        tenant, version = key
        for retired in (False, True):
            try:
                path = self.store.path(tenant, version, retired)  # a remote store downloads it (ShardError: none)
            except ShardError:
                continue
            if path.is_file():
                return path
        raise ShardError(self.store.path(tenant, version), "no longer in the store, live or retired")

    def load(self, view, trunk: Trunk, **which) -> PagedMixture:
        """`load_mixture` over `view` with this source's gate, device, budgets and verification (a damaged expert
        left out); `which`: the tenants to load (default all) or the routing index."""
        return load_mixture(
            view,
            gate=self.gate,
            trunk_fingerprint=trunk.fingerprint,
            device=self.device,
            budget_bytes=self.budget_bytes,
            host_budget_bytes=self.host_budget_bytes,
            skip_failed=True,
            verify=self.verify,
            trunk=trunk,
            **which,
        )

    def carry_over(self, previous: ServingState, view: ExpertStore, state: State, trunk: Trunk) -> PagedMixture | None:
        """`previous`'s mixture moved to `state` (see the module's docstring), or None where it can not be (the
        statistics gate, another trunk, no awake tenant loadable, or added experts unlike the previous ones)."""
        old = previous.model
        if self.gate.source != "trained" or previous.trunk.fingerprint != trunk.fingerprint:
            return None
        if previous.store_state is None or previous.store_state.trunk != state.trunk:
            return None
        wanted = {t: (t, state.tenants[t].version) for t in state.awake}
        old_tenants = [old.tenants[t] for t in old.expert_tenant.tolist()]  # each old expert's tenant
        held = dict(zip(old_tenants, old.keys, strict=True))
        added = sorted(t for t, key in wanted.items() if held.get(t) != key)  # new, another version, or left out
        fresh = None
        if added:
            try:
                fresh = self.load(view, trunk, tenants=added)
            except ValueError:  # none of them loads: the fresh build says why, tenant by tenant
                return None
            if not _same_kind(old, fresh):
                return None
        # tenant -> (the mixture holding its expert, the expert's place there)
        sources = {t: (old, e) for e, t in enumerate(old_tenants) if t in wanted and t not in added}
        if fresh is not None:
            sources |= {fresh.tenants[t]: (fresh, e) for e, t in enumerate(fresh.expert_tenant.tolist())}
        names = sorted(sources)  # the order a fresh load lays the gate out in
        if not names:
            return None
        counts = {id(m): m.router.row_mask.sum(dim=-1).tolist() for m in (old, fresh) if m is not None}
        rows = [counts[id(m)][e] for m, e in (sources[t] for t in names)]
        r = old.router
        router = TopKRouter(r.weight.shape[-1], rows, r.top_k, r.normalize_weights, False, r.weight.dtype)
        width = router.weight.shape[1]
        with torch.no_grad():  # each source's rows in one gather (padding rows are zeros in both, as a fresh load's)
            for model in (old, fresh):
                if model is None:
                    continue
                places = [(i, sources[t][1]) for i, t in enumerate(names) if sources[t][0] is model]
                if not places:
                    continue
                to, take = (torch.tensor(p, dtype=torch.long) for p in zip(*places, strict=True))
                w = min(width, model.router.weight.shape[1])
                router.weight[to, :w] = model.router.weight[take, :w]
                router.bias[to, :w] = model.router.bias[take, :w]
        keys = [sources[t][0].keys[sources[t][1]] for t in names]
        pager = old.pager  # shared: its resident experts stay warm; the added ones registered in it
        if fresh is not None:
            loader, theirs = pager.load, fresh.pager.load
            for key in fresh.keys:
                for table in ("paths", "identities", "digests", "trunks", "names"):
                    if key in getattr(theirs, table):
                        getattr(loader, table)[key] = getattr(theirs, table)[key]
                pager.register(key, fresh.pager.sizes[key])
        for key in set(old.keys) - set(keys):  # dropped (hibernated, retired, another version): its memory freed
            pager.evict(key)  # still registered: a request of the generation before pages it in again if it must
        model = PagedMixture(
            router, [sources[t][0].experts[sources[t][1]] for t in names], keys, pager, old.input_scale, old.gate_rows
        )
        model.left_out = dict(fresh.left_out) if fresh is not None else {}
        model.input_maps = {k: m.input_maps[k] for m, e in sources.values() if (k := m.keys[e]) in m.input_maps}
        model.expert_trunks = {t: sources[t][0].expert_trunks[t] for t in names}
        model.forward_kind, model.evidence_weight = old.forward_kind, old.evidence_weight
        if old.index is not None:
            place = {key: i for i, key in enumerate(keys)}
            pairs = zip(old.keys, old_tenants, strict=True)
            kept = [place[k] if t in sources and sources[t][0] is old else -1 for k, t in pairs]
            new = [place[key] for key in fresh.keys] if fresh is not None else []
            model.index = old.index.follow(router, torch.tensor(kept, dtype=torch.long), new)
        return model.to(self.device).eval()

    def _trunk(self, state: State, view: ExpertStore, previous: ServingState | None) -> Trunk:
        """The trunk the generation serves on: its recorded current version, else the trunk its experts were trained
        on; reused from `previous` or `self.trunk` when the fingerprint is theirs, else rebuilt from the store."""
        fingerprint = state.trunk
        if fingerprint is None and self.trunk is not None:
            fingerprint = self.trunk.fingerprint
        if fingerprint is None:
            fingerprint = self._experts_trunk(view, state)
        for known in (previous.trunk if previous else None, self.trunk):
            if known is not None and known.fingerprint == fingerprint:
                return known
        if self.trunk is not None:
            raise ValueError(
                f"expert store {self.store.root} serves on trunk {fingerprint[:12]}… at generation "
                f"{state.generation}, not on the trunk given ({self.trunk.fingerprint[:12]}…)"
            )
        versions = TrunkVersions(self.store.root)
        if isinstance(self.store, RemoteStore) and not versions.has(fingerprint):
            mirror_trunk(self.store, fingerprint)
        try:
            return versions.rebuild(fingerprint).to(self.device)
        except KeyError as error:
            raise ValueError(
                f"expert store {self.store.root} does not record trunk {fingerprint[:12]}…, which its experts need "
                f"(lifecycle writes record it; or give the trunk): {error.args[0]}"
            ) from None

    def _experts_trunk(self, view: ExpertStore, state: State) -> str:
        problems = []
        for tenant in state.awake:
            try:
                return view.meta(tenant).trunk_fingerprint
            except (ShardError, KeyError, ValueError) as error:
                problems.append(f"{tenant}: {error}")
        raise ValueError(f"expert store {self.store.root}: no readable expert names its trunk: {problems}")


def _same_kind(old: PagedMixture, fresh: PagedMixture) -> bool:
    """Whether experts loaded on their own fit the gate of `old`: features, dtype, rows and scale alike."""
    a, b = (
        (m.router.weight.shape[-1], m.router.weight.dtype, m.router.top_k, m.router.normalize_weights)
        + (m.input_scale, m.gate_rows, type(m.forward_kind))
        for m in (old, fresh)
    )
    return a == b


def mirror_trunk(store: RemoteStore, fingerprint: str) -> None:
    """Copy a trunk version's record (`.trunks/<fingerprint>/`) from the bucket into the store's cache folder."""
    folder = f".trunks/{fingerprint[:32]}"
    with contextlib.suppress(FileNotFoundError):  # not in the bucket either: the rebuild names the fingerprint
        store.fs.get(f"{store.prefix}/{folder}", str(store.root / folder), recursive=True)


def open_source(
    location: str | Path | Bundle | ExpertStore,
    device: str,
    budget_bytes: int,
    host_budget_bytes: int,
    verify: Verify,
    index: IndexSettings | None,
    store_options: dict | None = None,
    **store_settings,
) -> BundleSource | StoreSource:
    """A bundle (a `Bundle`, or a folder or URL with a manifest) or an expert store (an `ExpertStore`, or any other
    folder or URL; `store_options` go to fsspec, e.g. `endpoint_url`); `store_settings` (gate, oos_score,
    threshold, unsure_margin, trunk) apply to a store only, None where not given."""
    common = (device, budget_bytes, host_budget_bytes, verify, index)
    store_options = store_options or {}
    given = {k: v for k, v in store_settings.items() if v is not None}
    if isinstance(location, ExpertStore):
        return StoreSource(location, *common, **given)
    if isinstance(location, Bundle) or is_bundle(location, **store_options):
        if given:
            raise ValueError(f"{sorted(given)} apply to serving a store; a bundle carries its own (in its manifest)")
        return BundleSource(location, *common)
    if not is_url(location) and not Path(location).is_dir():
        raise FileNotFoundError(f"{location}: neither a bundle nor an expert store (no such folder)")
    return StoreSource(open_store(location, **store_options), *common, **given)


class Follower:
    """A daemon thread that calls `server.refresh()` every `interval_s` seconds until `stop`; a failed refresh is
    logged and counted, and the state served stays the last good one."""

    def __init__(self, server: Server, interval_s: float = 1.0):
        if not interval_s > 0:
            raise ValueError(f"the poll interval must be positive, got {interval_s!r} s")
        self.server, self.interval_s = server, interval_s
        self.failures, self.last_error = 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-follow-store", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.server.refresh()
            except Exception as error:  # the store is mid-change, unreachable, or damaged: keep serving, say why
                self.failures, self.last_error = self.failures + 1, f"{type(error).__name__}: {error}"
                log.warning("following %s: %s", self.server.source, self.last_error)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
