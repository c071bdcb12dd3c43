"""PagedMixture: inference over expert shards, with only the pager's budget of expert weights resident.

The gate's rows for every registered expert stay resident (they are small); expert weights are paged in,
wave by wave, for the experts a batch actually chose. Each expert's group is computed on its own, at its own
width (`expert_logits`, the one expert formula, then a softmax over its own labels only), so a prediction never
depends on what else happened to be resident, nor on how many labels other experts have: a tenant's tenant-given
scores are bit-identical whatever else grows (tests/test_exactness.py).
`moe.inference.build.load_mixture` builds one from a store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Hashable
from dataclasses import asdict
from pathlib import Path

import torch

from moe.inference.index import RowIndex
from moe.inference.pager import ExpertPager
from moe.model import (
    DispatchPlan,
    ExpertInfo,
    GateRows,
    Mixture,
    RouterOutput,
    TopKRouter,
    dispatch,
    expert_logits,
)
from moe.model.bridge import AffineMap
from moe.model.pathway import Hidden, Pathways
from moe.store import ExpertMeta, ShardError, expected_shapes, read_shard, read_tensors
from moe.store.shard import meta_dtype, weight_names

Key = tuple[str, int]  # (tenant, version)


def _identity(path: str | Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class ShardLoader:
    """Reads expert weights for the pager. A shard is verified in full when registered (`register`), or at its first
    page-in when registered from its header (`register_header`), and again whenever its file changed since (inode,
    size or modification time); unchanged files are read without rehashing.

    Per expert it keeps only the file name, its identity and a digest of its metadata: at thousands of
    registered experts, every byte kept here is resident. `locate(key)`, when given, finds a file that disappeared
    (a remote store's cache evicted it): the copy it hands back is verified in full, as any changed file is."""

    def __init__(self, trunk_fingerprint: str | None, locate: Callable[[Hashable], Path] | None = None):
        self.trunk_fingerprint, self.locate = trunk_fingerprint, locate
        self.trunks: dict[Hashable, str] = {}  # experts on another trunk version (bridged): the one each must name
        self.paths: dict[Hashable, str] = {}
        self.identities: dict[Hashable, tuple[int, int, int] | None] = {}
        self.digests: dict[Hashable, int] = {}
        self.names: dict[Hashable, tuple[str, ...]] = {}  # the tensors each expert computes with (`weight_names`)

    def trunk_of(self, key: Hashable) -> str | None:
        """The trunk fingerprint `key`'s shard must name: its own bridged version's, else the model's."""
        return self.trunks.get(key, self.trunk_fingerprint)

    def register(
        self, key: Hashable, path: Path, trunk: str | None = None
    ) -> tuple[dict[str, torch.Tensor], ExpertMeta]:
        """Read and check a shard in full, and remember it; returns its tensors and metadata. `trunk`: the shard is
        on this other trunk version (bridged to the model's)."""
        try:
            identity = _identity(path)  # before the read: a change made during it shows as a change later
        except FileNotFoundError:
            raise ShardError(path, "file not found") from None
        if trunk is not None:
            self.trunks[key] = trunk
        tensors, meta = read_shard(path, self.trunk_of(key))
        self.paths[key], self.identities[key], self.digests[key] = str(path), identity, _digest(meta)
        self.names[key] = weight_names(meta.architecture)
        return tensors, meta

    def register_header(
        self, key: Hashable, path: Path, meta: ExpertMeta, names: tuple[str, ...], trunk: str | None = None
    ) -> dict[str, torch.Tensor]:
        """Remember a shard from its header (`meta`, read and checked by the caller), reading only the tensors
        `names` (its routing entry or statistics); its checksum is verified in full when it is first paged in.
        `trunk`: as for `register`."""
        if trunk is not None:
            self.trunks[key] = trunk
        expected = self.trunk_of(key)
        if expected is not None and meta.trunk_fingerprint != expected:
            fingerprints = f"{meta.trunk_fingerprint[:12]}…, not on trunk {expected[:12]}… as expected"
            raise ShardError(path, f"trained on trunk {fingerprints}")
        tensors = read_tensors(path, names)
        shapes, dtype = expected_shapes(meta.architecture, len(meta.labels)), meta_dtype(meta)
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != shapes[name] or tensor.dtype != dtype:
                found = f"{tuple(tensor.shape)} {tensor.dtype}"
                raise ShardError(path, f"tensor {name} is {found}, its metadata implies {shapes[name]} {dtype}")
        self.paths[key], self.identities[key], self.digests[key] = str(path), None, _digest(meta)
        self.names[key] = weight_names(meta.architecture)
        return tensors

    def forget(self, key: Hashable) -> None:
        for table in (self.paths, self.identities, self.digests, self.trunks, self.names):
            table.pop(key, None)

    def __call__(self, key: Hashable) -> dict[str, torch.Tensor]:
        path = self.paths[key]
        try:
            identity = _identity(path)
        except FileNotFoundError:
            if self.locate is None:
                raise ShardError(path, "file disappeared after it was registered") from None
            path = self.paths[key] = str(self.locate(key))
            self.identities[key] = None  # a fresh copy: verified in full below
            try:
                identity = _identity(path)
            except FileNotFoundError:
                raise ShardError(path, "file disappeared after it was located again") from None
        if identity == self.identities[key]:
            return read_tensors(path, self.names[key])
        tensors, meta = read_shard(path, self.trunk_of(key))
        if _digest(meta) != self.digests[key]:
            raise ShardError(path, "file was replaced by a different expert after it was registered")
        self.identities[key] = identity
        return {name: tensors[name].clone() for name in self.names[key]}  # not views keeping every tensor alive


def _digest(meta: ExpertMeta) -> int:
    return hash(json.dumps(asdict(meta), sort_keys=True))


class PagedMixture(Mixture):
    def __init__(
        self,
        router: TopKRouter,
        experts: list[ExpertInfo],
        keys: list[Key],
        pager: ExpertPager,
        input_scale: float,
        gate_rows: GateRows,
    ):
        super().__init__(router, experts, input_scale, gate_rows)
        self.keys, self.pager = list(keys), pager
        self.left_out: dict[str, Exception] = {}  # tenants whose shards failed their checks (see load_mixture)
        self.index: RowIndex | None = None  # routes batches without a known tenant (`load_mixture(index=...)`)
        self.input_maps: dict[Key, AffineMap] = {}  # experts on an older trunk: their bridge from the model's features
        self.expert_trunks: dict[str, str] = {}  # tenant -> fingerprint of the trunk version its expert was trained on
        self.pathways: Pathways | None = None  # pathway experts: the trunk's top layers they adapt
        self.register_buffer("label_mask", self.label_ids >= 0, persistent=False)

    def route_unknown(self, x: torch.Tensor) -> RouterOutput:
        """Through the index over the gate's rows when there is one (no full scan of the gate), else every row."""
        return self.index.route(x) if self.index is not None else super().route_unknown(x)

    def hidden_states(self, texts: list[str]) -> Hidden | None:
        """What pathway experts read of a batch besides its features: its token states after the shared lower
        layers (None for experts that read the trunk's features)."""
        return self.pathways.lower(texts) if self.pathways is not None else None

    @torch.no_grad()
    def given_pass(self, hidden: Hidden, tenant: torch.Tensor, gate: bool = True) -> tuple[torch.Tensor, Hidden]:
        """Every query's tenant given: each query's pathway features and, with `gate`, the gate's features in the
        same pass over the top layers (the trunk's own rows, a zero pathway, beside the pathways' rows) -> (features
        for the gate (b, d), `hidden` with the pathway features, which the mixture then reads instead of running the
        top layers again). Without `gate` the pathway features stand in for the gate's: a tenant's one expert is its
        queries' only candidate, so only an out-of-scope score that reads the gate would see the difference. Batches
        whose experts do not fit the pager's budget at once take two passes instead."""
        experts = self.tenant_expert[tenant]  # one expert per tenant: its query's only candidate
        used, which = experts.unique(return_inverse=True)  # which: each query's expert among those used
        keys = [self.keys[e] for e in used.tolist()]
        if len(self.pager.waves(keys)) > 1:
            return self.pathways.upper(hidden, []), hidden  # no pathway: the trunk's own features
        b = len(tenant)
        with self.pager.acquire(keys) as resident:
            pathways = [resident[k] for k in keys]
            if not gate:
                out = self.pathways.upper(hidden, pathways, which)
                return out, hidden._replace(pathway=(experts, out))
            rows = torch.cat([torch.zeros_like(which), which + 1])  # the gate's rows first, on the zero pathway
            out = self.pathways.upper(
                hidden.take(torch.arange(b).repeat(2)), [self.pathways.zero(pathways[0])] + pathways, rows
            )
        return out[:b], hidden._replace(pathway=(experts, out[b:]))

    def group_log_probs(self, x: torch.Tensor, plan: DispatchPlan, hidden: Hidden | None = None) -> torch.Tensor:
        # g: groups (chosen experts), n: capacity, c: label width
        if self.pathways is not None and hidden is None:
            raise ValueError("pathway experts read the queries' token states: pass hidden=model.hidden_states(texts)")
        groups = dispatch(x, plan)  # (g, n, d)
        counts = torch.bincount(plan.group, minlength=plan.experts.numel()).tolist()
        rows = torch.zeros(plan.experts.numel(), plan.capacity, dtype=torch.long, device=x.device)
        rows[plan.group, plan.slot] = plan.token  # the query in each group's slot
        experts = plan.experts.tolist()
        out = x.new_zeros(len(experts), plan.capacity, self.width)
        out.masked_fill_(~self.label_mask[plan.experts][:, None, :], float("-inf"))
        position = {self.keys[e]: i for i, e in enumerate(experts)}
        for wave in self.pager.waves([self.keys[e] for e in experts]):
            self._compute_wave(wave, groups, counts, position, out, rows, hidden, plan.experts)
        return out

    def _compute_wave(self, wave: list[Hashable], groups, counts, position, out, rows, hidden, experts) -> None:
        # a function of its own: no reference to this wave's weights outlives it, so the next wave's
        # evictions free their memory before its page-ins take more
        with self.pager.acquire(wave) as resident:
            pathways = self.pathways is not None
            pathway_inputs = self._pathway_inputs(resident, counts, position, rows, hidden, experts) if pathways else {}
            for key, tensors in resident.items():
                i, n = position[key], counts[position[key]]
                c = tensors["head.bias"].shape[0]
                inputs = pathway_inputs[key] if key in pathway_inputs else groups[i, :n]
                if key in self.input_maps:  # an expert of an older trunk reads the model's features bridged to it
                    inputs = self.input_maps[key](inputs, self.input_scale)
                out[i, :n, :c] = expert_logits(inputs, tensors).log_softmax(dim=-1)  # its own labels only

    def _pathway_inputs(
        self, resident, counts, position, rows, hidden: Hidden, experts
    ) -> dict[Hashable, torch.Tensor]:
        """Every resident pathway expert's features of its own queries, in one pass over the top layers: each row
        of the pass gathers its expert's LoRA tensors (no loop over experts or queries)."""
        keys = list(resident)
        sizes = [counts[position[key]] for key in keys]
        queries = torch.cat([rows[position[key], :n] for key, n in zip(keys, sizes, strict=True)])
        if hidden.pathway is not None:  # computed with the gate's features (`given_pass`), for these very experts
            chosen = torch.cat([experts[position[key]].repeat(n) for key, n in zip(keys, sizes, strict=True)])
            if torch.equal(hidden.pathway[0][queries], chosen):
                features = hidden.pathway[1][queries] * self.input_scale
                return dict(zip(keys, features.split(sizes), strict=True))
        which = torch.repeat_interleave(
            torch.arange(len(keys), device=queries.device), torch.tensor(sizes, device=queries.device)
        )
        features = self.pathways.upper(hidden.take(queries), [resident[key] for key in keys], which) * self.input_scale
        return dict(zip(keys, features.split(sizes), strict=True))
